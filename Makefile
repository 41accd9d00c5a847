# byoi-agent: the two README commands are `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: deps demo test lint unit vm-test rescue demo-pxe bench clean

deps:
	@bash scripts/install-deps.sh

## A full install onto a loop device from a locally served sample image (needs root).
demo: deps
	$(PY) -m demo.run_demo

## Lint and the whole test suite (root tests included; VM tests included).
test: deps lint
	$(PY) -m pytest -q -ra

lint: deps
	.venv/bin/ruff check agent tests demo bench vm-fixtures examples rescue
	.venv/bin/ruff format --check agent tests demo bench vm-fixtures examples rescue

## Only the fast tests (no VMs).
unit: deps
	$(PY) -m pytest -q -ra -m "not vm"

vm-test: deps
	$(PY) -m pytest -q -ra -m vm tests/vm tests/pxe

## The PXE-bootable rescue environment (kernel + initramfs) in rescue/out/.
rescue: deps
	$(PY) rescue/build.py

## The whole production flow in QEMU: network boot, orchestrator, install, reboot (UEFI and BIOS).
demo-pxe: deps
	$(PY) examples/pxe_orchestrator.py --firmware uefi
	$(PY) examples/pxe_orchestrator.py --firmware bios

## Figures, not tests: download vs curl; whole install vs curl + qemu-img (needs root);
## qemu-img convert's -m/-W/-t. Options: make bench INSTALL_BENCH_ARGS="--rounds 5 --size 1.9g"
bench: deps
	$(PY) -m bench.bench_download
	$(PY) -m bench.bench_install $(INSTALL_BENCH_ARGS)
	$(PY) -m bench.bench_install --convert-params $(INSTALL_BENCH_ARGS)

clean:
	rm -rf .venv .pytest_cache .ruff_cache vm-fixtures/out rescue/out bench/out .cache

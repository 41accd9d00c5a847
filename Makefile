# byoi-agent: the two README commands are `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: deps demo test lint unit vm-test bench clean

deps:
	@bash scripts/install-deps.sh

## A full install onto a loop device from a locally served sample image (needs root).
demo: deps
	$(PY) -m demo.run_demo

## Lint and the whole test suite (root tests included; VM tests included).
test: deps lint
	$(PY) -m pytest -q -ra

lint: deps
	.venv/bin/ruff check agent tests demo bench vm-fixtures examples
	.venv/bin/ruff format --check agent tests demo bench vm-fixtures examples

## Only the fast tests (no VMs).
unit: deps
	$(PY) -m pytest -q -ra -m "not vm"

vm-test: deps
	$(PY) -m pytest -q -ra -m vm tests/vm

bench: deps
	$(PY) bench/bench_download.py

clean:
	rm -rf .venv .pytest_cache .ruff_cache vm-fixtures/out bench/out .cache

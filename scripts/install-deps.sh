#!/usr/bin/env bash
# Installs everything byoi-agent, its demo and its tests need on a fresh Debian 12 machine
# (only git, make and python3 assumed): system tools with apt, Python packages in ./.venv.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  # the agent's own tools
  qemu-utils gdisk fdisk util-linux mount e2fsprogs mtools dosfstools efibootmgr kmod
  # python venv on a fresh Debian
  python3-venv python3-pip
  # tests, demo and benchmarks
  curl nginx-light ca-certificates libarchive-tools genisoimage squid
  # VM tests and the rescue image
  qemu-system-x86 ovmf seabios ipxe-qemu busybox-static cpio zstd xz-utils debootstrap
  # runtime libraries of the unpacked grub-mkstandalone / grub-mkimage (vm-fixtures)
  libdevmapper1.02.1 liblzma5
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: need root to apt-get install: ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# apt-get download (cloud-init for tests, VM fixtures) needs package lists.
if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ]; then
  apt-get update -qq
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.deps-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  rm -f .venv/.deps-*
  touch "$stamp"
fi
echo "install-deps: ready"

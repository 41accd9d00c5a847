#!/bin/bash
# The naive shell install of issue 11, for the install benchmark: what a person would type.
#   naive_install.sh URL SHA256 FORMAT DISK WORKDIR SSHKEY USERDATA_FILE
# curl; sha256sum; qemu-img convert with its defaults; sgdisk -e; genisoimage (or xorriso);
# sgdisk -n; dd. No verification, no safety checks, no wipe.
set -euo pipefail
url=$1 sha=$2 fmt=$3 disk=$4 work=$5 sshkey=$6 userdata=$7

curl -sS --fail -o "$work/image" "$url"
echo "$sha  $work/image" | sha256sum -c --quiet -
qemu-img convert -f "$fmt" -O raw "$work/image" "$disk"
sgdisk -e "$disk" >/dev/null

cd=$work/cd
mkdir -p "$cd/openstack/latest"
printf '{"uuid": "bench", "hostname": "bench", "public_keys": {"key": "%s"}}\n' "$sshkey" \
  >"$cd/openstack/latest/meta_data.json"
cp "$userdata" "$cd/openstack/latest/user_data"
if command -v genisoimage >/dev/null; then
  genisoimage -quiet -R -J -V config-2 -o "$work/cd.iso" "$cd"
else
  xorriso -as mkisofs -quiet -R -J -V config-2 -o "$work/cd.iso" "$cd"
fi

last=$(sgdisk -E "$disk" 2>/dev/null | tail -n 1)
start=$(((last - 131072) / 2048 * 2048))
sgdisk -n "3:$start:$last" -c 3:config-2 "$disk" >/dev/null
dd if="$work/cd.iso" of="$disk" bs=1M oflag=seek_bytes seek=$((start * 512)) conv=fsync,notrunc \
  status=none

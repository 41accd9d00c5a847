#!/bin/busybox sh
# Init of the rescue VM. The guest has no OS of its own: it mounts the host's root filesystem
# read-only over virtio-9p ("hostroot") and chroots into it, with the guest's own /dev, /proc,
# /sys and a tmpfs /run (the scratch space: TMPDIR; /tmp stays the host's, read-only, since the
# working tree may live there), so the agent runs from the host's working tree exactly as it is,
# against the guest's virtual disks. The test hands in a script over a second 9p share ("xfer",
# read-write, seen as /run/xfer in the chroot) and reads the result back on the serial console
# between BYOI-RESCUE-* markers. Any failure to set up ends in BYOI-RESCUE-ERROR and power off.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec 0</dev/console 1>/dev/console 2>&1

fail() {
    echo "BYOI-RESCUE-ERROR $*"
    poweroff -f
    sleep 60
}

for m in $(cat /etc/modules-order); do insmod "/lib/modules/$m" 2>/dev/null; done

H=/host
mkdir -p $H /xfer
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=524288 hostroot $H \
    || fail "cannot mount the host root over 9p"
for d in dev proc sys run; do [ -d "$H/$d" ] || fail "no /$d in the host root"; done
mount -o bind /dev $H/dev || fail "bind /dev"
mount -o bind /proc $H/proc || fail "bind /proc"
mount -o bind /sys $H/sys || fail "bind /sys"
if [ -d $H/sys/firmware/efi/efivars ]; then
    mount -t efivarfs efivarfs $H/sys/firmware/efi/efivars || fail "efivarfs"
fi
mount -t tmpfs -o mode=755 tmpfs $H/run || fail "tmpfs /run"
# The chroot's /dev must be the guest's devtmpfs before anything opens a disk node.
grep -q " $H/dev devtmpfs " /proc/mounts || fail "/dev of the chroot is not the guest devtmpfs"
mkdir -p $H/run/xfer $H/run/tmp
chmod 1777 $H/run/tmp
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 xfer $H/run/xfer \
    || fail "cannot mount the xfer share"
[ -f $H/run/xfer/run.sh ] || fail "no run.sh in the xfer share"

ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 \
    || echo "BYOI-RESCUE-NOTE no network"

echo "BYOI-RESCUE-READY"
for b in /sys/block/vd*; do
    [ -e "$b" ] && echo "BYOI-RESCUE-DISK $(basename "$b") $(cat "$b/size") $(cat "$b/queue/logical_block_size")"
done
chroot $H /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/run/tmp TMPDIR=/run/tmp LANG=C.UTF-8 /bin/sh /run/xfer/run.sh > /tmp/stdout 2> /tmp/stderr
rc=$?
echo "BYOI-RESCUE-RC=$rc"
echo "BYOI-RESCUE-STDERR-BEGIN"
cat /tmp/stderr
echo "BYOI-RESCUE-STDERR-END"
echo "BYOI-RESCUE-STDOUT-BEGIN"
cat /tmp/stdout
echo "BYOI-RESCUE-STDOUT-END"
sync
umount $H/run/xfer
echo "BYOI-RESCUE-DONE"
poweroff -f

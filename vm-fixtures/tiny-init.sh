#!/bin/busybox sh
# Init of the tiny sample OS baked into the sample cloud images. It does what cloud-init's
# ConfigDrive datasource does, in a few lines of busybox sh, and reports on the serial console
# with BYOI-* markers that tests/vm reads back: which firmware booted it, the config drive it
# found, the hostname, keys and user data, and any GPT warning in the kernel log.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec 0</dev/console 1>/dev/console 2>&1

for m in $(cat /etc/modules-order); do insmod "/lib/modules/$m" 2>/dev/null; done

echo "BYOI-TINY-BOOTED"
if [ -d /sys/firmware/efi ]; then echo "BYOI-BOOTMODE=uefi"; else echo "BYOI-BOOTMODE=bios"; fi
echo "BYOI-CMDLINE=$(cat /proc/cmdline)"
for q in /sys/block/vd*/queue/logical_block_size /sys/block/nvme*/queue/logical_block_size \
    /sys/block/sd*/queue/logical_block_size; do
    [ -e "$q" ] && echo "BYOI-SECTOR-SIZE=$(cat "$q")"
done

dev=""
i=0
while [ $i -lt 20 ]; do
    dev=$(blkid -L config-2 2>/dev/null || blkid -L CONFIG-2 2>/dev/null)
    [ -n "$dev" ] && break
    sleep 0.5
    i=$((i + 1))
done
blkid 2>/dev/null | while read -r line; do echo "BYOI-BLKID $line"; done

if [ -z "$dev" ]; then
    echo "BYOI-CONFIGDRIVE=none"
else
    fstype=$(blkid -o value -s TYPE "$dev")
    echo "BYOI-CONFIGDRIVE=$dev $fstype"
    mkdir -p /mnt/config
    if mount -o ro -t "$fstype" "$dev" /mnt/config; then
        d=/mnt/config/openstack/latest
        [ -d "$d" ] || d=$(ls -d /mnt/config/OPENSTACK/LATEST 2>/dev/null)
        echo "BYOI-META-BEGIN"
        cat "$d/meta_data.json"
        echo
        echo "BYOI-META-END"
        host=$(sed -n 's/.*"hostname" *: *"\([^"]*\)".*/\1/p' "$d/meta_data.json")
        echo "BYOI-HOSTNAME=$host"
        if [ -f "$d/user_data" ]; then
            if [ "$(head -c 2 "$d/user_data")" = "#!" ]; then
                cp "$d/user_data" /tmp/user_data
                chmod +x /tmp/user_data
                echo "BYOI-USERDATA-BEGIN"
                /tmp/user_data
                echo "BYOI-USERDATA-RC=$?"
                echo "BYOI-USERDATA-END"
            else
                echo "BYOI-USERDATA=not-a-script"
            fi
        else
            echo "BYOI-USERDATA=none"
        fi
        umount /mnt/config
    else
        echo "BYOI-CONFIGDRIVE-MOUNT-FAILED"
    fi
fi

dmesg > /tmp/dmesg
grep -E "GPT:|Alternate GPT|GPT header|[Cc]orrupt" /tmp/dmesg | while read -r line; do
    echo "BYOI-GPT-WARNING $line"
done
echo "BYOI-PARTITIONS-BEGIN"
cat /proc/partitions
echo "BYOI-PARTITIONS-END"
echo "BYOI-TINY-DONE"
poweroff -f

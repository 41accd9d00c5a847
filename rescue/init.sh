#!/bin/sh
# /init of the BYOI rescue initramfs (PID 1). It mounts the kernel file systems (efivarfs too,
# so efibootmgr can write boot entries under UEFI), loads NIC and disk drivers, configures every
# NIC by DHCP, then runs `byoi-agent serve` with settings from the kernel command line:
#
#   byoi.listen=HOST:PORT       API address (default 0.0.0.0:8080)
#   byoi.token=TOKEN            API bearer token, or
#   byoi.token_url=URL          where to fetch it (HTTP GET; keeps it off /proc/cmdline)
#   byoi.callback=URL           orchestrator callback: announce + status events
#   byoi.callback_token=TOKEN   the callbacks' own bearer token (never the API token), or
#   byoi.callback_token_url=URL where to fetch it
#   byoi.disk=/dev/X            explicit target disk
#   byoi.hint=KEY=VALUE         root device hint, repeatable
#
# Progress goes to the console as BYOI-RESCUE-* lines. The agent is restarted if it dies;
# PID 1 never exits.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run /tmp
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
exec 0</dev/console 1>/dev/console 2>&1
echo "BYOI-RESCUE-INIT $(cat /etc/byoi/kernel-release)"

failed=""
while read -r ko; do
    [ -n "$ko" ] || continue
    # efivarfs refuses to load on a legacy boot
    [ "$ko" = efivarfs.ko ] && [ ! -d /sys/firmware/efi ] && continue
    busybox insmod "/lib/modules/byoi/$ko" 2>/dev/null || failed="$failed ${ko%.ko}"
done </lib/modules/byoi/order
# Drivers for hardware that is absent load fine; a failure here means a broken module set.
[ -z "$failed" ] || echo "BYOI-RESCUE-NOTE modules not loaded:$failed"

if [ -d /sys/firmware/efi ]; then
    mount -t efivarfs efivarfs /sys/firmware/efi/efivars || echo "BYOI-RESCUE-NOTE no efivarfs"
    echo "BYOI-RESCUE-BOOTMODE=uefi"
else
    echo "BYOI-RESCUE-BOOTMODE=bios"
fi

LISTEN=0.0.0.0:8080
TOKEN=""
TOKEN_URL=""
CALLBACK=""
CALLBACK_TOKEN=""
CALLBACK_TOKEN_URL=""
DISK=""
HINTS=""
set -f # words are split (command line, hints) but never globbed from here on
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        byoi.listen=*) LISTEN="${arg#byoi.listen=}" ;;
        byoi.token=*) TOKEN="${arg#byoi.token=}" ;;
        byoi.token_url=*) TOKEN_URL="${arg#byoi.token_url=}" ;;
        byoi.callback=*) CALLBACK="${arg#byoi.callback=}" ;;
        byoi.callback_token=*) CALLBACK_TOKEN="${arg#byoi.callback_token=}" ;;
        byoi.callback_token_url=*) CALLBACK_TOKEN_URL="${arg#byoi.callback_token_url=}" ;;
        byoi.disk=*) DISK="${arg#byoi.disk=}" ;;
        byoi.hint=*) HINTS="$HINTS --hint ${arg#byoi.hint=}" ;;
    esac
done

busybox hostname byoi-rescue
busybox ip link set lo up
# Devices appear asynchronously after the driver loads.
i=0
while [ $i -lt 50 ] && ! ls /sys/class/net | grep -qv '^lo$'; do
    sleep 0.2
    i=$((i + 1))
done
: >/run/byoi-address
for nic in $(ls /sys/class/net); do
    [ "$nic" = lo ] && continue
    busybox ip link set "$nic" up
    # -n: give up rather than loop forever on a NIC without DHCP; -q: quit once configured.
    if busybox udhcpc -i "$nic" -s /etc/byoi/udhcpc.sh -q -n -t 8 -T 2 >/dev/null 2>&1; then
        addr=$(busybox ip -4 -o addr show dev "$nic" | sed -n 's/.* inet \([0-9.]*\).*/\1/p')
        echo "BYOI-RESCUE-NET $nic $addr"
        [ -s /run/byoi-address ] || echo "$addr" >/run/byoi-address
    else
        echo "BYOI-RESCUE-NET $nic no-dhcp"
    fi
done

mkdir -p /run/byoi
umask 077
# fetch_token URL VALUE FILE: the token from URL (retried) or VALUE, into FILE
fetch_token() {
    if [ -n "$1" ]; then
        i=0
        until busybox wget -q -O "$3" "$1"; do
            i=$((i + 1))
            if [ $i -ge 30 ]; then
                echo "BYOI-RESCUE-ERROR cannot fetch $3"
                break
            fi
            sleep 2
        done
    elif [ -n "$2" ]; then
        printf '%s\n' "$2" >"$3"
    fi
}
fetch_token "$TOKEN_URL" "$TOKEN" /run/byoi/token
fetch_token "$CALLBACK_TOKEN_URL" "$CALLBACK_TOKEN" /run/byoi/callback-token
umask 022
[ -s /run/byoi/token ] || echo "BYOI-RESCUE-ERROR no API token (byoi.token or byoi.token_url)"

set -- serve --listen "$LISTEN" --token-file /run/byoi/token
[ -n "$CALLBACK" ] && set -- "$@" --callback-url "$CALLBACK"
CALLBACK_AUTH=""
if [ -n "$CALLBACK" ] && [ -s /run/byoi/callback-token ]; then
    set -- "$@" --callback-token-file /run/byoi/callback-token
    CALLBACK_AUTH="--token-file /run/byoi/callback-token"
fi
[ -n "$DISK" ] && set -- "$@" --disk "$DISK"
# shellcheck disable=SC2086 # one word per hint
set -- "$@" $HINTS

if [ -n "$CALLBACK" ]; then
    PYTHONPATH=/opt/byoi:/opt/byoi/site python3 /opt/byoi/announce.py \
        --callback "$CALLBACK" --listen "$LISTEN" $CALLBACK_AUTH \
        --address-file /run/byoi-address $HINTS &
fi

echo "BYOI-RESCUE-AGENT-START"
while :; do
    byoi-agent "$@"
    echo "BYOI-RESCUE-AGENT-EXIT rc=$?"
    sync
    sleep 3
done

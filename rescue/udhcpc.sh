#!/bin/sh
# busybox udhcpc event script: apply the lease (address, default route, DNS) with busybox ip.
# udhcpc exports interface, ip, mask (prefix length), router and dns.
case "$1" in
    deconfig)
        busybox ip link set "$interface" up
        busybox ip -4 addr flush dev "$interface"
        ;;
    bound | renew)
        busybox ip -4 addr flush dev "$interface"
        busybox ip addr add "$ip/${mask:-24}" dev "$interface"
        if [ -n "$router" ]; then
            busybox ip route replace default via "${router%% *}" dev "$interface"
        fi
        : >/etc/resolv.conf
        for server in $dns; do
            echo "nameserver $server" >>/etc/resolv.conf
        done
        ;;
esac
exit 0

#!/bin/busybox sh
# /init of the vmbalance lab guest: load the virtio balloon driver, start the workload named on the
# kernel command line (vmb.work=cpu,1,100), then take new workloads from the control serial port
# (ttyS1) one line at a time: "cpu THREADS DUTY", "mem RATE_MIB_S SIZE_MIB HOLD_S" or "idle".
# Each start is announced on the console (ttyS0) as "vmb: workload ...", which the host reads back
# from the console log as the acknowledgement.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_balloon; do
    insmod /lib/modules/$m.ko || echo "vmb: cannot load $m"
done
pid=
run() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    /bin/workload "$@" &
    pid=$!
    echo "vmb: workload $*"
}
work=$(sed -n 's/.*vmb\.work=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' ')
run ${work:-idle}
echo "vmb: ready"
stty -F /dev/ttyS1 raw -echo 2>/dev/null
while true; do
    while read -r line; do
        case "$line" in
            cpu\ *|mem\ *|idle) run $line ;;
            "") ;;
            *) echo "vmb: unknown command: $line" ;;
        esac
    done < /dev/ttyS1
    sleep 1
done

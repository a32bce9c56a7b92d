#!/usr/bin/env bash
# vmbalance lab: real QEMU guests under libvirt on this machine, for end-to-end tests and demos.
#
#   lab.sh setup DIR                 install packages, start libvirt, build kernel + initramfs in DIR
#   lab.sh define DIR NAME VCPUS CUR_MIB MAX_MIB PINS WORK
#                                    define and start guest vmblab-NAME; PINS: pCPU per vCPU,
#                                    pinned live once started (`-`: none); `N!` pins vCPU to N in
#                                    the persistent configuration instead, as an admin would
#                                    ("0,0" pins vCPU 0 and 1 to pCPU 0; "-" leaves them unpinned);
#                                    WORK: first workload, commas for spaces ("cpu,1,100")
#   lab.sh send DIR NAME 'COMMAND'   change a running guest's workload ("cpu 2 50", "mem 20 600 30",
#                                    "idle"); waits until the guest's console says it started it
#   lab.sh log DIR NAME              the guest's console log
#   lab.sh remove DIR NAME           destroy and undefine one of the lab's guests
#   lab.sh restart-libvirtd DIR [S]  stop the libvirtd the lab started, wait S seconds (3), start it
#                                    again (guests keep running)
#   lab.sh teardown DIR              destroy and undefine the lab's guests, stop the daemons the lab
#                                    started, remove DIR
#
# DIR must be outside the source tree; the guests' QEMU (user libvirt-qemu) must be able to reach
# it. Everything the lab creates is recorded in DIR so teardown removes exactly that.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
PACKAGES="libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 busybox-static kmod socat gcc libc6-dev"
MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_balloon"
URI=qemu:///system

die() { echo "lab: $*" >&2; exit 1; }
say() { echo "lab: $*" >&2; }
virsh_() { virsh -q -c "$URI" "$@"; }

need_root() { [ "$(id -u)" = 0 ] || die "the lab needs root (it installs packages and runs libvirtd)"; }

install_packages() {
    local missing=()
    for p in $PACKAGES; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# The socket as distributions mean it (Debian's libvirt-daemon-system, with systemd and polkit):
# members of the 'libvirt' group may manage, others may not. Without polkit running, libvirtd's
# built-in default (any user, then polkit) would refuse every unprivileged client.
write_libvirtd_conf() {
    cat > "$1/libvirtd.conf" <<'CONF'
unix_sock_group = "libvirt"
unix_sock_rw_perms = "0770"
unix_sock_ro_perms = "0777"
auth_unix_rw = "none"
auth_unix_ro = "none"
CONF
}

start_daemons() {
    local dir=$1
    if virsh -c "$URI" version >/dev/null 2>&1; then
        say "libvirt is already running; using it"
        return
    fi
    # libvirt probes QEMU at start; with /dev/kvm mode 0600 each define then takes ~50 s.
    if [ -e /dev/kvm ]; then chown root:kvm /dev/kvm && chmod 0660 /dev/kvm; fi
    mkdir -p /var/run/libvirt /var/log/libvirt/qemu
    if ! pgrep -x virtlogd >/dev/null; then
        virtlogd -d -p "$dir/virtlogd.pid"
        echo virtlogd >> "$dir/started"
    fi
    write_libvirtd_conf "$dir"
    libvirtd -d -f "$dir/libvirtd.conf" -p "$dir/libvirtd.pid"
    echo libvirtd >> "$dir/started"
    for _ in $(seq 100); do virsh -c "$URI" version >/dev/null 2>&1 && return; sleep 0.2; done
    die "libvirtd did not come up"
}

build_guest_image() {
    local dir=$1
    [ -s "$dir/initrd.gz" ] && [ -s "$dir/vmlinuz" ] && return
    local work=$dir/build
    rm -rf "$work" && mkdir -p "$work/kx" "$work/root/bin" "$work/root/lib/modules" "$work/root/proc" "$work/root/sys" "$work/root/dev"
    local pkg
    pkg=$(apt-cache depends linux-image-amd64 | grep -o 'linux-image-[0-9][^ ]*-amd64' | head -1)
    [ -n "$pkg" ] || { apt-get update -qq; pkg=$(apt-cache depends linux-image-amd64 | grep -o 'linux-image-[0-9][^ ]*-amd64' | head -1); }
    [ -n "$pkg" ] || die "no linux-image package found"
    say "fetching $pkg (not installed, only unpacked)"
    (cd "$work" && apt-get download -qq "$pkg" 2>/dev/null) || die "apt-get download $pkg failed"
    dpkg-deb -x "$work"/linux-image-*.deb "$work/kx"
    local kver
    kver=$(ls "$work/kx/lib/modules")
    for m in $MODULES; do
        cp "$(find "$work/kx/lib/modules/$kver" -name "$m.ko" | head -1)" "$work/root/lib/modules/" || die "module $m missing"
    done
    cp /bin/busybox "$work/root/bin/busybox"
    gcc -O2 -static -pthread -o "$work/root/bin/workload" "$here/workload.c"
    cp "$here/init.sh" "$work/root/init" && chmod 755 "$work/root/init"
    (cd "$work/root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$dir/initrd.gz"
    cp "$work/kx/boot/vmlinuz-$kver" "$dir/vmlinuz"
    rm -rf "$work"
}

# KVM where it really works (a guest boots), TCG otherwise.
probe_accel() {
    local dir=$1
    [ -s "$dir/accel" ] && return
    local accel=qemu
    if [ -w /dev/kvm ] && [ "${VMB_LAB_ACCEL:-auto}" != tcg ]; then
        if timeout 25 qemu-system-x86_64 -accel kvm -m 128 -display none -nodefaults -serial stdio \
            -kernel "$dir/vmlinuz" -initrd "$dir/initrd.gz" -append "console=ttyS0 quiet" 2>/dev/null \
            | grep -q -m1 "vmb: ready"; then
            accel=kvm
        fi
    fi
    echo "$accel" > "$dir/accel"
    say "guests run with domain type '$accel'"
}

cmd_setup() {
    local dir=${1:?usage: lab.sh setup DIR}
    need_root
    case "$(realpath -m "$dir")/" in "$(realpath "$here/..")"/*) die "DIR must be outside the source tree";; esac
    mkdir -p "$dir/sock" "$dir/log"
    dir=$(realpath "$dir")
    install_packages
    start_daemons "$dir"
    build_guest_image "$dir"
    probe_accel "$dir"
    chmod 755 "$dir" "$dir/log"
    chown libvirt-qemu "$dir/sock" 2>/dev/null || chmod 777 "$dir/sock"
    say "ready in $dir"
}

cmd_define() {
    local dir name vcpus cur max pins work
    dir=$(realpath "${1:?}"); name=vmblab-${2:?}; vcpus=${3:?}; cur=${4:?}; max=${5:?}; pins=${6:?}; work=${7:-idle}
    [ -s "$dir/accel" ] || die "run 'lab.sh setup $dir' first"
    # Pins marked N! go in the configuration (an admin's restriction); plain ones are made live
    # after the start, the way a previous placement would leave them.
    local cputune="" live=()
    if [ "$pins" != - ]; then
        local i=0
        cputune="<cputune>"
        for p in ${pins//,/ }; do
            case "$p" in
                *!) cputune+="<vcpupin vcpu='$i' cpuset='${p%!}'/>" ;;
                *) live+=("$i:$p") ;;
            esac
            i=$((i + 1))
        done
        cputune+="</cputune>"
    fi
    # Redefining one of the lab's own guests replaces it.
    if grep -qx "$name" "$dir/domains" 2>/dev/null; then
        virsh_ destroy "$name" >/dev/null 2>&1 || true
        virsh_ undefine "$name" >/dev/null 2>&1 || true
    fi
    rm -f "$dir/sock/$name.sock" "$dir/log/$name.log"
    cat > "$dir/$name.xml" <<XML
<domain type='$(cat "$dir/accel")'>
  <name>$name</name>
  <memory unit='MiB'>$max</memory>
  <currentMemory unit='MiB'>$cur</currentMemory>
  <vcpu placement='static'>$vcpus</vcpu>
  $cputune
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$dir/vmlinuz</kernel>
    <initrd>$dir/initrd.gz</initrd>
    <cmdline>console=ttyS0 quiet vmb.work=$work</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='pty'><log file='$dir/log/$name.log' append='off'/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path='$dir/sock/$name.sock'/><target port='1'/></serial>
    <memballoon model='virtio'/>
  </devices>
</domain>
XML
    virsh_ define "$dir/$name.xml" >/dev/null
    grep -qx "$name" "$dir/domains" 2>/dev/null || echo "$name" >> "$dir/domains"
    virsh_ start "$name" >/dev/null
    local pin
    for pin in "${live[@]}"; do
        virsh_ vcpupin "$name" "${pin%%:*}" "${pin#*:}" --live >/dev/null
    done
}

cmd_send() {
    local dir name cmd
    dir=$(realpath "${1:?}"); name=vmblab-${2:?}; cmd=${3:?}
    local log=$dir/log/$name.log before
    before=$(grep -c "^vmb: workload " "$log" || true)
    [ -S "$dir/sock/$name.sock" ] || die "$name has no control port (is it running?)"
    # Stay connected until the guest has read the line: QEMU drops what a closed client left unread.
    printf '%s\n' "$cmd" | socat -t 40 - "UNIX-CONNECT:$dir/sock/$name.sock" >/dev/null 2>&1 &
    local writer=$!
    # The guest announces each workload it starts on its console.
    for _ in $(seq 150); do
        if [ "$(grep -c "^vmb: workload " "$log" || true)" -gt "$before" ]; then
            kill "$writer" 2>/dev/null || true
            return 0
        fi
        sleep 0.2
    done
    kill "$writer" 2>/dev/null || true
    die "$name did not start '$cmd' within 30 s"
}

cmd_remove() {
    local dir name
    dir=$(realpath "${1:?}"); name=vmblab-${2:?}
    grep -qx "$name" "$dir/domains" 2>/dev/null || die "$name is not one of this lab's guests"
    virsh_ destroy "$name" >/dev/null 2>&1 || true
    virsh_ undefine "$name" >/dev/null 2>&1 || true
    grep -vx "$name" "$dir/domains" > "$dir/domains.new" || true
    mv "$dir/domains.new" "$dir/domains"
}

cmd_restart_libvirtd() {
    local dir; dir=$(realpath "${1:?}")
    grep -qx libvirtd "$dir/started" 2>/dev/null || die "this lab did not start libvirtd; it will not restart it"
    local pid; pid=$(cat "$dir/libvirtd.pid")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    sleep "${2:-3}"
    libvirtd -d -f "$dir/libvirtd.conf" -p "$dir/libvirtd.pid"
    for _ in $(seq 100); do virsh -c "$URI" version >/dev/null 2>&1 && return; sleep 0.2; done
    die "libvirtd did not come back"
}

cmd_log() {
    local dir; dir=$(realpath "${1:?}")
    cat "$dir/log/vmblab-${2:?}.log"
}

cmd_teardown() {
    local dir=${1:?usage: lab.sh teardown DIR}
    [ -d "$dir" ] || return 0
    dir=$(realpath "$dir")
    if [ -f "$dir/domains" ]; then
        while read -r name; do
            virsh_ destroy "$name" >/dev/null 2>&1 || true
            virsh_ undefine "$name" >/dev/null 2>&1 || true
        done < "$dir/domains"
    fi
    # Wait until each daemon is gone, so a lab set up right after starts its own.
    for d in libvirtd virtlogd; do
        if grep -qx "$d" "$dir/started" 2>/dev/null && [ -s "$dir/$d.pid" ]; then
            local pid; pid=$(cat "$dir/$d.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
    rm -rf "$dir"
}

case "${1:-}" in
    setup|define|send|log|remove|teardown) c=$1; shift; "cmd_$c" "$@" ;;
    restart-libvirtd) shift; cmd_restart_libvirtd "$@" ;;
    *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac

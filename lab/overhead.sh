#!/usr/bin/env bash
# Daemon overhead on real guests: CPU time each daemon spends per cycle at PERIOD=1, and the
# libvirt calls it makes per cycle, with four busy guests and then with idle guests added up to
# each larger count. Part of BENCHMARKS.md.
#
#   lab/overhead.sh [CYCLES [GUESTS...]]   (root; builds the release binaries and a lab of its own)
#   e.g. lab/overhead.sh 60 4 16
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$here/..
cycles=${1:-120}
shift || true
sizes=("${@:-4}")
dir=${VMB_OVERHEAD_DIR:-/tmp/vmbalance-overhead}
trap '"$here/lab.sh" teardown "$dir"' EXIT
(cd "$root" && make -s build >/dev/null)
"$here/lab.sh" setup "$dir"
for i in 0 1 2 3; do "$here/lab.sh" define "$dir" "load$i" 1 256 512 "$((i % 2))" cpu,1,50; done
guests=4

# User + system CPU time of one daemon run (bash's `time`), per cycle, and its mean libvirt calls
# per cycle from its debug log (the first cycle, which discovers pins and switches stats on, apart).
measure() {
    local name=$1; shift
    local log; log=$(mktemp)
    local TIMEFORMAT='%U %S'
    local t
    t=$( { time "$root/bin/$name" --connect qemu:///system -v --cycles "$cycles" 1 2>"$log" >/dev/null; } 2>&1 )
    local user sys calls
    read -r user sys <<<"$t"
    calls=$(grep -o '[0-9]* libvirt calls this cycle' "$log" | tail -n +2 | awk '{s+=$1; n++} END {if (n) printf "%.1f", s/n}')
    awk -v n="$name" -v g="$guests" -v u="$user" -v s="$sys" -v c="$cycles" -v k="$calls" 'BEGIN {
        cpu = (u + s) / c;
        printf "| %s | %d | %d | %.2f ms | %.3f %% | %s |\n", n, g, c, cpu * 1000, cpu * 100, k }'
    rm -f "$log"
}
rows=()
for size in "${sizes[@]}"; do
    while [ "$guests" -lt "$size" ]; do
        "$here/lab.sh" define "$dir" "idle$guests" 1 128 256 "$((guests % 2))" idle
        guests=$((guests + 1))
    done
    sleep $((12 + guests))
    rows+=("$(measure vcpu_scheduler)" "$(measure memory_coordinator)")
done
echo
echo "| daemon | guests | cycles at PERIOD=1 | CPU time per cycle | share of one core | libvirt calls per cycle (after the first) |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
printf '%s\n' "${rows[@]}"

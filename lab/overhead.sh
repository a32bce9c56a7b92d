#!/usr/bin/env bash
# Daemon overhead on real guests: CPU time each daemon spends per cycle at PERIOD=1, and the
# libvirt calls it makes per cycle, with four busy guests and then with idle guests added up to
# each larger count. Part of BENCHMARKS.md.
#
#   lab/overhead.sh [CYCLES [GUESTS...]]   (root; builds the release binaries and a lab of its own)
#   e.g. lab/overhead.sh 60 4 16
#
# With VMB_OVERHEAD_METRICS=1 each daemon also serves its metrics (--metrics-address) and is
# scraped once a second, as Prometheus would, for the whole measurement.
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

# CPU time one daemon spends per steady cycle: the run-time of all its threads (from
# /proc/PID/task/*/schedstat, in ns) between the end of cycle 2 and the end of cycle CYCLES+2,
# divided by CYCLES, so start-up, connection and the first cycle (which discovers pins and switches
# stats on) are left out; and its mean libvirt calls per cycle over the same cycles, from the
# `libvirt_calls` of its --json reports (one line per cycle on stdout).
cpu_ns() {
    local pid=$1 total=0 t
    for t in /proc/"$pid"/task/*/schedstat; do
        total=$((total + $(cut -d' ' -f1 "$t" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
wait_for_cycle() {
    local json=$1 n=$2
    until [ "$(wc -l <"$json")" -ge "$n" ]; do sleep 0.05; done
}
metrics=${VMB_OVERHEAD_METRICS:-0}
# GET /metrics from 127.0.0.1:$1 once a second while process $2 lives (bash's /dev/tcp: no client
# to install).
scrape_every_second() {
    local port=$1 pid=$2
    while kill -0 "$pid" 2>/dev/null; do
        if exec 3<>"/dev/tcp/127.0.0.1/$port" 2>/dev/null; then
            printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
            cat <&3 >/dev/null
            exec 3<&-
        fi
        sleep 1
    done
}
measure() {
    local name=$1
    local json; json=$(mktemp)
    local extra=() port=$((19000 + RANDOM % 1000))
    [ "$metrics" = 1 ] && extra=(--metrics-address "127.0.0.1:$port")
    "$root/bin/$name" --connect qemu:///system -q --json "${extra[@]}" --cycles "$((cycles + 3))" 1 >"$json" &
    local pid=$!
    [ "$metrics" = 1 ] && scrape_every_second "$port" "$pid" &
    wait_for_cycle "$json" 2
    local start; start=$(cpu_ns "$pid")
    wait_for_cycle "$json" "$((cycles + 2))"
    local end; end=$(cpu_ns "$pid")
    wait "$pid"
    local calls
    calls=$(sed -n "3,$((cycles + 2))p" "$json" | grep -o '"libvirt_calls":[0-9]*' | cut -d: -f2 |
        awk '{s+=$1; n++} END {if (n) printf "%.1f", s/n}')
    awk -v n="$name" -v g="$guests" -v c="$cycles" -v ns="$((end - start))" -v k="$calls" 'BEGIN {
        cpu = ns / c / 1e9;
        printf "| %s | %d | %d | %.2f ms | %.3f %% | %s |\n", n, g, c, cpu * 1000, cpu * 100, k }'
    rm -f "$json"
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
[ "$metrics" = 1 ] && echo "(metrics served and scraped once a second)"
echo "| daemon | guests | steady cycles at PERIOD=1 | CPU time per cycle | share of one core | libvirt calls per cycle |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
printf '%s\n' "${rows[@]}"

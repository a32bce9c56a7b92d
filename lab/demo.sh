#!/usr/bin/env bash
# make demo: watch both daemons fix a real host. Sets up the lab, crowds four busy guests onto one
# pCPU and runs vcpu_scheduler for about a minute; then starts a memory hog beside two idle guests
# and runs memory_coordinator for about two minutes. Cleans up after itself, even on Ctrl-C.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$here/../bin
dir=${VMB_DEMO_DIR:-/tmp/vmbalance-demo}
lab() { "$here/lab.sh" "$1" "$dir" "${@:2}"; }

trap 'echo; echo "== cleaning up"; "$here/lab.sh" teardown "$dir"' EXIT
lab setup

echo
echo "== vcpu_scheduler: four busy single-vCPU guests, all pinned to pCPU 0"
for i in 0 1 2 3; do lab define "busy$i" 1 192 192 0 cpu,1,100; done
sleep 10
"$bin/vcpu_scheduler" --connect qemu:///system --cycles 20 --json 3 > "$dir/vcpu_scheduler.jsonl"
echo
echo "pins now (virsh vcpupin):"
for i in 0 1 2 3; do printf '  vmblab-busy%s: vCPU0 on pCPU %s\n' "$i" "$(virsh -q -c qemu:///system vcpupin "vmblab-busy$i" | awk '{print $2}')"; done
for i in 0 1 2 3; do lab remove "busy$i"; done

echo
echo "== memory_coordinator: a guest that will allocate 500 MiB at 10 MiB/s, beside two idle guests"
lab define hog 1 256 1024 0 idle
lab define idle0 1 512 512 1 idle
lab define idle1 1 512 512 1 idle
sleep 10
( sleep 12; echo "   >>> the hog starts allocating (it will hold 500 MiB for 20 s, then free it)" >&2
  lab send hog "mem 10 500 20" ) &
"$bin/memory_coordinator" --connect qemu:///system --cycles 60 --json 2 > "$dir/memory_coordinator.jsonl"
wait
if grep -q "Out of memory" "$dir/log/vmblab-hog.log"; then
    echo "the hog was OOM-killed"
else
    echo "the hog got its memory without being OOM-killed: $(grep -c 'workload: reached' "$dir/log/vmblab-hog.log") time(s) it reached its goal"
fi

echo
echo "== pictures of both runs"
pictures=${VMB_DEMO_PICTURES:-$PWD}
for d in vcpu_scheduler memory_coordinator; do
    "$bin/vmbalance_plot" "$dir/$d.jsonl" -o "$pictures/demo-$d.svg"
done
echo "open them in a browser: $pictures/demo-vcpu_scheduler.svg $pictures/demo-memory_coordinator.svg"

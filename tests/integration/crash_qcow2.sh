#!/usr/bin/env bash
# Crash consistency of qcow2: 60 SIGKILLs of a writer over several layouts
# (tests/crash/crash.sh does the work: after each kill vdisk check and
# qemu-img check must find no corruption, leaks allowed, and every flushed
# write must be there). Small clusters make refcount blocks appear often;
# 512-byte clusters with 64-bit refcounts make the refcount table grow.
here=$(dirname "$0")
n=${CRASH_POINTS:-}
run() {   # tag points args...
    local tag=$1 pts=$2; shift 2
    bash "$here/../crash/crash.sh" qcow2 "$@" "${n:-$pts}" | sed -E "s/^(not )?ok [0-9]+/&-$tag/"
}
run default 18 -t writeback
run c4k 12 -o cluster_size=4096 -t writeback
run rtgrow 8 -o cluster_size=512,refcount_bits=64 -s 16M -t writeback
run lazy 8 -o lazy_refcounts=on -t writeback
run extl2 6 -o extended_l2=on,cluster_size=32768 -t writeback
run v2 4 -o compat=0.10 -t writeback
run none 4 -t none

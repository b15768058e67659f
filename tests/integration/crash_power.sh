#!/usr/bin/env bash
# Crash consistency under a simulated power loss (tests/crash/crash.sh -P):
# the writer works through tests/helpers/plfs (FUSE), is killed, then a
# random subset of its writes not covered by a completed flush is lost.
# A few points per format and cache mode (make crash-power runs many);
# then a control: a writer whose flushes are skipped (cache=unsafe) must be
# caught, which plain SIGKILL never does (its writes sit in the page cache).
source "$(dirname "$0")/../lib.sh"
here=$(dirname "$0")
if [ ! -c /dev/fuse ]; then
    fail "power loss: FUSE is available" "/dev/fuse is missing: plfs cannot run (modprobe fuse; in a container: --device /dev/fuse)"
    exit 0
fi
if [ ! -x "$VDISK_BUILD/tests/helpers/plfs" ]; then
    fail "power loss: plfs is built" "$VDISK_BUILD/tests/helpers/plfs is missing (libfuse3-dev, make tests)"
    exit 0
fi
n=${CRASH_POINTS:-}
run() {   # tag points args...
    local tag=$1 pts=$2; shift 2
    bash "$here/../crash/crash.sh" "$@" -P "${n:-$pts}" | sed -E "s/^(not )?ok [0-9]+/&-$tag/"
}
run raw 3 raw -t writeback -s 32M
run raw-none 2 raw -t none -s 32M
run qcow2 4 qcow2 -t writeback
run qcow2-none 2 qcow2 -t none
run vmdk 3 vmdk -t writeback
run vhd 3 vhd -t writeback

# The control: every point must fail, each for a lost flushed write.
out=$(CRASH_KEEP=0 CRASH_POWER_KEEP=0 bash "$here/../crash/crash.sh" raw -P -t unsafe -s 32M 3 2>&1)
if [ "$(grep -c "^not ok" <<<"$out")" -ge 2 ] && [ "$(grep -c 'a flushed write covered it\|older than the last flushed write' <<<"$out")" -ge 2 ]; then
    ok "power loss catches a writer whose flushes are skipped (cache=unsafe)"
else
    fail "power loss catches a writer whose flushes are skipped (cache=unsafe)" "$(echo "$out" | head -4 | tr '\n' ' ')"
fi

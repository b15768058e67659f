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
run vmdk-none 2 vmdk -t none
run vhd 3 vhd -t writeback

# The control: every point must fail, each for a lost flushed write.
out=$(CRASH_KEEP=0 CRASH_POWER_KEEP=0 bash "$here/../crash/crash.sh" raw -P -t unsafe -s 32M 3 2>&1)
if [ "$(grep -c "^not ok" <<<"$out")" -ge 2 ] && [ "$(grep -c 'a flushed write covered it\|older than the last flushed write' <<<"$out")" -ge 2 ]; then
    ok "power loss catches a writer whose flushes are skipped (cache=unsafe)"
else
    fail "power loss catches a writer whose flushes are skipped (cache=unsafe)" "$(echo "$out" | head -4 | tr '\n' ' ')"
fi

# Regression: qcow2 wrote an L2 table (new ones durably) before the writes
# that grew the file into the clusters it points to were synced, so a power
# loss during the flush could keep the table and lose them: an entry past
# the end of the file, an error to vdisk check and qemu-img check and EIO to
# the guest. Deterministic points: the power goes during the first fsync.
CRASHIO=$VDISK_BUILD/tests/helpers/crashio PLFS=$VDISK_BUILD/tests/helpers/plfs
img=$T/reg.img mnt=$T/reg.mnt
pid=""
on_exit '[ -n "$pid" ] && kill -9 $pid 2>/dev/null; umount -l "$mnt" 2>/dev/null'
for opts in "" lazy_refcounts=on; do
    for seed in 1 2 3; do
        rm -f "$img" "$T/reg.journal" "$T/reg.log"; : > "$mnt"
        "$VDISK" create -q -f qcow2 ${opts:+-o $opts} "$img" 64M
        "$PLFS" -s $seed -p 50 -F 1 -l "$T/reg.log" "$img" "$mnt" & pid=$!
        for ((w = 0; w < 100; w++)); do grep -q '^plfs: mounted' "$T/reg.log" 2>/dev/null && break; sleep 0.05; done
        "$CRASHIO" write -f qcow2 -s $seed -n 40 -k 40 -b 16 -q 1 "$mnt" "$T/reg.journal" > /dev/null 2>&1
        kill -0 $pid 2>/dev/null && kill -USR1 $pid
        wait $pid; prc=$?; pid=""
        umount -l "$mnt" 2>/dev/null
        name="qcow2 ${opts:-default}: power loss during the first flush (seed $seed)"
        why=""
        grep -q '^plfs: power loss during fsync #1' "$T/reg.log" || why="plfs: no loss during the flush (exit $prc)"
        # a dirty image with lazy refcounts is repaired by any read-write open
        if [ -z "$why" ] && "$VDISK" info --output=json -f qcow2 "$img" 2>/dev/null | grep -q '"dirty-flag": true'; then
            "$VDISK" check -q -r all -f qcow2 "$img" > /dev/null 2>&1 || why="repair of the dirty image failed"
        fi
        if [ -z "$why" ]; then
            out=$("$VDISK" check -f qcow2 "$img" 2>&1); rc=$?
            case $rc in 0|3) ;; *) why="vdisk check exit $rc: $(grep -m2 ERROR <<<"$out" | tr '\n' ' ')" ;; esac
        fi
        if [ -z "$why" ]; then
            out=$(qemu-img check -f qcow2 "$img" 2>&1); rc=$?
            case $rc in 0|3) ;; *) why="qemu-img check exit $rc: $(grep -m2 ERROR <<<"$out" | tr '\n' ' ')" ;; esac
        fi
        [ -z "$why" ] && { out=$("$CRASHIO" verify -f qcow2 "$img" "$T/reg.journal" 2>&1) || why="verify: $(head -2 <<<"$out" | tr '\n' ' ')"; }
        if [ -z "$why" ]; then ok "$name"; else fail "$name" "$why; $(grep -m1 'power loss,' "$T/reg.log")"; fi
    done
done

# Regression: sparse VMDK wrote a grain's table entry (and a new table's
# directory entry) as soon as the grain was written, with no sync, so a
# power loss could keep the entry and lose the file's growth over the grain:
# an entry past the end of the file. Tables are now written at the flush,
# after the grains are synced. Deterministic points (plfs -F: the power goes
# during the k-th fsync); k=2 seed 1 failed before.
for point in "2 1" "2 2" "3 1" "4 3"; do
    set -- $point
    name="vmdk: power loss during fsync #$1 (seed $2)"
    if out=$(bash "$here/../crash/power-point.sh" vmdk -k "$1" -s "$2" 2>&1); then ok "$name"
    else fail "$name" "$(tail -3 <<<"$out" | tr '\n' ' ')"; fi
done

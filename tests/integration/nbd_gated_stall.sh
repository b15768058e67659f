#!/usr/bin/env bash
# One stalled NBD server must not starve the other gated disks of vdiskd.
# Exports whose qcow2 sits on an nbd+unix:// file are gated: their format
# calls (planning reads and writes, block status) run as jobs on the shared
# worker pool (block/loop.c), and a job waiting on a stopped server holds
# its worker until the server answers (the NBD client has no timeout of its
# own, so here that is until SIGCONT). Server 1 (nbdkit file dir=) serves
# two qcow2 images, exports a1 and a2: stopped with SIGSTOP, their planning
# holds both of the pool's base workers (VDISK_WORKERS=2). Server 2 serves
# export b: its reads and writes must still complete (the pool starts more
# workers past blocked ones), and once server 1 is back the stalled I/O of
# a1 and a2 completes with the right data. The 10 s bounds only detect a
# hang; they are not a measure.
source "$(dirname "$0")/../lib.sh"
source "$VDISK_ROOT/tests/helpers/nbd_common.bash"

for p in nbdkit qemu-img qemu-io; do
    command -v $p >/dev/null || { echo "1..0 # SKIP $p missing"; exit 0; }
done

wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.05; done; return 1; }

pids=()
stall_cleanup() {
    local p
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
    [ -n "${s1:-}" ] && kill -CONT "$s1" 2>/dev/null
    return 0
}
on_exit stall_cleanup

# Data everywhere the test reads or writes: no write needs a new cluster
# (the files behind an NBD export cannot grow).
mkdir "$T/s1" "$T/s2"
for img in s1/a1 s1/a2 s2/b; do
    qemu-img create -q -f qcow2 "$T/$img.qcow2" 64M
    qemu-io -f qcow2 -c "write -P 0x11 0 4M" -c "write -P 0x22 32M 4M" "$T/$img.qcow2" > /dev/null
done
nbdkit -U "$T/s1.sock" -P "$T/s1.pid" file dir="$T/s1"
nbdkit -U "$T/s2.sock" -P "$T/s2.pid" file dir="$T/s2"
on_exit 'kill $(cat "$T/s1.pid") $(cat "$T/s2.pid") 2>/dev/null'
wait_sock "$T/s1.sock" && wait_sock "$T/s2.sock" || { fail "nbdkit servers start"; exit 0; }

VDISK_WORKERS=2 start_vdiskd d --nbd "unix:$T/d.sock" --log-level=error \
    --export "name=a1,file=nbd+unix:///a1.qcow2?socket=$T/s1.sock,format=qcow2" \
    --export "name=a2,file=nbd+unix:///a2.qcow2?socket=$T/s1.sock,format=qcow2" \
    --export "name=b,file=nbd+unix:///b.qcow2?socket=$T/s2.sock,format=qcow2" || exit 1
A1="nbd+unix:///a1?socket=$T/d.sock"
A2="nbd+unix:///a2?socket=$T/d.sock"
B="nbd+unix:///b?socket=$T/d.sock"

# A fresh daemon has no L2 table cached: the first I/O of each export plans
# on a worker, which a stopped server holds.
s1=$(cat "$T/s1.pid")
kill -STOP "$s1"
n=0
for e in a1 a2; do
    uri="nbd+unix:///$e?socket=$T/d.sock"
    timeout 120 qemu-io -f raw -c "read -P 0x11 0 64k" -c "read -P 0x22 32M 64k" "$uri" > "$T/r.$e.out" 2>&1 &
    pids+=($!)
    timeout 120 qemu-io -f raw -c "write -P 0x33 1M 128k" "$uri" > "$T/w.$e.out" 2>&1 &
    pids+=($!)
    timeout 120 qemu-io -f raw -c "write -P 0x44 33M 64k" "$uri" > "$T/w2.$e.out" 2>&1 &
    pids+=($!)
done
sleep 1

t0=$(date +%s%N)
out=$(timeout 10 qemu-io -f raw -c "read -P 0x11 0 64k" -c "read -P 0x22 $((36 * 1048576 - 65536)) 64k" \
      -c "write -P 0x55 2M 256k" -c "read -P 0x55 2M 256k" -c "flush" "$B" 2>&1); rc=$?
el=$(( ($(date +%s%N) - t0) / 1000000 ))
out2=$(timeout 10 qemu-io -f raw -c "write -P 0x66 34M 64k" -c "read -P 0x66 34M 64k" \
       -c "read -P 0x55 2M 256k" "$B" 2>&1); rc2=$?
pending=0
for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && pending=$((pending + 1)); done

[ $rc -eq 0 ] && ! grep -q "Pattern verification failed" <<<"$out" \
    && ok "export b reads, writes and flushes while server 1 is stopped (${el} ms)" \
    || fail "export b reads, writes and flushes while server 1 is stopped" "rc $rc after ${el} ms: $out"
[ $rc2 -eq 0 ] && ! grep -q "Pattern verification failed" <<<"$out2" \
    && ok "a second connection to export b reads back what it wrote" \
    || fail "a second connection to export b reads back what it wrote" "rc $rc2: $out2"
[ $pending -eq ${#pids[@]} ] && ok "the I/O of a1 and a2 was still stalled meanwhile ($pending requests)" \
    || fail "the I/O of a1 and a2 was still stalled meanwhile" "$pending of ${#pids[@]} pending"

kill -CONT "$s1"; s1=
bad=0
for p in "${pids[@]}"; do wait "$p" || bad=$((bad + 1)); done
pids=()
if [ $bad -eq 0 ] && ! cat "$T"/r.*.out "$T"/w*.out | grep -q "Pattern verification failed"; then
    ok "once server 1 is back the stalled reads and writes complete"
else
    fail "once server 1 is back the stalled reads and writes complete" \
        "$bad failed: $(cat "$T"/r.*.out "$T"/w*.out | tr '\n' ' ' | head -c 600)"
fi
for e in a1 a2; do
    check "  export $e reads back the stalled writes and its data" \
        timeout 20 qemu-io -f raw -c "read -P 0x33 1M 128k" -c "read -P 0x44 33M 64k" \
        -c "read -P 0x11 0 1M" -c "read -P 0x22 34M 2M" "nbd+unix:///$e?socket=$T/d.sock"
done
stop_vdiskd d
check "qemu-img check of b after the daemon stopped" qemu-img check -q -f qcow2 "$T/s2/b.qcow2"
check "  b has the data written through vdiskd" qemu-io -f qcow2 -c "read -P 0x55 2M 256k" \
    -c "read -P 0x66 34M 64k" -c "read -P 0x11 0 1M" "$T/s2/b.qcow2"
for e in a1 a2; do
    check "qemu-img check of $e after the daemon stopped" qemu-img check -q -f qcow2 "$T/s1/$e.qcow2"
done
echo "1..$_n"

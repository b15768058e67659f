#!/usr/bin/env bash
# vdiskd's process life: SIGTERM / SIGINT while clients are busy (stop
# accepting, drain, flush, close), locks released, pidfile and sockets
# removed, syslog logging.
source "$(dirname "$0")/../lib.sh"
source "$VDISK_ROOT/tests/helpers/nbd_common.bash"

truncate -s 128M "$T/disk.raw"
rand_file "$T/src.raw" 64 seeds
S=$T/s.sock
U="nbd+unix:///?socket=$S"
head -c 65536 /dev/zero | tr '\0' K > "$T/k.bin"

for sig in TERM INT; do
    start_vdiskd d --nbd "unix:$S" --export "file=$T/disk.raw,format=raw" || exit 1
    # A flushed write must survive; then a big copy is cut off by the signal.
    nbdsh -u "$U" -c "h.pwrite(b'K' * 65536, 100 << 20); h.flush()"
    nbdcopy --connections=4 "$T/src.raw" "$U" 2>/dev/null &
    cp_pid=$!
    sleep 0.3
    t0=$(date +%s%N)
    kill -$sig "$d_pid"
    wait "$d_pid"; rc=$?
    ms=$((($(date +%s%N) - t0) / 1000000))
    wait $cp_pid 2>/dev/null
    if [ $rc -eq 0 ] && sanitizer_clean "$T/d.log"; then ok "SIG$sig with 4 busy connections: clean exit in $ms ms"
    else fail "SIG$sig with 4 busy connections: clean exit" "rc $rc $(grep -m3 -E 'Sanitizer|runtime error|#[0-9] ' "$T/d.log" | tr '\n' ' ')"; fi
    check "SIG$sig: flushed data is in the image" bash -o pipefail -c \
        "dd if='$T/disk.raw' bs=64k skip=1600 count=1 status=none | cmp - '$T/k.bin'"
    check "SIG$sig: socket and pidfile removed" bash -o pipefail -c "[ ! -e '$S' ] && [ ! -e '$T/d.pid' ]"
    check "SIG$sig: the log says it shut down" grep -q "shutting down" "$T/d.log"
done

# The lock went with the process: the image opens again at once.
start_vdiskd e --nbd "unix:$S" --export "file=$T/disk.raw,format=raw" || exit 1
check "the image can be served again after shutdown" nbdinfo --size "$U"
stop_vdiskd e

# Logging to syslog keeps stderr quiet.
start_vdiskd f --nbd "unix:$S" --log=syslog --log-level=debug --export "file=$T/disk.raw,format=raw" || exit 1
nbdinfo --size "$U" >/dev/null
stop_vdiskd f
check "--log=syslog writes nothing to stderr" bash -o pipefail -c "[ ! -s '$T/f.log' ]"
check_fails "--log-level=loud is refused" "$VDISKD" --log-level=loud --export "file=$T/disk.raw,format=raw"

# systemd socket activation with a named control socket and no --export.
rm -f "$S" "$T/c.sock"
systemd-socket-activate -l "$S" -l "$T/c.sock" --fdname=nbd:control "$VDISKD" 2>"$T/sa.log" &
sa=$!
on_exit "kill $sa 2>/dev/null"
# The socket file appears at bind(), just before listen(): wait until it answers.
for i in $(seq 100); do "$VDISK" ctl "$T/c.sock" query-version >/dev/null 2>&1 && break; sleep 0.05; done
check "activation: export-add on the passed control socket" "$VDISK" ctl "$T/c.sock" export-add "name=z,file=$T/disk.raw,format=raw"
check "activation: served on the passed NBD socket" nbdinfo --size "nbd+unix:///z?socket=$S"
check "activation: quit" "$VDISK" ctl "$T/c.sock" quit
wait $sa; rc=$?
if [ $rc -eq 0 ] && sanitizer_clean "$T/sa.log"; then ok "activation: clean exit"; else fail "activation: clean exit" "rc $rc"; fi

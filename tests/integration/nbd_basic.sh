#!/usr/bin/env bash
# vdiskd over NBD against real clients: nbdinfo, nbdcopy, qemu-img, qemu-io,
# over Unix and TCP sockets, stdio and socket activation.
source "$(dirname "$0")/../lib.sh"
source "$VDISK_ROOT/tests/helpers/nbd_common.bash"

S=$T/nbd.sock
U="nbd+unix:///disk?socket=$S"

# A sparse raw image: 64 MiB with 1 MiB of data at 1 MiB and at 5 MiB.
truncate -s 64M "$T/sparse.raw"
rand_file "$T/blob" 1 seed1
dd if="$T/blob" of="$T/sparse.raw" bs=1M seek=1 conv=notrunc status=none
dd if="$T/blob" of="$T/sparse.raw" bs=1M seek=5 conv=notrunc status=none
cp --sparse=always "$T/sparse.raw" "$T/expect.raw"

start_vdiskd d --nbd "unix:$S" --export "name=disk,file=$T/sparse.raw,format=raw,description=test disk" \
    --threads 2 || exit 1

# ---- nbdinfo ----
info=$(nbdinfo --json "$U")
jq_is "nbdinfo: size" "$info" '.exports[0]."export-size"' 67108864
jq_is "nbdinfo: structured replies" "$info" '.structured' true
jq_is "nbdinfo: multi-conn advertised" "$info" '.exports[0].can_multi_conn' true
jq_is "nbdinfo: block size min/pref/max" "$info" \
    '[.exports[0].block_size_minimum,.exports[0].block_size_preferred,.exports[0].block_size_maximum]|join(",")' \
    "1,4096,33554432"
jq_is "nbdinfo: contexts" "$info" '.exports[0].contexts|join(",")' "base:allocation,qemu:allocation-depth"
jq_is "nbdinfo: writable, trim, zero, fast zero, cache, df" "$info" \
    '[.exports[0].is_read_only,.exports[0].can_trim,.exports[0].can_zero,.exports[0].can_fast_zero,.exports[0].can_cache,.exports[0].can_df]|join(",")' \
    "false,true,true,true,true,true"
jq_is "nbdinfo: description" "$info" '.exports[0].description' "test disk"
check "nbdinfo: the empty name is the default export" \
    bash -o pipefail -c "[ \"\$(nbdinfo --size 'nbd+unix:///?socket=$S')\" = 67108864 ]"
check "nbdinfo --list names the export" bash -o pipefail -c "nbdinfo --list --json 'nbd+unix:///?socket=$S' | jq -e '.exports[0].\"export-name\" == \"disk\"'"
check_fails "nbdinfo: an unknown export is refused" nbdinfo --size "nbd+unix:///nosuch?socket=$S"

map=$(nbdinfo --map "$U" | awk '{print $1, $2, $3}' | tr '\n' ';')
exp="0 1048576 3;1048576 1048576 0;2097152 3145728 3;5242880 1048576 0;6291456 60817408 3;"
if [ "$map" = "$exp" ]; then ok "nbdinfo --map base:allocation matches the file's holes"
else fail "nbdinfo --map base:allocation matches the file's holes" "got $map"; fi
dmap=$(nbdinfo --map=qemu:allocation-depth "$U")
if awk '{s += $2} END {exit !(s == 67108864)}' <<<"$dmap" && grep -q local <<<"$dmap"; then
    ok "nbdinfo --map qemu:allocation-depth covers the disk"
else fail "nbdinfo --map qemu:allocation-depth covers the disk" "$dmap"; fi
tmap=$(nbdinfo --map --totals "$U")
check "nbdinfo --map --totals: 2 MiB of data" grep -qE '^ *2097152 +3\.1% +0 +data' <<<"$tmap"

# ---- nbdcopy round trips ----
check "nbdcopy export → file equals the image" bash -o pipefail -c "nbdcopy '$U' '$T/out1.raw' && cmp '$T/out1.raw' '$T/expect.raw'"
rand_file "$T/src.raw" 16 seed2
truncate -s 64M "$T/src.raw"
check "nbdcopy file → export (4 connections, flush)" nbdcopy --flush --connections=4 "$T/src.raw" "$U"
check "nbdcopy export → file round trip is identical" bash -o pipefail -c "nbdcopy '$U' '$T/out2.raw' && cmp '$T/src.raw' '$T/out2.raw'"
check "qemu-img compare with the source" qemu-img compare -f raw -F raw "$T/src.raw" "$U"

# ---- qemu as a client ----
qi=$(qemu-img info --output=json "$U")
jq_is "qemu-img info: virtual size" "$qi" '."virtual-size"' 67108864
check "qemu-img convert to qcow2 and compare" bash -o pipefail -c "qemu-img convert -O qcow2 '$U' '$T/c.qcow2' && qemu-img compare '$T/c.qcow2' '$U'"
check "qemu-io: unaligned writes and reads with patterns" qemu-io -f raw \
    -c 'write -P 0xa5 1000 70000' -c 'read -P 0xa5 1000 70000' \
    -c 'aio_write -P 0x5a 3000000 131072' -c 'aio_flush' -c 'read -P 0x5a 3000000 131072' \
    -c 'write -z 8M 1M' -c 'read -P 0 8M 1M' -c 'discard 9M 1M' -c 'flush' "$U"
check "qemu-io: write -z -u (may unmap) reads back zeros" qemu-io -f raw -c 'write -P 7 12M 64k' \
    -c 'write -z -u 12M 64k' -c 'read -P 0 12M 64k' "$U"

# ---- read-only export and a second listener over TCP ----
port=$((20000 + RANDOM % 20000))
cp "$T/expect.raw" "$T/ro.raw"
start_vdiskd r --nbd "tcp:127.0.0.1:$port" --export "file=$T/ro.raw,format=raw,readonly=on" || exit 1
R="nbd://127.0.0.1:$port/ro.raw"
rinfo=$(nbdinfo --json "$R")
jq_is "TCP: read-only export is flagged read-only" "$rinfo" '.exports[0].is_read_only' true
check "TCP: nbdcopy from the read-only export" bash -o pipefail -c "nbdcopy '$R' '$T/out3.raw' && cmp '$T/out3.raw' '$T/expect.raw'"
check_fails "read-only export refuses writes" qemu-io -f raw -c 'write -P 1 0 4096' "$R"
check "the read-only image is unchanged" cmp "$T/ro.raw" "$T/expect.raw"

# ---- image locking ----
out=$("$VDISKD" --nbd "unix:$T/other.sock" --export "file=$T/sparse.raw,format=raw" 2>&1); rc=$?
if [ $rc -ne 0 ] && grep -qi 'lock' <<<"$out" && ! grep -qE 'Sanitizer|runtime error' <<<"$out"; then
    ok "a second vdiskd on the same image fails with a clear message"
else fail "a second vdiskd on the same image fails with a clear message" "rc $rc: $out"; fi

# ---- stdio and socket activation ----
check "nbdinfo [ vdiskd --stdio ] (socket activation)" bash -o pipefail -c \
    "[ \"\$(nbdinfo --size -- [ '$VDISKD' --stdio --log-level=warning --export 'file=$T/expect.raw,format=raw,readonly=on' ])\" = 67108864 ]"
check "nbdsh connect_command: vdiskd --stdio on stdin/stdout" nbdsh -c "
h.connect_command(['$VDISKD', '--stdio', '--log-level=warning', '--export', 'file=$T/expect.raw,format=raw,readonly=on'])
assert h.get_size() == 67108864
assert h.pread(1048576, 1048576) == open('$T/blob', 'rb').read()
"
check "systemd-socket-activate: served on the passed socket" bash -o pipefail -c "
systemd-socket-activate -l '$T/act.sock' '$VDISKD' --log-level=warning --export 'file=$T/expect.raw,format=raw,readonly=on' >/dev/null 2>'$T/act.log' &
p=\$!; for i in \$(seq 100); do [ -S '$T/act.sock' ] && break; sleep 0.05; done
n=; for i in \$(seq 50); do n=\$(nbdinfo --size 'nbd+unix:///?socket=$T/act.sock' 2>/dev/null) && break; sleep 0.1; done
kill \$p; wait \$p; [ \"\$n\" = 67108864 ]"

# ---- bad command lines ----
check_fails "--export without file=" "$VDISKD" --nbd "unix:$T/x.sock" --export name=x
out=$(VDISK_POLL_NS=5ms "$VDISKD" --nbd "unix:$T/x.sock" --export "name=x,file=$T/x.raw,format=raw" 2>&1); rc=$?
[ $rc -eq 1 ] && grep -q "VDISK_POLL_NS=5ms: expected nanoseconds" <<<"$out" \
    && ok "an invalid VDISK_POLL_NS is refused by name" || fail "an invalid VDISK_POLL_NS is refused by name" "rc $rc: $out"
# Raw is never guessed: a guest could write an image header into its disk.
out=$("$VDISKD" --nbd "unix:$T/x.sock" --export "file=$T/expect.raw,readonly=on" 2>&1); rc=$?
if [ $rc -ne 0 ] && grep -q "format=raw" <<<"$out"; then ok "a raw image without format=raw is refused, naming format=raw"
else fail "a raw image without format=raw is refused, naming format=raw" "rc $rc: $out"; fi
check_fails "--export of a missing file" "$VDISKD" --nbd "unix:$T/x.sock" --export "file=$T/nosuch.raw,format=raw"
check_fails "--export with an unknown option" "$VDISKD" --nbd "unix:$T/x.sock" --export "file=$T/expect.raw,format=raw,readonly=on,bogus=1"
check_fails "--tls=maybe" "$VDISKD" --tls=maybe --export "file=$T/expect.raw,format=raw"
check_fails "--nbd with a bad address" "$VDISKD" --nbd "udp:1" --export "file=$T/expect.raw,format=raw,readonly=on"
check_fails "--nbd on a socket another server holds" "$VDISKD" --nbd "unix:$S" --export "file=$T/expect.raw,format=raw,readonly=on"
check "vdiskd --help" bash -c "'$VDISKD' --help > '$T/help.txt' && grep -q -- '--export' '$T/help.txt'"

nbdcopy "$U" "$T/final.raw"
stop_vdiskd d
stop_vdiskd r
check "what was written over NBD is in the image after shutdown" cmp "$T/sparse.raw" "$T/final.raw"
check "sockets and pidfiles are removed on exit" bash -o pipefail -c "[ ! -e '$S' ] && [ ! -e '$T/d.pid' ]"

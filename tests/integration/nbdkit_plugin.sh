#!/usr/bin/env bash
# nbdkit-vdisk-plugin: served images seen through nbdinfo, nbdcopy, nbdsh
# and qemu-io, checked against qemu-img / qemu-nbd and nbdkit's own file
# plugin on the same data.
source "$(dirname "$0")/../lib.sh"

for p in nbdkit nbdinfo nbdcopy nbdsh qemu-nbd qemu-img qemu-io jq; do
    command -v $p >/dev/null || { echo "1..0 # SKIP $p missing"; exit 0; }
done
PLUGIN=$VDISK_BUILD/lib/nbdkit-vdisk-plugin.so
[ -f "$PLUGIN" ] || { echo "1..0 # SKIP $PLUGIN not built"; exit 0; }

# The sanitizer build of the plugin needs the runtimes preloaded into nbdkit.
preload=
if ldd "$PLUGIN" | grep libasan >/dev/null; then   # not -q: ldd must not get SIGPIPE (pipefail)
    preload="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
fi
# nbdkit with the runtimes the plugin needs
nbdkit_p() { LD_PRELOAD=$preload ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 nbdkit "$@"; }
# nbdsh needs Debian's python (with the nbd module), not another one on PATH
nbdsh() { PATH=/usr/bin:$PATH command nbdsh "$@"; }
# serve NAME ARGS...: start nbdkit with the plugin on $T/NAME.sock; the
# URI is left in $uri. Its log is checked for sanitizer reports at the end.
serve() {
    local name=$1; shift
    rm -f "$T/$name.sock" "$T/$name.pid"
    nbdkit_p -U "$T/$name.sock" -P "$T/$name.pid" "$PLUGIN" "$@" 2>> "$T/nbdkit.log" || return 1
    on_exit "kill \$(cat '$T/$name.pid' 2>/dev/null) 2>/dev/null"
    uri="nbd+unix:///?socket=$T/$name.sock"
}
# stop NAME: end that server and wait until it is gone (data flushed)
stop() {
    local pid; pid=$(cat "$T/$1.pid" 2>/dev/null) || return 0
    kill "$pid" 2>/dev/null
    for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.05; done
}

# ---- sparse raw ----
raw=$T/sparse.raw
truncate -s 64M "$raw"
qemu-io -f raw -c "write -P 0x61 0 64k" -c "write -P 0x62 5M 1M" -c "write -P 0x63 63M 1M" "$raw" >/dev/null

serve raw format=raw "$raw" || { fail "nbdkit starts with the plugin on raw" "$(tail -3 "$T/nbdkit.log")"; exit 1; }
info=$(nbdinfo --json "$uri")
[ "$(jq '.exports[0]."export-size"' <<<"$info")" = 67108864 ] && ok "raw: nbdinfo size 64 MiB" \
    || fail "raw: nbdinfo size" "$info"
flags=$(jq -c '.exports[0] | [."is_read_only", ."can_multi_conn", ."can_fua", ."can_zero", ."can_trim", ."can_flush", ."block_size_minimum", ."block_size_preferred", ."block_size_maximum"]' <<<"$info")
[ "$flags" = '[false,true,true,true,true,true,1,4096,33554432]' ] \
    && ok "raw: nbdinfo flags and block sizes" || fail "raw: nbdinfo flags and block sizes" "$flags"
# block status equals nbdkit's own file plugin on the same file
nbdinfo --map "$uri" > "$T/v.map"
nbdkit -U "$T/file.sock" -P "$T/file.pid" file "$raw"
on_exit "kill \$(cat '$T/file.pid' 2>/dev/null) 2>/dev/null"
nbdinfo --map "nbd+unix:///?socket=$T/file.sock" > "$T/f.map"
stop file
if diff "$T/v.map" "$T/f.map" >/dev/null; then ok "raw: nbdinfo --map equals nbdkit file's"
else fail "raw: nbdinfo --map equals nbdkit file's" "$(diff "$T/v.map" "$T/f.map" | head -4 | tr '\n' ' ')"; fi
[ "$(awk '$4 == "data"' "$T/v.map" | wc -l)" = 3 ] && ok "raw: three data extents" \
    || fail "raw: three data extents" "$(cat "$T/v.map")"

# nbdcopy out (several connections: multi-conn) and compare
check "raw: nbdcopy out of the plugin" nbdcopy --connections=4 "$uri" "$T/copy.raw"
check "  cmp with the file" cmp "$T/copy.raw" "$raw"

# writes through the plugin: FUA, zero, trim; reference made with qemu-io on a copy
cp "$raw" "$T/ref.raw"
qemu-io -f raw -c "write -P 0x71 100k 300k" -c "write -z 5M 64k" -c "write -z 63M 4k" \
    -c "write -P 0x72 1023k 2k" "$T/ref.raw" >/dev/null
check "raw: qemu-io writes through the plugin" qemu-io -f raw \
    -c "write -P 0x71 100k 300k" -c "write -z 5M 64k" -c "write -P 0x72 1023k 2k" "$uri"
check "raw: nbdsh zero with FUA, trim, flush" nbdsh -u "$uri" -c '
h.zero(4096, 63*1024*1024, nbd.CMD_FLAG_FUA)
h.trim(65536, 30*1024*1024)
h.flush()
assert h.pread(4096, 63*1024*1024) == bytearray(4096)
'
check "raw: fast zero is refused or done, never slow" nbdsh -u "$uri" -c '
try:
    h.zero(65536, 40*1024*1024, nbd.CMD_FLAG_FAST_ZERO)
except nbd.Error as e:
    assert e.errnum == errno.ENOTSUP, e
assert h.pread(65536, 40*1024*1024) == bytearray(65536)
' 
stop raw
check "raw: the file equals the reference (qemu-img compare)" qemu-img compare -q -f raw -F raw "$raw" "$T/ref.raw"

# readonly=true
serve ro format=raw readonly=true "$raw" || fail "nbdkit starts read-only" "$(tail -3 "$T/nbdkit.log")"
[ "$(nbdinfo --json "$uri" | jq '.exports[0]."is_read_only"')" = true ] \
    && ok "readonly=true: the export is read-only" || fail "readonly=true: the export is read-only"
check_fails "readonly=true: a write fails" qemu-io -f raw -c "write 0 4k" "$uri"
stop ro

# ---- qcow2 ----
q=$T/img.qcow2
qemu-img create -q -f qcow2 "$q" 64M
qemu-io -f qcow2 -c "write -P 0x55 1M 2M" -c "write -z 8M 1M" -c "write -P 0xaa 20M 64k" "$q" >/dev/null
serve q2 "$q" || { fail "nbdkit starts with the plugin on qcow2" "$(tail -3 "$T/nbdkit.log")"; exit 1; }
nbdinfo --map "$uri" > "$T/vq.map"
qemu-nbd -k "$T/qn.sock" -f qcow2 -r --persistent --fork --pid-file "$T/qn.pid" "$q"
on_exit "kill \$(cat '$T/qn.pid' 2>/dev/null) 2>/dev/null"
nbdinfo --map "nbd+unix:///?socket=$T/qn.sock" > "$T/qq.map"
stop qn
if diff "$T/vq.map" "$T/qq.map" >/dev/null; then ok "qcow2: nbdinfo --map equals qemu-nbd's"
else fail "qcow2: nbdinfo --map equals qemu-nbd's" "$(diff "$T/vq.map" "$T/qq.map" | head -4 | tr '\n' ' ')"; fi
check "qcow2: nbdcopy out of the plugin" nbdcopy "$uri" "$T/q.raw"
check "  equals qemu-img's view" qemu-img compare -q -U -f raw -F qcow2 "$T/q.raw" "$q"
rand_file "$T/rand.raw" 8 plugin
check "qcow2: nbdcopy into the plugin (4 connections)" nbdcopy --connections=4 "$T/rand.raw" "$uri"
check "qcow2: qemu-io writes through the plugin" qemu-io -f raw -c "write -P 0x33 30M 1M" "$uri"
stop q2
qemu-io -f raw -c "write -P 0x33 30M 1M" "$T/q.raw" >/dev/null
dd if="$T/rand.raw" of="$T/q.raw" conv=notrunc status=none
check "qcow2: qemu-img check is clean after the writes" qemu-img check -q "$q"
check "qcow2: the image holds what was written (qemu-img compare)" qemu-img compare -q -f qcow2 -F raw "$q" "$T/q.raw"

# ---- a VMDK and a VHD made by qemu-img ----
for f in vmdk vpc; do
    img=$T/img.$f
    qemu-img convert -q -f raw -O $f "$T/q.raw" "$img"
    serve $f "$img" || { fail "$f: nbdkit starts" "$(tail -3 "$T/nbdkit.log")"; continue; }
    nbdcopy "$uri" "$T/$f.out" 2>/dev/null
    stop $f
    check "$f: nbdcopy out equals qemu-img's view" qemu-img compare -q -f raw -F $f "$T/$f.out" "$img"
done

# ---- bad input ----
# nbdkit exiting on a start-up error can deadlock in a TLS library's
# destructor under the preloaded sanitizer runtime, so these use the plain
# build of the plugin when there is one.
if [ -f "$VDISK_ROOT/build/lib/nbdkit-vdisk-plugin.so" ]; then
    PLUGIN=$VDISK_ROOT/build/lib/nbdkit-vdisk-plugin.so preload=
fi
nbdkit_p() { LD_PRELOAD=$preload ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 timeout 30 nbdkit "$@"; }
check_fails "a missing image stops nbdkit at start-up" \
    nbdkit_p -U "$T/bad.sock" -f "$PLUGIN" "$T/none.qcow2"
check_fails "an unknown parameter" nbdkit_p -U "$T/bad.sock" -f "$PLUGIN" "$q" colour=blue
check_fails "an unknown format" nbdkit_p -U "$T/bad.sock" -f "$PLUGIN" "$q" format=qed
check_fails "a raw file is not probed" nbdkit_p -U "$T/bad.sock" -f "$PLUGIN" "$raw"
printf 'QFI\xfb\0\0\0\3garbage' > "$T/bad.qcow2"; truncate -s 1M "$T/bad.qcow2"
check_fails "a corrupt qcow2 header" nbdkit_p -U "$T/bad.sock" -f "$PLUGIN" "$T/bad.qcow2"

if grep -qE 'AddressSanitizer|runtime error|LeakSanitizer' "$T/nbdkit.log"; then
    fail "no sanitizer report from the plugin" "$(grep -m3 -E 'ERROR|runtime error' "$T/nbdkit.log")"
else ok "no sanitizer report from the plugin"; fi
echo "1..$_n"

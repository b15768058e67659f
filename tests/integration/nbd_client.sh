#!/usr/bin/env bash
# The NBD client backend: vdisk info / map / convert / compare / io with
# nbd+unix:// names, against qemu-nbd and nbdkit as servers and qemu-img
# as the reference.
source "$(dirname "$0")/../lib.sh"

for p in qemu-nbd nbdkit nbdinfo qemu-img qemu-io jq; do
    command -v $p >/dev/null || { echo "1..0 # SKIP $p missing"; exit 0; }
done

# wait_sock PATH: until a server listens there
wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.05; done; return 1; }

# A qcow2 with data, zero clusters and unallocated space.
img=$T/src.qcow2
qemu-img create -q -f qcow2 "$img" 64M
qemu-io -f qcow2 -c "write -P 0x55 1M 2M" -c "write -z 8M 1M" -c "write -P 0xaa 20M 64k" \
    -c "write -P 0x11 63M 512k" "$img" >/dev/null

# qemu-nbd serves the qcow2's guest view (a raw export), read-only.
qsock=$T/q.sock
qemu-nbd -k "$qsock" -f qcow2 -r --persistent --fork --pid-file "$T/qn.pid" "$img"
on_exit 'kill $(cat "$T/qn.pid") 2>/dev/null'
wait_sock "$qsock" || fail "qemu-nbd started"
quri="nbd+unix:///?socket=$qsock"

# info: a raw export of the right size (as qemu-img sees it)
out=$($VDISK info "$quri" 2>&1)
if grep -q '^file format: raw$' <<<"$out" && grep -q '^virtual size: 64 MiB (67108864 bytes)$' <<<"$out"
then ok "info: raw, 64 MiB"; else fail "info: raw, 64 MiB" "$out"; fi
vs=$($VDISK info --output=json "$quri" | jq '."virtual-size"')
qs=$(qemu-img info --output=json "$quri" | jq '."virtual-size"')
[ "$vs" = "$qs" ] && ok "info --output=json: virtual-size equals qemu-img's ($vs)" \
    || fail "info --output=json: virtual-size" "vdisk $vs, qemu-img $qs"

# map: block status from base:allocation, as qemu-img reports it
$VDISK map --output=json -f raw "$quri" > "$T/v.map" 2>&1
qemu-img map --output=json -f raw "$quri" > "$T/q.map"
if diff "$T/v.map" "$T/q.map" >/dev/null; then ok "map --output=json equals qemu-img's"
else fail "map --output=json equals qemu-img's" "$(diff "$T/v.map" "$T/q.map" | head -5)"; fi
n=$(jq '[.[] | select(.data)] | length' "$T/v.map")
[ "$n" = 3 ] && ok "map: three data extents" || fail "map: three data extents" "got $n"

# convert from NBD: raw and qcow2 targets
check "convert -O raw from nbd+unix" $VDISK convert -O raw "$quri" "$T/out.raw"
check "  equals the source" qemu-img compare -q -U -F qcow2 "$T/out.raw" "$img"
check "convert -O qcow2 from nbd+unix" $VDISK convert -O qcow2 "$quri" "$T/out.qcow2"
check "  equals the source" qemu-img compare -q -U -f qcow2 -F qcow2 "$T/out.qcow2" "$img"
check "compare nbd+unix with the image" $VDISK compare -U "$quri" "$img"

# convert into an nbdkit memory export (the target exists: -n)
msock=$T/m.sock
nbdkit -U "$msock" -P "$T/m.pid" memory 64M
on_exit 'kill $(cat "$T/m.pid") 2>/dev/null'
wait_sock "$msock" || fail "nbdkit started"
muri="nbd+unix:///?socket=$msock"
check "convert -n into nbdkit memory" $VDISK convert -n -O raw "$img" "$muri"
check "  equals the source (qemu-img compare)" qemu-img compare -q -U -F qcow2 "$muri" "$img"
# zeros were not written: the export holds data only where the source does
data=$(nbdinfo --map --json "$muri" | jq '[.[] | select(.type == 0) | .length] | add')
[ "$data" = $((2*1048576 + 65536 + 524288)) ] && ok "  only the data was written ($data bytes)" \
    || fail "  only the data was written" "data bytes: $data"

# writes and reads through vdisk io, checked by qemu-io over the same export
check "io: write through nbd+unix" $VDISK io -f raw -c "write -P 0x77 4M 192k" -c "flush" "$muri"
check "  read back by qemu-io" qemu-io -f raw -c "read -P 0x77 4M 192k" "$muri"
check "io: write zeroes and discard" $VDISK io -f raw -c "write -z 4M 64k" -c "discard 4160k 64k" "$muri"
check "  reads as zeros" qemu-io -f raw -c "read -P 0 4M 128k" -c "read -P 0x77 4224k 64k" "$muri"

# a qcow2 stored in an NBD export (nbdkit file plugin): probed and read
fsock=$T/f.sock
cp "$img" "$T/inner.qcow2"
nbdkit -U "$fsock" -P "$T/f.pid" file "$T/inner.qcow2"
on_exit 'kill $(cat "$T/f.pid") 2>/dev/null'
wait_sock "$fsock" || fail "nbdkit file started"
furi="nbd+unix:///?socket=$fsock"
out=$($VDISK info "$furi" 2>&1)
grep -q '^file format: qcow2$' <<<"$out" && ok "info: a qcow2 inside an export is probed" \
    || fail "info: a qcow2 inside an export is probed" "$out"
check "convert a qcow2 read over NBD" $VDISK convert -O raw "$furi" "$T/inner.raw"
check "  equals the source" qemu-img compare -q -U -F qcow2 "$T/inner.raw" "$img"

# errors: no server, a read-only export, a write past the end
check_fails "info: no server at the socket" $VDISK info "nbd+unix:///?socket=$T/none.sock"
check_fails "convert -n into a read-only export" $VDISK convert -n -O raw "$img" "$quri"
check_fails "io: write past the end of the export" $VDISK io -f raw -c "write 64M 64k" "$muri"
check_fails "a malformed NBD name" $VDISK info "nbd+unix:///?sockt=$msock"

echo "1..$_n"

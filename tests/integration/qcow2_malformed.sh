#!/usr/bin/env bash
# Malformed qcow2 images: each must give a clear error and a non-zero exit,
# never a crash (sanitizers watch) or a hang.
source "$(dirname "$0")/../lib.sh"

# nohang CMD...: run with a time limit; a hang counts as a crash (rc 200).
nohang() {
    timeout 30 "$@"; local rc=$?
    if [ $rc -eq 124 ]; then echo "hang: $*" >&2; return 200; fi
    return $rc
}

# poke FILE OFFSET FORMAT VALUE: overwrite a big-endian field (struct format)
poke() { python3 -c "
import struct, sys
f, off, fmt, val = sys.argv[1], int(sys.argv[2], 0), sys.argv[3], int(sys.argv[4], 0) % (1 << 64)
with open(f, 'r+b') as h:
    h.seek(off); h.write(struct.pack('>' + fmt, val))
" "$@"; }
# peek FILE OFFSET FORMAT
peek() { python3 -c "
import struct, sys
with open(sys.argv[1], 'rb') as h:
    h.seek(int(sys.argv[2], 0)); print(struct.unpack('>' + sys.argv[3], h.read(struct.calcsize(sys.argv[3])))[0])
" "$@"; }

qemu-img create -q -f qcow2 "$T/template.qcow2" 4M
qemu-io -c "write -P 0x61 0 256k" -c "write -P 0x62 1M 64k" "$T/template.qcow2" >/dev/null
fresh() {   # name: a copy of a small image with some data
    local f=$T/$1.qcow2
    cp "$T/template.qcow2" "$f"
    echo "$f"
}

read_all() {   # read the whole virtual disk
    local n
    n=$(qemu-img info -U --output=json "$1" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])' 2>/dev/null) || n=4194304
    "$VDISK" io -r -c "read 0 ${n:-4194304}" "$1"
}

f=$T/trunc.qcow2; printf 'QFI\xfb\0\0\0\3\0\0' > "$f"
check_fails "truncated header" nohang "$VDISK" info "$f"
f=$(fresh trunc3); head -c 90 "$f" > "$T/t3.qcow2"
check_fails "truncated v3 header" nohang "$VDISK" info "$T/t3.qcow2"

f=$(fresh l1past); poke "$f" 40 Q $((1 << 40))
check_fails "L1 table past the end of the file" nohang "$VDISK" info "$f"
f=$(fresh l1unal); poke "$f" 40 Q $(( $(peek "$f" 40 Q) + 512 ))
check_fails "L1 table offset not cluster aligned" nohang "$VDISK" info "$f"
f=$(fresh l1huge); poke "$f" 36 I 0xffffffff
check_fails "overflowing L1 size" nohang "$VDISK" info "$f"
f=$(fresh l1small); poke "$f" 36 I 0
check_fails "L1 table too small for the size" nohang "$VDISK" info "$f"

f=$(fresh l2past); l1=$(peek "$f" 40 Q); poke "$f" "$l1" Q $(( (1 << 63) | (1 << 40) ))
check_fails "L2 table past the end: reading fails" nohang read_all "$f"
f=$(fresh l2unal); l1=$(peek "$f" 40 Q); poke "$f" "$l1" Q $(( $(peek "$f" "$l1" Q) + 4096 ))
check_fails "L2 table offset not aligned: reading fails" nohang read_all "$f"
f=$(fresh l1res); l1=$(peek "$f" 40 Q); poke "$f" "$l1" Q $(( $(peek "$f" "$l1" Q) | 2 ))
check_fails "L1 entry with reserved bits" nohang read_all "$f"

f=$(fresh dpast); l1=$(peek "$f" 40 Q); l2=$(( $(peek "$f" "$l1" Q) & 0xfffffffffe00 ))
poke "$f" "$l2" Q $(( (1 << 63) | (1 << 38) ))
check_fails "data cluster past the end: reading fails" nohang read_all "$f"
f=$(fresh dunal); l1=$(peek "$f" 40 Q); l2=$(( $(peek "$f" "$l1" Q) & 0xfffffffffe00 ))
poke "$f" "$l2" Q $(( $(peek "$f" "$l2" Q) + 512 ))
check_fails "data cluster offset not aligned: reading fails" nohang read_all "$f"

rtpast() { local f; f=$(fresh rtpast); poke "$f" 48 Q $((1 << 40)); echo "$f"; }
check_fails "refcount table past the end" nohang "$VDISK" info "$(rtpast)"
f=$(fresh rtunal); poke "$f" 48 Q $(( $(peek "$f" 48 Q) + 512 ))
check_fails "refcount table offset not aligned" nohang "$VDISK" info "$f"
f=$(fresh rtzero); poke "$f" 56 I 0
check_fails "no refcount table" nohang "$VDISK" info "$f"
f=$(fresh rtbig); poke "$f" 56 I 0x7fffffff
check_fails "absurd refcount table size" nohang "$VDISK" info "$f"
f=$(fresh rbpast); rt=$(peek "$f" 48 Q); poke "$f" "$rt" Q $((1 << 40))
check_fails "refcount block past the end: writing is refused" nohang "$VDISK" io -c "write 2M 4k" "$f"
out=$("$VDISK" check "$f" 2>&1); rc=$?
if [ $rc -eq 2 ]; then ok "refcount block past the end: check reports corruption (exit 2)"; else fail "check on bad refcount block (rc $rc)" "$out"; fi

# a used cluster whose refcount is zero
f=$(fresh rczero); rt=$(peek "$f" 48 Q); rb=$(peek "$f" "$rt" Q)
l1=$(peek "$f" 40 Q); l2=$(( $(peek "$f" "$l1" Q) & 0xfffffffffe00 ))
d=$(( $(peek "$f" "$l2" Q) & 0xfffffffffe00 ))
poke "$f" $(( rb + 2 * (d / 65536) )) H 0
out=$("$VDISK" check "$f" 2>&1); rc=$?
if [ $rc -eq 2 ]; then ok "used cluster with refcount 0: check reports corruption (exit 2)"; else fail "check on refcount 0 (rc $rc)" "$out"; fi
check "check -r all repairs it" "$VDISK" check -r all "$f"
check "qemu-img check agrees after the repair" qemu-img check "$f"
check "the data survived the repair" qemu-io -c "read -P 0x61 0 256k" -c "read -P 0x62 1M 64k" "$f"

# compressed descriptor pointing past the end
f=$T/comp.qcow2; head -c 1M /dev/zero | tr '\0' 'x' > "$T/x.raw"; qemu-img convert -c -O qcow2 "$T/x.raw" "$f"
l1=$(peek "$f" 40 Q); l2=$(( $(peek "$f" "$l1" Q) & 0xfffffffffe00 ))
poke "$f" "$l2" Q $(( (1 << 62) | (1 << 36) ))
check_fails "compressed cluster past the end: reading fails" nohang read_all "$f"
f2=$T/comp2.qcow2; qemu-img convert -c -O qcow2 "$T/x.raw" "$f2"
l2=$(( $(peek "$f2" "$(peek "$f2" 40 Q)" Q) & 0xfffffffffe00 ))
e=$(peek "$f2" "$l2" Q); poke "$f2" "$l2" Q $(( e + 3 ))
check_fails "compressed data that does not decompress" nohang read_all "$f2"

# sizes and fields out of range
f=$(fresh vsize); poke "$f" 24 Q $(( (1 << 63) - 1 ))
check_fails "absurd virtual size" nohang "$VDISK" info "$f"
f=$(fresh cbits); poke "$f" 20 I 30
check_fails "cluster_bits 30" nohang "$VDISK" info "$f"
f=$(fresh cbits8); poke "$f" 20 I 8
check_fails "cluster_bits 8" nohang "$VDISK" info "$f"
f=$(fresh rorder); poke "$f" 96 I 7
check_fails "refcount_order 7" nohang "$VDISK" info "$f"
f=$(fresh hlen); poke "$f" 100 I 4097
check_fails "header_length not a multiple of 8" nohang "$VDISK" info "$f"
f=$(fresh ver); poke "$f" 4 I 4
check_fails "version 4" nohang "$VDISK" info "$f"
f=$(fresh crypt); poke "$f" 32 I 1
check_fails "encrypted image" nohang "$VDISK" info "$f"
f=$(fresh nsnap); poke "$f" 60 I 0x7fffffff
check_fails "absurd snapshot count" nohang "$VDISK" info "$f"
f=$(fresh snapoff); poke "$f" 60 I 1; poke "$f" 64 Q $((1 << 40))
check_fails "snapshot table past the end" nohang "$VDISK" info "$f"
f=$(fresh ctype); poke "$f" 104 B 7; poke "$f" 72 Q 8
check_fails "unknown compression type" nohang "$VDISK" info "$f"
f=$(fresh ctype2); poke "$f" 104 B 1
check_fails "compression type without its feature bit" nohang "$VDISK" info "$f"
f=$(fresh bfile); poke "$f" 8 Q 60000; poke "$f" 16 I 5000
check_fails "backing file name too long" nohang "$VDISK" info "$f"
f=$(fresh bfile2); poke "$f" 8 Q 65530; poke "$f" 16 I 100
check_fails "backing file name past the first cluster" nohang "$VDISK" info "$f"
f=$(fresh extbad); poke "$f" 112 I 0x12345678; poke "$f" 116 I 0x100000
check_fails "header extension overflowing the cluster" nohang "$VDISK" info "$f"

# an unknown incompatible feature is refused by its name from the feature table
f=$(fresh feat)
python3 - "$f" <<'PY'
import struct, sys
with open(sys.argv[1], 'r+b') as h:
    d = bytearray(h.read(65536))
    inc = struct.unpack('>Q', d[72:80])[0]
    d[72:80] = struct.pack('>Q', inc | (1 << 17))
    p = 112
    while True:
        t, l = struct.unpack('>II', d[p:p + 8])
        if t == 0: break
        if t == 0x6803f857:
            d[p + 8 + 2:p + 8 + 48] = b'\0' * 46      # reuse the first entry's slot
            d[p + 8] = 0; d[p + 9] = 17
            d[p + 10:p + 10 + len(b'teleportation')] = b'teleportation'
        p += 8 + (l + 7) // 8 * 8
    h.seek(0); h.write(d)
PY
out=$("$VDISK" info "$f" 2>&1); rc=$?
if [ $rc -ne 0 ] && grep -q teleportation <<<"$out"; then ok "unknown incompatible feature refused by name"; else fail "unknown feature (rc $rc)" "$out"; fi
f=$(fresh feat2); poke "$f" 72 Q $((1 << 40))
check_fails "unknown incompatible feature without a name" nohang "$VDISK" info "$f"

# the corrupt bit: read-only works, writing is refused
f=$(fresh corrupt); poke "$f" 72 Q 2
check "corrupt image opens read-only" "$VDISK" io -r -c "read -P 0x61 0 256k" "$f"
check_fails "corrupt image refuses writes" nohang "$VDISK" io -c "write 0 4k" "$f"

# a dirty image (not lazy) is repaired when opened for writing
f=$(fresh dirty); poke "$f" 72 Q 1
check "dirty image opens for writing" "$VDISK" io -c "write -P 0x63 2M 64k" "$f"
check "and is clean afterwards" qemu-img check "$f"

# a backing chain that loops
qemu-img create -q -f qcow2 "$T/loopa.qcow2" 4M
qemu-img create -q -f qcow2 -u -b loopa.qcow2 -F qcow2 "$T/loopb.qcow2" 4M
qemu-img rebase -q -u -b loopb.qcow2 -F qcow2 "$T/loopa.qcow2"
check_fails "looping backing chain" nohang "$VDISK" info --backing-chain "$T/loopa.qcow2"
check_fails "looping backing chain (read)" nohang read_all "$T/loopa.qcow2"
qemu-img rebase -q -u -b loopself.qcow2 -F qcow2 "$T/loopa.qcow2" 2>/dev/null
cp "$T/loopa.qcow2" "$T/loopself.qcow2"; qemu-img rebase -q -u -b loopself.qcow2 -F qcow2 "$T/loopself.qcow2"
check_fails "image that is its own backing file" nohang read_all "$T/loopself.qcow2"

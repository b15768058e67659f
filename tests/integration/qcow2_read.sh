#!/usr/bin/env bash
# vdisk reads what QEMU writes: a matrix of qcow2 images made by qemu-img
# and qemu-io 7.2 (compat, cluster sizes, refcount widths, extended L2, lazy
# refcounts, compression, preallocation, zero clusters, discards, a chain of
# three) must convert to the same raw bytes and map to the same JSON as
# qemu-img says.
source "$(dirname "$0")/../lib.sh"

have_convert=0
"$VDISK" convert --help >/dev/null 2>&1 && have_convert=1

# Guest writes, zero writes and discards that every image gets.
io_script() {   # size
    local s
    s=$(numfmt --from=iec "$1")
    echo "write -P 0x11 0 100k"
    echo "write -P 0x22 $((s / 3)) 777k"
    echo "write -P 0x33 $((s / 2 + 4096)) 5000"
    echo "write -z $((s / 3 + 65536)) 200k"
    echo "write -P 0x44 $((s - 70000)) 70000"
    echo "discard $((s / 3 + 300 * 1024)) 256k"
    echo "write -z -u 0 64k"
}

# compare IMAGE NAME: convert to raw and map, vdisk against qemu-img
compare_img() {
    local img=$1 name=$2
    qemu-img convert -O raw "$img" "$T/ref.raw" || { fail "$name: qemu-img convert"; return; }
    if [ $have_convert = 1 ]; then
        rm -f "$T/out.raw"
        if "$VDISK" convert -O raw "$img" "$T/out.raw" 2>"$T/err" && cmp -s "$T/ref.raw" "$T/out.raw"; then
            ok "$name: convert -O raw equals qemu-img's"
        else
            fail "$name: convert -O raw differs from qemu-img's" "$(head -3 "$T/err") $(cmp "$T/ref.raw" "$T/out.raw" 2>&1 | head -1)"
        fi
    else
        check "$name: contents equal qemu-img's raw" "$VDISK" compare -f qcow2 -F raw "$img" "$T/ref.raw"
    fi
    qemu-img map --output=json "$img" > "$T/qmap.json"
    "$VDISK" map --output=json "$img" > "$T/vmap.json" 2>"$T/err"
    if cmp -s "$T/qmap.json" "$T/vmap.json"; then
        ok "$name: map --output=json equals qemu-img's"
    else
        fail "$name: map --output=json differs from qemu-img's" "$(diff "$T/qmap.json" "$T/vmap.json" | head -4 | tr '\n' ' ')"
    fi
}

make_img() {    # file size opts
    local f=$1 s=$2 o=$3
    rm -f "$f"
    qemu-img create -q -f qcow2 ${o:+-o "$o"} "$f" "$s" || return 1
    local args=()
    while read -r line; do [ -n "$line" ] && args+=(-c "$line"); done < <(io_script "$s")
    qemu-io "${args[@]}" "$f" >/dev/null
}

configs=(
    "v2|compat=0.10|16M"
    "v3|compat=1.1|16M"
    "c512|cluster_size=512|2M"
    "c512-r64|cluster_size=512,refcount_bits=64|2M"
    "c4k-r1|cluster_size=4096,refcount_bits=1|8M"
    "c64k-r16|cluster_size=65536,refcount_bits=16|16M"
    "c2m|cluster_size=2M|64M"
    "c2m-r64|cluster_size=2M,refcount_bits=64|64M"
    "extl2|extended_l2=on|16M"
    "extl2-c2m|extended_l2=on,cluster_size=2M|64M"
    "lazy|lazy_refcounts=on|16M"
    "v2-c4k|compat=0.10,cluster_size=4096|8M"
    "prealloc-metadata|preallocation=metadata|8M"
    "prealloc-falloc|preallocation=falloc|8M"
    "prealloc-full|preallocation=full|8M"
    "prealloc-metadata-extl2|preallocation=metadata,extended_l2=on|8M"
)
for c in "${configs[@]}"; do
    IFS='|' read -r name opts size <<<"$c"
    if make_img "$T/$name.qcow2" "$size" "$opts"; then
        compare_img "$T/$name.qcow2" "$name"
    else
        fail "$name: qemu-img create"
    fi
done

# compressed images from a source with data, zeros and repeats
python3 - "$T/src.raw" <<'PY'
import os, random, sys
random.seed(7)
with open(sys.argv[1], 'wb') as f:
    for i in range(96):
        k = i % 4
        if k == 0: f.write(bytes(random.getrandbits(8) for _ in range(4096)) * 8)
        elif k == 1: f.write(b'\0' * 32768)
        elif k == 2: f.write((b'qcow2 block %d ' % i) * 2048)
        else: f.write(os.urandom(32768))
    f.write(b'tail' * 1000)
PY
for ct in zlib zstd; do
    for cs in 512 4096 65536 2M; do
        rm -f "$T/c.qcow2"
        qemu-img convert -c -O qcow2 -o "compression_type=$ct,cluster_size=$cs" "$T/src.raw" "$T/c.qcow2"
        compare_img "$T/c.qcow2" "compressed $ct cluster_size=$cs"
    done
done
rm -f "$T/c.qcow2"
qemu-img convert -c -O qcow2 -o compression_type=zstd,extended_l2=on "$T/src.raw" "$T/c.qcow2"
qemu-io -c "write -P 0x5a 70000 3000" -c "write -z 200k 64k" "$T/c.qcow2" >/dev/null
compare_img "$T/c.qcow2" "compressed zstd with extended L2 and overwrites"

# a chain of three with data at every level
qemu-img create -q -f qcow2 "$T/base.qcow2" 16M
qemu-io -c "write -P 0xb0 0 16M" -c "write -z 4M 1M" "$T/base.qcow2" >/dev/null
qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 "$T/mid.qcow2"
qemu-io -c "write -P 0xb1 1M 2M" -c "write -P 0xb1 4100k 10k" "$T/mid.qcow2" >/dev/null
qemu-img create -q -f qcow2 -o extended_l2=on -b mid.qcow2 -F qcow2 "$T/top.qcow2"
qemu-io -c "write -P 0xb2 1500k 100k" -c "write -P 0xb2 2047k 3k" -c "write -z 8M 1M" -c "discard 12M 2M" "$T/top.qcow2" >/dev/null
compare_img "$T/top.qcow2" "backing chain of three"
compare_img "$T/mid.qcow2" "backing chain: middle (v2)"

# internal snapshots: listed by info like qemu-img's
qemu-img create -q -f qcow2 "$T/snap.qcow2" 4M
qemu-io -c "write -P 0x10 0 1M" "$T/snap.qcow2" >/dev/null
qemu-img snapshot -c first "$T/snap.qcow2"
qemu-io -c "write -P 0x20 0 512k" "$T/snap.qcow2" >/dev/null
qemu-img snapshot -c second "$T/snap.qcow2"
compare_img "$T/snap.qcow2" "image with internal snapshots"
want=$(qemu-img info --output=json "$T/snap.qcow2" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["snapshots"], sort_keys=True))')
got=$("$VDISK" info --output=json "$T/snap.qcow2" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin).get("snapshots"), sort_keys=True))')
if [ "$want" = "$got" ]; then ok "info lists the snapshots as qemu-img does"; else fail "info snapshots" "want $want got $got"; fi
check_fails "writing to an image with internal snapshots is refused" "$VDISK" io -c "write 0 4k" "$T/snap.qcow2"

# format-specific info as qemu-img prints it
for o in compat=0.10 "compat=1.1,lazy_refcounts=on,refcount_bits=64" "compression_type=zstd,extended_l2=on"; do
    rm -f "$T/i.qcow2"; qemu-img create -q -f qcow2 -o "$o" "$T/i.qcow2" 1G
    want=$(qemu-img info --output=json "$T/i.qcow2" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps([d["cluster-size"], d["dirty-flag"], d["format-specific"]], sort_keys=True))')
    got=$("$VDISK" info --output=json "$T/i.qcow2" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps([d["cluster-size"], d["dirty-flag"], d["format-specific"]], sort_keys=True))')
    if [ "$want" = "$got" ]; then ok "info format-specific ($o)"; else fail "info format-specific ($o)" "want $want got $got"; fi
done

# check --output=json: the same figures as qemu-img check
for f in "$T/c512-r64.qcow2" "$T/extl2.qcow2" "$T/c.qcow2" "$T/top.qcow2" "$T/snap.qcow2" "$T/prealloc-full.qcow2"; do
    want=$(qemu-img check --output=json "$f" | python3 -c 'import json,sys; d=json.load(sys.stdin); d.pop("filename"); print(json.dumps(d, sort_keys=True))')
    got=$("$VDISK" check --output=json "$f" | python3 -c 'import json,sys; d=json.load(sys.stdin); d.pop("filename"); print(json.dumps(d, sort_keys=True))')
    if [ "$want" = "$got" ]; then ok "check --output=json equals qemu-img's ($(basename "$f"))"
    else fail "check --output=json ($(basename "$f"))" "want $want got $got"; fi
done

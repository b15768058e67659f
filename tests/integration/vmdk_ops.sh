#!/usr/bin/env bash
# VMDK write-zeroes (the zeroed-grain marker of version-2 sparse extents,
# zeros in place otherwise), discard and resize, each checked against a raw
# shadow given the same operations, by vdisk and qemu-img (compare, check,
# map, info) and parsed by libyal's vmdkinfo.
source "$(dirname "$0")/../lib.sh"

MiB=1048576
same_as() {
    check "$1: vdisk reads the shadow's bytes" "$VDISK" compare -q -f vmdk "$2" -F raw "$3"
    check "$1: qemu-img reads the shadow's bytes" qemu-img compare -q -f vmdk "$2" -F raw "$3"
    check "$1: qemu-img check" qemu-img check -q -f vmdk "$2"
}
both() {   # both IMG SHADOW IO-ARGS...
    local img=$1 sh=$2; shift 2
    "$VDISK" io -f vmdk "$@" "$img" >/dev/null && "$VDISK" io -f raw "$@" "$sh" >/dev/null
}
vsize() { qemu-img info --output=json -f vmdk "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])'; }
vmdki_size() { vmdkinfo "$1" | sed -n 's/.*Media size.*(\([0-9]*\) bytes).*/\1/p'; }
# data_bytes IMG: bytes qemu-img map reports as data
data_bytes() { qemu-img map --output=json -f vmdk "$1" | python3 -c 'import json,sys; print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))'; }

ZW=(-c "write -z 1M 1M" -c "write -z -u 2M 128k" -c "write -z 3000 5000" -c "write -z 4M 100k" -c "write -z 30M 10M")
for zg in on off; do
    I=$T/z-$zg.vmdk S=$T/z-$zg.raw
    "$VDISK" create -q -f vmdk -o zeroed_grain=$zg "$I" 64M
    "$VDISK" create -q -f raw "$S" 64M
    both "$I" "$S" -c "write -P 0xab 0 8M"
    check "zeroed_grain=$zg: write-zeroes" both "$I" "$S" "${ZW[@]}"
    same_as "zeroed_grain=$zg after write-zeroes" "$I" "$S"
    d=$(data_bytes "$I")
    if [ $zg = on ]; then
        # 1M + 128k + 64k of whole grains become zeroed grains: no longer data
        [ "$d" = $((8 * MiB - MiB - 131072 - 65536)) ] && ok "zeroed_grain=on: whole grains are zeroed-grain entries (qemu-img map)" \
            || fail "zeroed_grain=on: whole grains are zeroed-grain entries (qemu-img map)" "data bytes $d"
    else
        [ "$d" = $((8 * MiB)) ] && ok "zeroed_grain=off: grains stay allocated, zeroed in place" \
            || fail "zeroed_grain=off: grains stay allocated, zeroed in place" "data bytes $d"
    fi
    check "zeroed_grain=$zg: discard" both "$I" "$S" -c "discard 5M 1M"
    same_as "zeroed_grain=$zg after discard" "$I" "$S"
    vmdkinfo "$I" > "$T/vi.txt" 2>&1 && grep -q "Media size.*($((64 * MiB)) bytes)" "$T/vi.txt" \
        && ok "zeroed_grain=$zg: vmdkinfo parses it" || fail "zeroed_grain=$zg: vmdkinfo parses it" "$(tail -2 "$T/vi.txt")"
done

# ---- delta disk: zeros must hide the parent ----
P=$T/p.vmdk C=$T/c.vmdk S=$T/c.raw
"$VDISK" create -q -f vmdk "$P" 16M
"$VDISK" io -f vmdk -c "write -P 0xab 0 16M" "$P" >/dev/null
"$VDISK" create -q -f raw "$S" 16M
"$VDISK" io -f raw -c "write -P 0xab 0 16M" "$S" >/dev/null
for zg in on off; do
    rm -f "$C"
    "$VDISK" create -q -f vmdk -o zeroed_grain=$zg -b p.vmdk -F vmdk "$C"
    cp "$S" "$T/c-$zg.raw"
    check "delta zeroed_grain=$zg: write-zeroes over the parent's data" both "$C" "$T/c-$zg.raw" \
        -c "write -P 0xcd 1M 64k" -c "write -z 2M 1M" -c "write -z 1M 4k" -c "write -z 5000 3000"
    check "delta zeroed_grain=$zg: vdisk reads the shadow's bytes through the chain" \
        "$VDISK" compare -q -f vmdk "$C" -F raw "$T/c-$zg.raw"
    check "delta zeroed_grain=$zg: qemu-img reads the shadow's bytes through the chain" \
        qemu-img compare -q -f vmdk "$C" -F raw "$T/c-$zg.raw"
done

# ---- flat extents ----
F=$T/f.vmdk S=$T/f.raw
"$VDISK" create -q -f vmdk -o subformat=monolithicFlat "$F" 16M
"$VDISK" create -q -f raw "$S" 16M
both "$F" "$S" -c "write -P 0x5a 0 16M"
check "flat: write-zeroes and discard" both "$F" "$S" -c "write -z 1M 1M" -c "write -z -u 3M 2M" -c "discard 8M 1M"
same_as "flat after zeroes" "$F" "$S"

# ---- streamOptimized: zeros fall back to ordinary (skipped) grains ----
SO=$T/s.vmdk
"$VDISK" create -q -f vmdk -o subformat=streamOptimized "$SO" 8M
check "stream: write then write-zeroes of unwritten grains" "$VDISK" io -f vmdk \
    -c "write -P 0x11 0 1M" -c "write -z 2M 1M" "$SO"
check "stream: qemu-img check" qemu-img check -q -f vmdk "$SO"

# ---- resize ----
R=$T/r.vmdk S=$T/r.raw
"$VDISK" create -q -f vmdk "$R" 60M
"$VDISK" create -q -f raw "$S" 60M
both "$R" "$S" -c "write -P 0x42 0 8M" -c "write -P 0x43 50M 1M"
check "sparse: grow within the grain directory" "$VDISK" resize -q -f vmdk "$R" 64M
"$VDISK" resize -q -f raw "$S" 64M
[ "$(vsize "$R")" = $((64 * MiB)) ] && ok "sparse: qemu-img sees the new size" || fail "sparse: qemu-img sees the new size" "$(vsize "$R")"
[ "$(vmdki_size "$R")" = $((64 * MiB)) ] && ok "sparse: vmdkinfo sees the new size" || fail "sparse: vmdkinfo sees the new size" "$(vmdki_size "$R")"
both "$R" "$S" -c "write -P 0x44 62M 2M"
same_as "sparse after growing" "$R" "$S"
check_fails "sparse: growing past the grain directory is refused" "$VDISK" resize -q -f vmdk "$R" 65M
check_fails "sparse: shrinking over data is refused" "$VDISK" resize -q -f vmdk --shrink "$R" 7M
check_fails "sparse: a size that is no whole sector is refused" "$VDISK" resize -q -f vmdk "$R" 67108000
R=$T/r2.vmdk S=$T/r2.raw
"$VDISK" create -q -f vmdk "$R" 60M
"$VDISK" create -q -f raw "$S" 60M
both "$R" "$S" -c "write -P 0x42 0 8M" -c "write -P 0x43 10M 40k"
check "sparse: shrink over empty grains (cutting the last one)" "$VDISK" resize -q -f vmdk --shrink "$R" 10272k
"$VDISK" resize -q -f raw --shrink "$S" 10272k
same_as "sparse after shrinking" "$R" "$S"
[ "$(vmdki_size "$R")" = $((10272 * 1024)) ] && ok "sparse: vmdkinfo sees the shrunk size" || fail "sparse: vmdkinfo sees the shrunk size" "$(vmdki_size "$R")"
# growing again: the cut-off part of the last grain reads as zeros
check "sparse: grow again (within the 32 MiB its grain directory now covers)" "$VDISK" resize -q -f vmdk "$R" 32M && "$VDISK" resize -q -f raw "$S" 32M
same_as "sparse shrunk then grown" "$R" "$S"

S=$T/f.raw
check "flat: grow" "$VDISK" resize -q -f vmdk "$F" 40M
"$VDISK" resize -q -f raw "$S" 40M
[ "$(vsize "$F")" = $((40 * MiB)) ] && ok "flat: qemu-img sees the new size" || fail "flat: qemu-img sees the new size" "$(vsize "$F")"
both "$F" "$S" -c "write -P 0x61 30M 1M"
same_as "flat after growing" "$F" "$S"
check "flat: shrink" "$VDISK" resize -q -f vmdk --shrink "$F" 10M
"$VDISK" resize -q -f raw --shrink "$S" 10M
[ "$(stat -c %s "$T/f-flat.vmdk")" = $((10 * MiB)) ] && ok "flat: the extent file is cut" || fail "flat: the extent file is cut" "$(stat -c %s "$T/f-flat.vmdk")"
same_as "flat after shrinking" "$F" "$S"
[ "$(vmdki_size "$F")" = $((10 * MiB)) ] && ok "flat: vmdkinfo sees the new size" || fail "flat: vmdkinfo sees the new size" "$(vmdki_size "$F")"

"$VDISK" create -q -f vmdk -o subformat=twoGbMaxExtentSparse "$T/t.vmdk" 3G
check_fails "a disk of several extents cannot be resized" "$VDISK" resize -q -f vmdk "$T/t.vmdk" 4G
check_fails "a streamOptimized disk cannot be resized" "$VDISK" resize -q -f vmdk "$SO" 16M
check_fails "a delta disk cannot be resized" "$VDISK" resize -q -f vmdk "$C" 32M
echo "1..$_n"

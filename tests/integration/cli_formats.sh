#!/usr/bin/env bash
# vdisk convert into and out of every format built in, checked by qemu-img
# (compare, check), and info/map of qemu-made images of each format.
source "$(dirname "$0")/../lib.sh"
cd "$T"
formats=$("$VDISK" --help | sed -n 's/^Supported formats: //p')
rand_file src.raw 24 formats
fallocate -p -o 4M -l 10M src.raw

for f in $formats; do
    [ "$f" = raw ] && continue
    q=$f; [ "$f" = vhd ] && q=vpc
    check "convert raw -> $f" "$VDISK" convert -f raw -O "$f" src.raw "t.$f"
    check "  qemu-img compare ($q)" qemu-img compare -f raw -F "$q" src.raw "t.$f"
    out=$(qemu-img check -f "$q" "t.$f" 2>&1); rc=$?
    [ $rc -eq 0 ] || [ $rc -eq 63 ] && ok "  qemu-img check ($rc)" || fail "  qemu-img check" "$rc: $out"
    check "convert $f -> raw" "$VDISK" convert -O raw "t.$f" "back-$f.raw"
    check "  content kept" cmp -n $((24 << 20)) src.raw "back-$f.raw"
    check "compare $f with the source" "$VDISK" compare -F raw "t.$f" src.raw
    # an image qemu-img made: vdisk's map equals qemu-img's
    qemu-img create -q -f "$q" "q.$f" 16M
    qemu-io -f "$q" -c "write -P 1 0 64k" -c "write -P 2 5M 1M" "q.$f" > /dev/null
    a=$("$VDISK" map "q.$f"); b=$(qemu-img map -f "$q" "q.$f")
    [ "$a" = "$b" ] && ok "map (human) of a qemu-made $f" || fail "map (human) of a qemu-made $f" "$(diff <(echo "$b") <(echo "$a") | head -4 | tr '\n' ' ')"
    a=$("$VDISK" info --output=json "q.$f" | jq '."virtual-size"'); b=$(qemu-img info --output=json "q.$f" | jq '."virtual-size"')
    [ "$a" = "$b" ] && ok "info virtual-size of a qemu-made $f" || fail "info virtual-size of a qemu-made $f" "$a vs $b"
done

if grep -qw vmdk <<<"$formats"; then
    check "convert -c to a streamOptimized vmdk" "$VDISK" convert -c -f raw -O vmdk -o subformat=streamOptimized src.raw c.vmdk
    check "  qemu-img compare" qemu-img compare -f raw src.raw c.vmdk
    out=$("$VDISK" convert -c -f raw -O vmdk src.raw c2.vmdk 2>&1); rc=$?
    [ $rc -eq 1 ] && grep -q "Compression not supported" <<<"$out" && ok "convert -c to a monolithicSparse vmdk is refused" \
        || fail "convert -c to a monolithicSparse vmdk is refused" "$rc: $out"
fi

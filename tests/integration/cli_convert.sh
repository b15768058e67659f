#!/usr/bin/env bash
# vdisk convert on raw images, against qemu-img convert: same content, the
# same holes (allocation), and qemu-img's option semantics (-S, -n,
# --target-is-zero, several sources, -m, -W, -p, cache modes).
source "$(dirname "$0")/../lib.sh"

# A 48 MiB source: random data with holes, zero-filled (allocated) ranges
# and short zero runs inside data.
src=$T/src.raw
rand_file "$src" 48 convert
fallocate -p -o 1M -l 7M "$src"
fallocate -p -o 20M -l 12M "$src"
fallocate -p -o 47M -l 1M "$src"
dd if=/dev/zero of="$src" bs=64k seek=160 count=16 conv=notrunc status=none      # 10M..11M zeros, allocated
dd if=/dev/zero of="$src" bs=4k seek=3000 count=3 conv=notrunc status=none       # a 12k zero run in data
dd if=/dev/zero of="$src" bs=512 seek=30000 count=3 conv=notrunc status=none     # a 1.5k zero run in data

blocks() { stat -c %b "$1"; }
mapj() { qemu-img map -f raw --output=json "$1"; }

check "convert raw -> raw" "$VDISK" convert -f raw -O raw "$src" "$T/v.raw"
qemu-img convert -f raw -O raw "$src" "$T/q.raw"
check "content equals the source" cmp "$src" "$T/v.raw"
# allocated blocks as qemu-img's copy (within the file system's extent-tree blocks)
d=$(( $(blocks "$T/v.raw") - $(blocks "$T/q.raw") ))
[ ${d#-} -le 128 ] && ok "holes as qemu-img's (allocated blocks)" \
    || fail "holes as qemu-img's (allocated blocks)" "vdisk $(blocks "$T/v.raw") qemu-img $(blocks "$T/q.raw")"
[ "$(mapj "$T/v.raw")" = "$(mapj "$T/q.raw")" ] && ok "map of the copy equals qemu-img's copy" \
    || fail "map of the copy equals qemu-img's copy" "$(diff <(mapj "$T/q.raw") <(mapj "$T/v.raw") | head -4 | tr '\n' ' ')"
[ "$(blocks "$T/v.raw")" -lt "$(blocks "$src")" ] && ok "zero ranges of the source are not allocated" \
    || fail "zero ranges of the source are not allocated"

# -S 0: everything allocated
check "convert -S 0" "$VDISK" convert -S 0 -f raw -O raw "$src" "$T/v0.raw"
check "-S 0 content" cmp "$src" "$T/v0.raw"
[ $(( $(blocks "$T/v0.raw") * 512 )) -ge $((48 << 20)) ] && ok "-S 0 target fully allocated" \
    || fail "-S 0 target fully allocated" "$(blocks "$T/v0.raw") blocks"
# -S 64k: short zero runs are written, long ones not
check "convert -S 64k" "$VDISK" convert -S 64k -f raw "$src" "$T/v64.raw"
check "-S 64k content" cmp "$src" "$T/v64.raw"
b64=$(blocks "$T/v64.raw") b4=$(blocks "$T/v.raw")
[ "$b64" -gt "$b4" ] && [ "$b64" -lt "$(blocks "$T/v0.raw")" ] && ok "-S 64k allocates between -S 4k and -S 0" \
    || fail "-S 64k allocates between -S 4k and -S 0" "4k:$b4 64k:$b64"

# in-flight requests and ordering
for m in "-m 1" "-m 3 -W" "-m 64" "-W"; do
    rm -f "$T/m.raw"
    check "convert $m" "$VDISK" convert $m -f raw "$src" "$T/m.raw"
    check "convert $m content" cmp "$src" "$T/m.raw"
done
for c in "-t none" "-T none" "-t none -T none"; do
    rm -f "$T/c.raw"
    check "convert $c" "$VDISK" convert $c -f raw "$src" "$T/c.raw"
    check "convert $c content" cmp "$src" "$T/c.raw"
done

# several sources are concatenated
head -c 1000448 /dev/urandom > "$T/small.raw"
check "convert of three sources" "$VDISK" convert -f raw "$T/small.raw" "$src" "$T/small.raw" "$T/cat.raw"
cat "$T/small.raw" "$src" "$T/small.raw" > "$T/cat.expected"
check "three sources concatenated" cmp "$T/cat.expected" "$T/cat.raw"

# -n: the target exists. Without --target-is-zero its old content is overwritten, zeros included.
head -c $((48 << 20)) /dev/urandom > "$T/n.raw"
check "convert -n over garbage" "$VDISK" convert -n -f raw -O raw "$src" "$T/n.raw"
check "-n content" cmp "$src" "$T/n.raw"
truncate -s 0 "$T/z.raw"; truncate -s 48M "$T/z.raw"
check "convert -n --target-is-zero" "$VDISK" convert -n --target-is-zero -f raw -O raw "$src" "$T/z.raw"
check "--target-is-zero content" cmp "$src" "$T/z.raw"
[ "$(mapj "$T/z.raw")" = "$(mapj "$T/v.raw")" ] && ok "--target-is-zero skips zeros" || fail "--target-is-zero skips zeros"
truncate -s 1M "$T/tiny.raw"
check_fails "convert -n into a smaller target" "$VDISK" convert -n -f raw -O raw "$src" "$T/tiny.raw"

# progress like qemu-img's
out=$("$VDISK" convert -p -f raw "$src" "$T/p.raw")
grep -q '(100.00/100%)' <<<"$out" && ok "-p prints progress" || fail "-p prints progress" "$out"
out=$("$VDISK" convert -p -q -f raw "$src" "$T/pq.raw")
[ -z "$out" ] && ok "-q silences -p" || fail "-q silences -p" "$out"

# errors
check_fails "missing source" "$VDISK" convert -f raw "$T/nonexistent" "$T/x.raw"
check_fails "unknown output format" "$VDISK" convert -O bogus "$src" "$T/x.raw"
check_fails "unknown -o key" "$VDISK" convert -f raw -o bogus=1 "$src" "$T/x.raw"
check_fails "-S not a multiple of 512" "$VDISK" convert -S 100 -f raw "$src" "$T/x.raw"
check_fails "-m 0" "$VDISK" convert -m 0 -f raw "$src" "$T/x.raw"
check_fails "-c on raw" "$VDISK" convert -c -f raw -O raw "$src" "$T/x.raw"
check_fails "one file name only" "$VDISK" convert -f raw "$src"

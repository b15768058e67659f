#!/usr/bin/env bash
# vdisk compare agrees with qemu-img compare: the same message and exit
# status on equal, different and differently sized raw images.
source "$(dirname "$0")/../lib.sh"

both() {   # name, expected status, args...
    local name=$1 want=$2; shift 2
    local a b ra rb
    a=$("$VDISK" compare "$@" 2>/dev/null); ra=$?
    b=$(qemu-img compare "$@" 2>/dev/null); rb=$?
    if [ $ra -ne "$want" ]; then fail "$name" "vdisk exit $ra, want $want: $a"
    elif [ $rb -ne $ra ]; then fail "$name" "qemu-img exit $rb, vdisk $ra"
    elif [ "$a" != "$b" ]; then fail "$name" "vdisk '$a' qemu-img '$b'"
    else ok "$name"; fi
}

rand_file "$T/a.raw" 8 cmp
fallocate -p -o 2M -l 3M "$T/a.raw"
cp --sparse=never "$T/a.raw" "$T/b.raw"           # same content, allocated everywhere
both "equal (sparse vs allocated)" 0 -f raw -F raw "$T/a.raw" "$T/b.raw"

cp "$T/a.raw" "$T/c.raw"
printf 'x' | dd of="$T/c.raw" bs=1 seek=3001234 conv=notrunc status=none     # inside the hole
both "differs in a hole" 1 -f raw -F raw "$T/a.raw" "$T/c.raw"
cp "$T/a.raw" "$T/d.raw"
printf 'y' | dd of="$T/d.raw" bs=1 seek=7777777 conv=notrunc status=none     # inside data
both "differs in data" 1 -f raw -F raw "$T/a.raw" "$T/d.raw"
both "differs, reversed" 1 -f raw -F raw "$T/d.raw" "$T/a.raw"

cp "$T/a.raw" "$T/big.raw"; truncate -s 16M "$T/big.raw"
both "larger, extra part zero" 0 -f raw -F raw "$T/a.raw" "$T/big.raw"
both "larger first, extra part zero" 0 -f raw -F raw "$T/big.raw" "$T/a.raw"
both "strict: size mismatch" 1 -s -f raw -F raw "$T/a.raw" "$T/big.raw"
printf 'z' | dd of="$T/big.raw" bs=1 seek=$((12 << 20)) conv=notrunc status=none
both "larger, extra part not zero" 1 -f raw -F raw "$T/a.raw" "$T/big.raw"
both "quiet" 1 -q -f raw -F raw "$T/a.raw" "$T/big.raw"
both "strict, equal allocation" 0 -s -f raw -F raw "$T/a.raw" "$T/a.raw"

out=$("$VDISK" compare -f raw -F raw "$T/a.raw" "$T/nonexistent" 2>&1); rc=$?
[ $rc -eq 2 ] && ok "missing file: exit 2" || fail "missing file: exit 2" "exit $rc: $out"
out=$("$VDISK" compare -f raw "$T/a.raw" 2>&1); rc=$?
[ $rc -eq 2 ] && ok "one file name: exit 2" || fail "one file name: exit 2" "exit $rc: $out"
out=$("$VDISK" compare -p -f raw -F raw "$T/a.raw" "$T/b.raw")
grep -q '(100.00/100%)' <<<"$out" && grep -q "Images are identical." <<<"$out" && ok "compare -p" || fail "compare -p" "$out"

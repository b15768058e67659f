#!/usr/bin/env bash
# check, resize, rebase and create options on raw, against qemu-img.
source "$(dirname "$0")/../lib.sh"

"$VDISK" create -q -f raw "$T/a.raw" 4M
# raw has no checks: exit 63 and qemu-img's message
out=$("$VDISK" check -f raw "$T/a.raw" 2>&1); rc=$?
qout=$(qemu-img check -f raw "$T/a.raw" 2>&1); qrc=$?
[ $rc -eq $qrc ] && [ $rc -eq 63 ] && ok "check raw: exit 63 as qemu-img" || fail "check raw: exit 63 as qemu-img" "vdisk $rc qemu-img $qrc"
[ "${out#vdisk: }" = "${qout#qemu-img: }" ] && ok "check raw: qemu-img's message" || fail "check raw: qemu-img's message" "$out"
out=$("$VDISK" check -f raw --output=json "$T/a.raw" 2>&1); rc=$?
[ $rc -eq 63 ] && ok "check --output=json raw: exit 63" || fail "check --output=json raw: exit 63" "$rc"
check_fails "check -r bogus" "$VDISK" check -r bogus -f raw "$T/a.raw"
out=$("$VDISK" check "$T/nonexistent" 2>&1); rc=$?
[ $rc -eq 1 ] && ok "check of a missing file: exit 1" || fail "check of a missing file: exit 1" "$rc: $out"

# resize: the same sizes as qemu-img on twin files
resize_both() {   # name, args (size last)...
    local name=$1; shift
    "$VDISK" resize -f raw "$T/v.raw" "$@" > "$T/v.out" 2>&1; local rv=$?
    qemu-img resize -f raw "$T/q.raw" "$@" > "$T/q.out" 2>&1; local rq=$?
    local sv sq; sv=$(stat -c %s "$T/v.raw"); sq=$(stat -c %s "$T/q.raw")
    if [ $rv -ne $rq ] || [ "$sv" != "$sq" ]; then fail "resize $name" "vdisk exit $rv size $sv, qemu-img exit $rq size $sq: $(cat "$T/v.out")"
    elif [ $rv -eq 0 ] && ! grep -q "^Image resized.$" "$T/v.out"; then fail "resize $name" "no 'Image resized.'"
    else ok "resize $name (exit $rv, $sv bytes)"; fi
}
truncate -s 1M "$T/v.raw"; truncate -s 1M "$T/q.raw"
resize_both "grow" 3M
resize_both "relative grow" +1536k
resize_both "shrink without --shrink" 1M
resize_both "shrink" --shrink 1M
resize_both "relative shrink" --shrink -- -512k
resize_both "below zero" --shrink -- -1G
resize_both "bad size" 12Q
check "resize --preallocation=full" "$VDISK" resize -f raw --preallocation=full "$T/v.raw" 8M
[ $(( $(stat -c %b "$T/v.raw") * 512 )) -ge $((7 << 20)) ] && ok "preallocated part is allocated" || fail "preallocated part is allocated"
check_fails "resize --preallocation=bogus" "$VDISK" resize -f raw --preallocation=bogus "$T/v.raw" 9M

# create options
"$VDISK" create -q -f raw -o preallocation=full "$T/full.raw" 2M
[ $(( $(stat -c %b "$T/full.raw") * 512 )) -ge $((2 << 20)) ] && ok "create preallocation=full" || fail "create preallocation=full"
"$VDISK" create -q -f raw -o provisioning=eager-zeroed "$T/eager.raw" 2M
[ $(( $(stat -c %b "$T/eager.raw") * 512 )) -ge $((2 << 20)) ] && ok "create provisioning=eager-zeroed" || fail "create provisioning=eager-zeroed"
"$VDISK" create -q -f raw -o provisioning=thin "$T/thin.raw" 2G
[ "$(stat -c %b "$T/thin.raw")" -lt 64 ] && ok "create provisioning=thin is sparse" || fail "create provisioning=thin is sparse"
check_fails "create with both provisioning= and preallocation=" "$VDISK" create -f raw -o provisioning=thin,preallocation=full "$T/both.raw" 1M
"$VDISK" create -f raw -o help > "$T/help.out"
grep -q preallocation "$T/help.out" && grep -q '^Supported raw options:' "$T/help.out" && ok "create -o help" || fail "create -o help"

# rebase: raw has no backing file
check_fails "rebase -u on raw" "$VDISK" rebase -u -f raw -b "$T/a.raw" -F raw "$T/v.raw"
check_fails "rebase without -b" "$VDISK" rebase -f raw "$T/v.raw"
check_fails "create raw with a backing file" "$VDISK" create -f raw -b "$T/a.raw" -F raw "$T/b.raw"

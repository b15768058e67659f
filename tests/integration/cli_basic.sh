#!/usr/bin/env bash
# vdisk: dispatch, help, version, create and info on raw, against qemu-img.
source "$(dirname "$0")/../lib.sh"

check "vdisk --help" "$VDISK" --help
check "vdisk --version" bash -c "'$VDISK' --version | grep -q '^vdisk version '"
check "vdisk create --help names the options" bash -c "'$VDISK' create --help | grep -q -- '-o options'"
check_fails "no command" "$VDISK"
check_fails "unknown command" "$VDISK" frobnicate
check_fails "unknown option" "$VDISK" info --bogus "$T/x"

# create prints qemu-img's line
out=$("$VDISK" create -f raw "$T/a.raw" 1G 2>&1)
[ "$out" = "Formatting '$T/a.raw', fmt=raw size=1073741824" ] && ok "create prints Formatting line" || fail "create prints Formatting line" "$out"
check "create -q is silent" bash -c "[ -z \"\$('$VDISK' create -q -f raw '$T/q.raw' 64k)\" ]"
[ "$(stat -c %s "$T/a.raw")" = 1073741824 ] && ok "create size" || fail "create size"
"$VDISK" create -f raw -o size=2M "$T/o.raw" >/dev/null && [ "$(stat -c %s "$T/o.raw")" = 2097152 ] \
    && ok "create -o size=" || fail "create -o size="

# info: JSON keys and values equal qemu-img's for raw
qemu-io -f raw -c "write -P 0x11 1M 64k" "$T/a.raw" >/dev/null
norm() { jq -S 'del(."actual-size")' ; }
a=$("$VDISK" info -f raw --output=json "$T/a.raw" | norm)
b=$(qemu-img info -f raw --output=json "$T/a.raw" | norm)
[ "$a" = "$b" ] && ok "info --output=json equals qemu-img" || fail "info --output=json equals qemu-img" "$a vs $b"
a=$("$VDISK" info -f raw --output=json "$T/a.raw" | jq '."actual-size"')
b=$(qemu-img info -f raw --output=json "$T/a.raw" | jq '."actual-size"')
[ "$a" = "$b" ] && ok "info actual-size equals qemu-img" || fail "info actual-size equals qemu-img" "$a vs $b"
a=$("$VDISK" info -f raw "$T/a.raw")
b=$(qemu-img info -f raw "$T/a.raw")
[ "$a" = "$b" ] && ok "info human equals qemu-img" || fail "info human equals qemu-img" "$(diff <(echo "$a") <(echo "$b") | tr '\n' ' ')"
a=$("$VDISK" info -f raw --backing-chain --output=json "$T/a.raw" | jq -S 'map(del(."actual-size"))')
b=$(qemu-img info -f raw --backing-chain --output=json "$T/a.raw" | jq -S 'map(del(."actual-size"))')
[ "$a" = "$b" ] && ok "info --backing-chain JSON array" || fail "info --backing-chain JSON array" "$a vs $b"

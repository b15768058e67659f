#!/usr/bin/env bash
# Raw is never guessed: a file no format claims opens only when -f raw (or
# -F raw for a backing file / compare's second image) says so, with a
# message naming the file and the option; a backing file whose format is
# not recorded is refused the same way. The old "probing guessed raw"
# warning is gone.
source "$(dirname "$0")/../lib.sh"

u=$T/plain.img              # no header of any format: raw content
printf 'just some bytes\n' > "$u"
truncate -s 1M "$u"
cp "$u" "$T/other.img"

# refused_with NAME RC PATTERN CMD...: exit status RC, PATTERN on stderr, no crash
refused_with() {
    local name=$1 want=$2 pat=$3 out rc; shift 3
    out=$("$@" 2>&1); rc=$?
    if [ $rc -ne "$want" ]; then fail "$name" "exit $rc (want $want): $(echo "$out" | head -3 | tr '\n' ' ')"
    elif grep -qE 'AddressSanitizer|runtime error|LeakSanitizer' <<<"$out"; then fail "$name" "crashed: $(echo "$out" | head -3 | tr '\n' ' ')"
    elif ! grep -qF -- "$pat" <<<"$out"; then fail "$name" "message: $(echo "$out" | tr '\n' ' ')"
    elif grep -qi "guessed raw" <<<"$out"; then fail "$name" "the old warning: $out"
    else ok "$name"; fi
}
msg="vdisk: $u: image format not recognised; pass -f raw to open it as raw"

refused_with "info refuses an unknown file" 1 "$msg" "$VDISK" info "$u"
refused_with "info --output=json refuses it" 1 "$msg" "$VDISK" info --output=json "$u"
refused_with "map refuses it" 1 "$msg" "$VDISK" map "$u"
refused_with "check refuses it" 1 "$msg" "$VDISK" check "$u"
refused_with "convert refuses it" 1 "$msg" "$VDISK" convert "$u" "$T/out.raw"
[ ! -e "$T/out.raw" ] && ok "convert created no target" || fail "convert created no target"
refused_with "convert -O qcow2 refuses it" 1 "$msg" "$VDISK" convert -O qcow2 "$u" "$T/out.qcow2"
refused_with "resize refuses it" 1 "$msg" "$VDISK" resize "$u" 2M
[ "$(stat -c %s "$u")" = 1048576 ] && ok "resize left the file alone" || fail "resize left the file alone"
refused_with "io refuses it" 1 "$msg" "$VDISK" io -c "write 0 4k" "$u"
refused_with "io -r refuses it" 1 "$msg" "$VDISK" io -r -c "read 0 4k" "$u"
# compare keeps its documented status: 2 = error (1 means "differ")
refused_with "compare refuses the first image (status 2)" 2 "$msg" "$VDISK" compare "$u" "$T/other.img"
refused_with "compare names -F for the second image" 2 \
    "vdisk: $T/other.img: image format not recognised; pass -F raw to open it as raw" \
    "$VDISK" compare -f raw "$u" "$T/other.img"
refused_with "import of a lone raw disk refuses it" 1 "$msg" "$VDISK" import "$u" "$T/imp.raw"
refused_with "create -b raw without -F refuses it" 1 \
    "vdisk: $u: image format not recognised; pass -F raw to open it as raw" \
    "$VDISK" create -f qcow2 -b "$u" "$T/ov.qcow2"
[ ! -e "$T/ov.qcow2" ] && ok "create -b made no image" || fail "create -b made no image"
refused_with "convert -B raw without -F refuses it" 1 "pass -F raw to open it as raw" \
    "$VDISK" convert -f raw -O qcow2 -B "$u" "$T/other.img" "$T/cb.qcow2"
refused_with "rebase -b raw without -F refuses it" 1 "pass -F raw to open it as raw" \
    "$VDISK" rebase -u -b "$u" "$T/nothing.qcow2"
# an empty file is not guessed either
: > "$T/empty"
refused_with "an empty file is refused" 1 "image format not recognised" "$VDISK" info "$T/empty"

# the same with the format given: works, and says nothing about probing
check "info -f raw" "$VDISK" info -f raw "$u"
check "map -f raw" "$VDISK" map -f raw "$u"
out=$("$VDISK" check -f raw "$u" 2>&1); rc=$?
[ $rc -eq 63 ] || [ $rc -eq 0 ] && ok "check -f raw opens it (status $rc)" || fail "check -f raw opens it" "rc $rc: $out"
check "convert -f raw" "$VDISK" convert -f raw "$u" "$T/out.raw"
check "convert -f raw -O qcow2" "$VDISK" convert -f raw -O qcow2 "$u" "$T/out.qcow2"
cp "$u" "$T/grow.img"
check "resize -f raw" "$VDISK" resize -f raw "$T/grow.img" 2M
[ "$(stat -c %s "$T/grow.img")" = 2097152 ] && ok "resize -f raw grew it" || fail "resize -f raw grew it"
out=$("$VDISK" io -f raw -c "write -P 0x61 4096 4k" -c "read -P 0x61 4096 4k" "$T/grow.img" 2>&1)
[ $? -eq 0 ] && ! grep -qi "warning" <<<"$out" && ok "io -f raw: no warning" || fail "io -f raw: no warning" "$out"
"$VDISK" compare -f raw -F raw "$u" "$T/other.img" > /dev/null; rc=$?
[ $rc -eq 0 ] && ok "compare -f raw -F raw: identical" || fail "compare -f raw -F raw: identical" "rc $rc"
check "import -f raw" "$VDISK" import -f raw "$u" "$T/imp.raw"
cmp -s "$u" "$T/imp.raw" && ok "import -f raw copied it" || fail "import -f raw copied it"
check "create -b raw -F raw" "$VDISK" create -q -f qcow2 -b "$u" -F raw "$T/ov.qcow2"
[ "$(qemu-img info --output=json "$T/ov.qcow2" | jq -r '."backing-filename-format"')" = raw ] \
    && ok "the backing format is recorded" || fail "the backing format is recorded"
check "convert -B raw -F raw" "$VDISK" convert -f raw -O qcow2 -B "$u" -F raw "$T/other.img" "$T/cb.qcow2"

# A backing file whose format is not recorded: probed, and refused when
# nothing claims it, with the way to record it.
"$VDISK" create -q -f qcow2 -u -b "$(basename "$u")" -o size=1M "$T/norec.qcow2"
[ "$(qemu-img info --output=json "$T/norec.qcow2" | jq -r '."backing-filename-format" // "none"')" = none ] \
    && ok "create -u -b records no backing format" || fail "create -u -b records no backing format"
hint="vdisk rebase -u -b $(basename "$u") -F raw $T/norec.qcow2"
for c in map "convert -O raw" "compare -F raw" "io -c flush"; do
    set -- $c
    cmd=$1; shift
    if [ "$cmd" = convert ]; then extra=("$T/norec.raw"); elif [ "$cmd" = compare ]; then extra=("$u"); else extra=(); fi
    refused_with "$cmd: unrecorded raw backing is refused" "$([ "$cmd" = compare ] && echo 2 || echo 1)" "$hint" \
        "$VDISK" "$cmd" "$@" "$T/norec.qcow2" "${extra[@]}"
done
refused_with "info --backing-chain: unrecorded raw backing is refused" 1 "$hint" \
    "$VDISK" info --backing-chain "$T/norec.qcow2"
check "info of the top alone still works" "$VDISK" info "$T/norec.qcow2"
check "rebase -u -F raw records it" "$VDISK" rebase -u -b "$(basename "$u")" -F raw "$T/norec.qcow2"
check "then the chain opens" "$VDISK" map "$T/norec.qcow2"
check "and info --backing-chain shows it" "$VDISK" info --backing-chain "$T/norec.qcow2"
# a qcow2 backing file with no recorded format is still found by its magic
"$VDISK" create -q -f qcow2 "$T/base.qcow2" 1M
"$VDISK" create -q -f qcow2 -u -b base.qcow2 -o size=1M "$T/top.qcow2"
check "an unrecorded qcow2 backing file is probed" "$VDISK" map "$T/top.qcow2"

# nothing in the sources still prints the old fallback warning
if grep -rqi "probing guessed raw" "$VDISK_ROOT/tools" "$VDISK_ROOT/block" "$VDISK_ROOT/formats"; then
    fail "the old warning is gone from the sources"
else
    ok "the old warning is gone from the sources"
fi

#!/usr/bin/env bash
# Bad input to every command: a clear error, a non-zero exit, no crash.
source "$(dirname "$0")/../lib.sh"

"$VDISK" create -q -f raw "$T/ok.raw" 1M
missing=$T/nonexistent.raw

# missing files
for c in "info" "map" "check" "resize $missing 1G" "io -c flush" "rebase -u -b x -F raw"; do
    set -- $c
    if [ "$1" = resize ]; then check_fails "resize: missing file" "$VDISK" resize "$missing" 1G; continue; fi
    check_fails "$1: missing file" "$VDISK" "$@" "$missing"
done
check_fails "compare: missing file" "$VDISK" compare "$missing" "$T/ok.raw"
check_fails "convert: missing source" "$VDISK" convert "$missing" "$T/out.raw"
out=$("$VDISK" info "$missing" 2>&1)
grep -q "nonexistent.raw" <<<"$out" && grep -qi "no such file" <<<"$out" && ok "error names the file and the cause" \
    || fail "error names the file and the cause" "$out"

# unreadable (as an unprivileged user: root reads anything)
chmod 755 "$T"
"$VDISK" create -q -f raw "$T/secret.raw" 1M
chmod 000 "$T/secret.raw"
as_nobody() { runuser -u nobody -- "$@"; }
check_fails "info: unreadable file" as_nobody "$VDISK" info -f raw "$T/secret.raw"
check_fails "map: unreadable file" as_nobody "$VDISK" map -f raw "$T/secret.raw"
check_fails "convert: unreadable source" as_nobody "$VDISK" convert -f raw "$T/secret.raw" "$T/nobody.raw"
out=$(as_nobody "$VDISK" info -f raw "$T/secret.raw" 2>&1)
grep -qi "permission denied" <<<"$out" && ok "unreadable: says permission denied" || fail "unreadable: says permission denied" "$out"
chmod 444 "$T/ok.raw"
check_fails "io write: read-only file" as_nobody "$VDISK" io -f raw -c "write 0 4k" "$T/ok.raw"
check_fails "create in an unwritable folder" as_nobody "$VDISK" create -f raw "$T/new.raw" 1M
chmod 644 "$T/ok.raw"

# wrong formats
check_fails "info -f bogus" "$VDISK" info -f bogus "$T/ok.raw"
check_fails "create -f bogus" "$VDISK" create -f bogus "$T/x.raw" 1M
check_fails "convert -O bogus" "$VDISK" convert -f raw -O bogus "$T/ok.raw" "$T/x.raw"
check_fails "info of a folder" "$VDISK" info -f raw "$T"
if grep -q 'formats:.*qcow2' <<<"$("$VDISK" --help)"; then
    check_fails "info -f qcow2 of a raw file" "$VDISK" info -f qcow2 "$T/ok.raw"
fi

# absurd and malformed sizes
for s in 16E 8E -5 1Q "" abc 1.5.5G 99999999999999999999; do
    check_fails "create size '$s'" "$VDISK" create -f raw "$T/size.raw" "$s"
done
check_fails "create without a size" "$VDISK" create -f raw "$T/nosize.raw"
check_fails "resize to 16E" "$VDISK" resize -f raw "$T/ok.raw" 16E
check_fails "resize +8E" "$VDISK" resize -f raw "$T/ok.raw" +8E
check_fails "map -s junk" "$VDISK" map -f raw -s junk "$T/ok.raw"

# malformed -o strings
for o in "foo=bar" "preallocation=bogus" "provisioning=" "=1" "size=abc" "size=16E"; do
    check_fails "create -o '$o'" "$VDISK" create -f raw -o "$o" "$T/o.raw" 1M
done
check_fails "convert -o foo=bar" "$VDISK" convert -f raw -o foo=bar "$T/ok.raw" "$T/o2.raw"

# bad options and commands
check_fails "info --output=xml" "$VDISK" info --output=xml "$T/ok.raw"
check_fails "info, two files" "$VDISK" info "$T/ok.raw" "$T/ok.raw"
check_fails "io: unknown command" "$VDISK" io -f raw -c "frob 0 1" "$T/ok.raw"
check_fails "io: bad offset" "$VDISK" io -f raw -c "read -5 4k" "$T/ok.raw"
check_fails "io: huge length" "$VDISK" io -f raw -c "read 0 8E" "$T/ok.raw"
check_fails "io: bad pattern" "$VDISK" io -f raw -c "write -P 0x1ff 0 4k" "$T/ok.raw"
check_fails "io: --aio=bogus" "$VDISK" io --aio=bogus -f raw -c flush "$T/ok.raw"
check_fails "io: --cache=bogus" "$VDISK" io --cache=bogus -f raw -c flush "$T/ok.raw"
check_fails "option missing its argument" "$VDISK" create -f
check_fails "convert -S junk" "$VDISK" convert -S junk -f raw "$T/ok.raw" "$T/s.raw"

# an image in use by another vdisk: refused with a hint at -U; -U reads it
"$VDISK" create -q -f raw "$T/busy.raw" 1M
"$VDISK" io -f raw -c "sleep 60000" "$T/busy.raw" & holder=$!
on_exit "kill $holder 2>/dev/null"
for ((i = 0; i < 50; i++)); do "$VDISK" io -f raw -c flush "$T/busy.raw" > /dev/null 2>&1 || break; sleep 0.1; done
check_fails "info of an image in use" "$VDISK" info -f raw "$T/busy.raw"
out=$("$VDISK" info -f raw "$T/busy.raw" 2>&1)
grep -q -- "-U" <<<"$out" && ok "in use: the message suggests -U" || fail "in use: the message suggests -U" "$out"
check "info -U of an image in use" "$VDISK" info -U -f raw "$T/busy.raw"
check_fails "writing to an image in use" "$VDISK" io -f raw -c "write 0 4k" "$T/busy.raw"
kill $holder 2>/dev/null; wait $holder 2>/dev/null || true

#!/usr/bin/env bash
# The vdisk commands on qcow2 images made by qemu-img and qemu-io (and the
# other way round): info, map, check, convert (-c, -B), rebase, compare.
source "$(dirname "$0")/../lib.sh"
if ! grep -q '^Supported formats:.* qcow2' <<<"$("$VDISK" --help)"; then
    ok "# SKIP qcow2 is not built in"; exit 0
fi
cd "$T"

# base.raw <- top.qcow2, data in both
rand_file base.raw 8 base
fallocate -p -o 2M -l 4M base.raw
qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2 8M
qemu-io -f qcow2 -c "write -P 0x11 0 64k" -c "write -P 0x22 3M 192k" -c "write -z 5M 64k" -c "write -P 0x33 7M 1M" \
    top.qcow2 > /dev/null

# info equals qemu-img's (but for actual-size), JSON and human, with the chain
nojs() { jq -S 'if type == "array" then map(del(."actual-size")) else del(."actual-size") end'; }
a=$("$VDISK" info --output=json top.qcow2 | nojs); b=$(qemu-img info --output=json top.qcow2 | nojs)
[ "$a" = "$b" ] && ok "info --output=json" || fail "info --output=json" "$(diff <(echo "$b") <(echo "$a") | head -5 | tr '\n' ' ')"
a=$("$VDISK" info --backing-chain --output=json top.qcow2 | nojs); b=$(qemu-img info --backing-chain --output=json top.qcow2 | nojs)
[ "$a" = "$b" ] && ok "info --backing-chain --output=json" || fail "info --backing-chain --output=json" "$(diff <(echo "$b") <(echo "$a") | head -5 | tr '\n' ' ')"
a=$("$VDISK" info top.qcow2 | grep -v '^disk size:'); b=$(qemu-img info top.qcow2 | grep -v '^disk size:')
[ "$a" = "$b" ] && ok "info human" || fail "info human" "$(diff <(echo "$b") <(echo "$a") | head -5 | tr '\n' ' ')"
a=$("$VDISK" info "$T/top.qcow2" | grep '^backing file:'); b=$(qemu-img info "$T/top.qcow2" | grep '^backing file:')
[ "$a" = "$b" ] && ok "info: backing file's actual path" || fail "info: backing file's actual path" "$a vs $b"

# map equals qemu-img's, text for text
for args in "--output=json" "--output=human" "--output=json -s 1000000 -l 3000000"; do
    a=$("$VDISK" map $args top.qcow2); b=$(qemu-img map $args top.qcow2)
    [ "$a" = "$b" ] && ok "map $args" || fail "map $args" "$(diff <(echo "$b") <(echo "$a") | head -5 | tr '\n' ' ')"
done

# check: clean image, same JSON
a=$("$VDISK" check --output=json top.qcow2); rc=$?
b=$(qemu-img check --output=json top.qcow2)
[ $rc -eq 0 ] && [ "$(jq -S . <<<"$a")" = "$(jq -S . <<<"$b")" ] && ok "check --output=json" || fail "check --output=json" "rc $rc: $a"

# compare across formats, and with a difference
qemu-img convert -f qcow2 -O raw top.qcow2 flat.raw
both_compare() { "$VDISK" compare "$@" > /dev/null 2>&1; echo $?; }
[ "$(both_compare top.qcow2 -F raw flat.raw)" = 0 ] && ok "compare qcow2 with its raw copy" || fail "compare qcow2 with its raw copy"
qemu-io -f qcow2 -c "write -P 0x44 6M 4k" top.qcow2 > /dev/null
a=$("$VDISK" compare -F raw top.qcow2 flat.raw); rc=$?; b=$(qemu-img compare -F raw top.qcow2 flat.raw)
[ $rc -eq 1 ] && [ "$a" = "$b" ] && ok "compare finds the difference as qemu-img" || fail "compare finds the difference as qemu-img" "$a / $b"
qemu-img convert -f qcow2 -O raw top.qcow2 flat.raw

# convert: qcow2 chain -> raw, raw -> qcow2 (plain and compressed)
check "convert qcow2 chain -> raw" "$VDISK" convert -O raw top.qcow2 v.raw
check "  content equals qemu-img's" cmp v.raw flat.raw
check "convert raw -> qcow2" "$VDISK" convert -f raw -O qcow2 flat.raw v.qcow2
check "  qemu-img compare" qemu-img compare -f raw flat.raw v.qcow2
check "  qemu-img check" qemu-img check v.qcow2
a=$("$VDISK" map --output=json v.qcow2 | jq -c '[.[] | select(.data)] | map(.length) | add')
b=$(qemu-img convert -f raw -O qcow2 flat.raw q.qcow2 && qemu-img map --output=json q.qcow2 | jq -c '[.[] | select(.data)] | map(.length) | add')
[ "$a" = "$b" ] && ok "  as much data as qemu-img's copy ($a bytes)" || fail "  as much data as qemu-img's copy" "$a vs $b"
check "convert -c raw -> qcow2" "$VDISK" convert -c -f raw -O qcow2 flat.raw c.qcow2
check "  qemu-img compare" qemu-img compare -f raw flat.raw c.qcow2
check "  qemu-img check" qemu-img check c.qcow2
n=$(qemu-img check --output=json c.qcow2 | jq '."compressed-clusters" // 0')
[ "$n" -gt 0 ] && ok "  clusters are compressed ($n)" || fail "  clusters are compressed" "$n"
check "convert -c -W -m 16" "$VDISK" convert -c -W -m 16 -f raw -O qcow2 flat.raw c2.qcow2
check "  qemu-img compare" qemu-img compare -f raw flat.raw c2.qcow2

# convert -B: only what the source's top holds is copied
check "convert -B" "$VDISK" convert -O qcow2 -B base.raw -F raw top.qcow2 b.qcow2
check "  content equals the chain" qemu-img compare -F raw b.qcow2 flat.raw
a=$(qemu-img info --output=json b.qcow2 | jq -r '."backing-filename"')
[ "$a" = base.raw ] && ok "  backing file recorded" || fail "  backing file recorded" "$a"
a=$(qemu-img map --output=json b.qcow2 | jq '[.[] | select(.depth == 0 and .data)] | map(.length) | add')
[ "$a" -le $((2 << 20)) ] && ok "  only the top's data copied ($a bytes)" || fail "  only the top's data copied" "$a"

# rebase: unsafe (header only), safe (content kept)
cp base.raw base2.raw
check "rebase -u" "$VDISK" rebase -u -b base2.raw -F raw top.qcow2
a=$(qemu-img info --output=json top.qcow2 | jq -r '."backing-filename" + " " + ."backing-filename-format"')
[ "$a" = "base2.raw raw" ] && ok "  qemu-img sees the new backing file" || fail "  qemu-img sees the new backing file" "$a"
check "  content unchanged" qemu-img compare -F raw top.qcow2 flat.raw
rand_file other.raw 8 other
check "rebase (safe) onto another base" "$VDISK" rebase -b other.raw -F raw top.qcow2
check "  content unchanged" qemu-img compare -F raw top.qcow2 flat.raw
check "  qemu-img check" qemu-img check top.qcow2
check "rebase (safe) to no backing file" "$VDISK" rebase -b "" top.qcow2
check "  content unchanged" qemu-img compare -F raw top.qcow2 flat.raw
a=$(qemu-img info --output=json top.qcow2 | jq -r '."backing-filename" // "none"')
[ "$a" = none ] && ok "  no backing file left" || fail "  no backing file left" "$a"
check_fails "rebase -u onto raw without -F" "$VDISK" rebase -u -b base.raw v.qcow2

# create with a backing file: size from the backing file
check "create -b (size from the backing file)" "$VDISK" create -q -f qcow2 -b base.raw -F raw new.qcow2
a=$(qemu-img info --output=json new.qcow2 | jq '."virtual-size"')
[ "$a" = $((8 << 20)) ] && ok "  virtual size from the backing file" || fail "  virtual size from the backing file" "$a"
check_fails "create -b missing file" "$VDISK" create -f qcow2 -b nonexistent.raw -F raw new2.qcow2
check "create -u -b missing file with a size" "$VDISK" create -q -f qcow2 -u -b nonexistent.raw -F raw new3.qcow2 1M

# check exit codes and repairs on damaged images, against qemu-img check
qemu-img create -q -f qcow2 dmg.qcow2 4M
qemu-io -c "write -P 1 0 64k" -c "write -P 2 1M 64k" dmg.qcow2 > /dev/null
python3 - <<'PY'
import struct
with open('dmg.qcow2', 'r+b') as f:
    h = f.read(104)
    l1 = struct.unpack('>Q', h[40:48])[0]
    f.seek(l1); l2 = struct.unpack('>Q', f.read(8))[0] & 0x00fffffffffffe00
    f.seek(l2 + 16 * 8); f.write(b'\0' * 8)          # drop guest cluster 16: a leak
PY
cp dmg.qcow2 corrupt.qcow2
python3 - <<'PY'
import struct
with open('corrupt.qcow2', 'r+b') as f:
    h = f.read(104)
    rt = struct.unpack('>Q', h[48:56])[0]
    f.seek(rt); rb = struct.unpack('>Q', f.read(8))[0]
    f.seek(rb + 5 * 2); f.write(b'\0\0')             # refcount 0 of a used cluster: corruption
PY
chk() { "$@" > /dev/null 2>&1; echo $?; }
a=$(chk "$VDISK" check dmg.qcow2); b=$(chk qemu-img check dmg.qcow2)
[ "$a" = 3 ] && [ "$b" = 3 ] && ok "check: leaks only, exit 3 (as qemu-img)" || fail "check: leaks only, exit 3" "vdisk $a qemu-img $b"
n=$("$VDISK" check --output=json dmg.qcow2 2>/dev/null | jq .leaks)
[ "$n" = 1 ] && ok "check --output=json counts the leak" || fail "check --output=json counts the leak" "$n"
a=$(chk "$VDISK" check corrupt.qcow2); b=$(chk qemu-img check corrupt.qcow2)
[ "$a" = 2 ] && [ "$b" = 2 ] && ok "check: corruption, exit 2 (as qemu-img)" || fail "check: corruption, exit 2" "vdisk $a qemu-img $b"
out=$("$VDISK" check -r leaks dmg.qcow2 2>/dev/null); rc=$?
[ $rc -eq 0 ] && grep -q "1 leaked clusters" <<<"$out" && ok "check -r leaks repairs" || fail "check -r leaks repairs" "$rc: $out"
check "  qemu-img check agrees" qemu-img check dmg.qcow2
a=$(chk "$VDISK" check -r leaks corrupt.qcow2)
[ "$a" = 2 ] && ok "check -r leaks leaves the corruption (exit 2)" || fail "check -r leaks leaves the corruption" "$a"
check "check -r all repairs" "$VDISK" check -r all corrupt.qcow2
check "  qemu-img check agrees" qemu-img check corrupt.qcow2
out=$(qemu-io -c "read -P 1 0 64k" corrupt.qcow2 2>&1)
grep -q "^read 65536/65536" <<<"$out" && ! grep -q "verification failed" <<<"$out" && ok "  data intact" || fail "  data intact" "$out"
check_fails "check -r with -U" "$VDISK" check -r all -U corrupt.qcow2

# internal snapshots (made by qemu-img) in info, human and JSON
qemu-img create -q -f qcow2 snap.qcow2 16M
qemu-io -c "write -P 1 0 64k" snap.qcow2 > /dev/null
qemu-img snapshot -c snap1 snap.qcow2
qemu-img snapshot -c "second snapshot" snap.qcow2
a=$("$VDISK" info snap.qcow2 | grep -v '^disk size:'); b=$(qemu-img info snap.qcow2 | grep -v '^disk size:')
[ "$a" = "$b" ] && ok "info human with a snapshot list" || fail "info human with a snapshot list" "$(diff <(echo "$b") <(echo "$a") | head -5 | tr '\n' ' ')"
a=$("$VDISK" info --output=json snap.qcow2 | nojs); b=$(qemu-img info --output=json snap.qcow2 | nojs)
[ "$a" = "$b" ] && ok "info JSON with snapshots" || fail "info JSON with snapshots" "$(diff <(echo "$b") <(echo "$a") | head -5 | tr '\n' ' ')"

# compressed clusters: JSON map as qemu-img's; the human map refuses, as qemu-img
qemu-img create -q -f qcow2 cc.qcow2 4M
qemu-io -c "write -c -P 7 0 64k" -c "write -P 8 64k 64k" cc.qcow2 > /dev/null
a=$("$VDISK" map --output=json cc.qcow2); b=$(qemu-img map --output=json cc.qcow2)
[ "$a" = "$b" ] && ok "map --output=json with a compressed cluster" || fail "map --output=json with a compressed cluster" "$a"
out=$("$VDISK" map cc.qcow2 2>&1); rc=$?
[ $rc -eq 1 ] && grep -q "compressed clusters" <<<"$out" && ok "human map refuses compressed clusters" || fail "human map refuses compressed clusters" "$rc: $out"

# a backing name with a colon is still a local path, relative to the image's folder
mkdir -p sub && head -c 1M /dev/urandom > "sub/a:b.raw"
check "create -b with a colon in a relative backing name" "$VDISK" create -q -f qcow2 -b "a:b.raw" -F raw sub/colon.qcow2
check "convert reads through a relative backing name with a colon" "$VDISK" convert -O raw sub/colon.qcow2 colon.raw
cmp -s colon.raw "sub/a:b.raw" && ok "data through the colon-named backing file" || fail "data through the colon-named backing file"
[ "$(qemu-img info --output=json sub/colon.qcow2 | jq -r '.["backing-filename"]')" = "a:b.raw" ] \
    && ok "backing name recorded as given" || fail "backing name recorded as given"

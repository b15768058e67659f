#!/usr/bin/env bash
# Malformed VMDK and VHD images: headers, descriptors, grain directories and
# tables, compressed grains, footers, BATs, locators and bitmaps. Each gives a
# clear error and a non-zero exit, never a crash.
source "$(dirname "$0")/../lib.sh"

# patch FILE OFFSET HEX: overwrite bytes
patch() { printf "$(sed 's/../\\x&/g' <<<"$3")" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none; }
le32() { printf '%02x%02x%02x%02x' $(($1 & 255)) $((($1 >> 8) & 255)) $((($1 >> 16) & 255)) $((($1 >> 24) & 255)); }
be32() { printf '%08x' "$1"; }
rd() { "$VDISK" io -r -c "read 0 64k" -c "read 1M 64k" "$1"; }
# bad NAME FILE PATTERN: reading fails, the message matches PATTERN
bad() {
    local name=$1 img=$2 pat=$3 out rc
    out=$(rd "$img" 2>&1); rc=$?
    if [ $rc -eq 0 ]; then fail "$name" "accepted"
    elif [ $rc -ge 128 ] || grep -qE 'AddressSanitizer|runtime error|LeakSanitizer' <<<"$out"; then fail "$name" "crashed: $(head -3 <<<"$out")"
    elif ! grep -qiE "$pat" <<<"$out"; then fail "$name" "message: $out"
    else ok "$name"; fi
}

mk() { # mk NAME: a fresh monolithicSparse with data at 0 and 1M
    "$VDISK" create -q -f vmdk "$T/$1.vmdk" 8M && "$VDISK" io -c "write -P 0x11 0 64k" -c "write -P 0x12 1M 64k" "$T/$1.vmdk" >/dev/null
}
mk good
check "the unpatched image reads" rd "$T/good.vmdk"
gd=$(od -An -tu8 -j56 -N8 "$T/good.vmdk" | tr -d ' ')
gt=$(od -An -tu4 -j$((gd * 512)) -N4 "$T/good.vmdk" | tr -d ' ')

mk v; patch "$T/v.vmdk" 4 "$(le32 9)";            bad "vmdk: unknown header version" "$T/v.vmdk" "version 9"
mk g; patch "$T/g.vmdk" 20 "$(le32 100)";         bad "vmdk: grain size not a power of two" "$T/g.vmdk" "grain size"
mk g0; patch "$T/g0.vmdk" 20 "$(le32 0)";         bad "vmdk: grain size 0" "$T/g0.vmdk" "grain size"
mk n; patch "$T/n.vmdk" 44 "$(le32 0)";           bad "vmdk: zero entries per grain table" "$T/n.vmdk" "grain table"
mk c; patch "$T/c.vmdk" 12 "0000000000000001";    bad "vmdk: absurd capacity" "$T/c.vmdk" "capacity"
mk d; patch "$T/d.vmdk" 56 "00000000ff000000";    bad "vmdk: grain directory outside the file" "$T/d.vmdk" "grain directory"
mk r; patch "$T/r.vmdk" 48 "00000000ff000000";    bad "vmdk: redundant directory outside the file" "$T/r.vmdk" "redundant grain directory"
mk e; patch "$T/e.vmdk" $((gd * 512)) "$(le32 0x7fffffff)"; bad "vmdk: directory entry past the end" "$T/e.vmdk" "past the end"
mk t; patch "$T/t.vmdk" $((gt * 512)) "$(le32 0x7ffffff0)"; bad "vmdk: grain table entry past the end" "$T/t.vmdk" "past the end"
mk h; patch "$T/h.vmdk" $((gt * 512)) "$(le32 0)"; patch "$T/h.vmdk" $((gt * 512 + 64)) "$(le32 0)"
patch "$T/h.vmdk" $((gt * 512)) "$(le32 1)";      bad "vmdk: grain table entry inside the header" "$T/h.vmdk" "header"
mk nl; patch "$T/nl.vmdk" 73 "0a200a0a";          bad "vmdk: damaged newline test" "$T/nl.vmdk" "newline"
mk cz; patch "$T/cz.vmdk" 77 "0700"; patch "$T/cz.vmdk" 8 "$(le32 $((0x10003)))"
bad "vmdk: unknown compression" "$T/cz.vmdk" "compression"

# descriptors (separate files)
"$VDISK" create -q -f vmdk -o subformat=monolithicFlat "$T/f.vmdk" 8M
desc() { cp "$T/f.vmdk" "$T/$1.vmdk"; }
desc a; sed -i '/createType/d' "$T/a.vmdk";                 bad "descriptor without createType" "$T/a.vmdk" "createType"
desc b; sed -i 's/^RW .*/RW 16384 FLAT "nothere.vmdk" 0/' "$T/b.vmdk"; bad "extent file missing" "$T/b.vmdk" "nothere"
desc c; sed -i 's/^RW 16384/RW 99999999/' "$T/c.vmdk";       bad "flat extent larger than its file" "$T/c.vmdk" "needs"
desc d; sed -i 's/^RW 16384/RW -5/' "$T/d.vmdk";             bad "negative extent size" "$T/d.vmdk" "extent size"
desc e; sed -i 's/ FLAT / BOGUS /' "$T/e.vmdk";              bad "unknown extent type" "$T/e.vmdk" "extent type"
desc g; sed -i 's/^RW .*/RW 16384 FLAT "f-flat.vmdk/' "$T/g.vmdk"; bad "unterminated file name" "$T/g.vmdk" "file name"
desc h; sed -i 's/^CID=.*/CID=xyz/' "$T/h.vmdk";             bad "bad CID" "$T/h.vmdk" "CID"
desc i; sed -i '/^RW /d' "$T/i.vmdk";                        bad "no extents" "$T/i.vmdk" "extent"
desc j; sed -i 's/^version=1/version=7/' "$T/j.vmdk";        bad "unknown descriptor version" "$T/j.vmdk" "version"
desc k; sed -i 's/^parentCID=ffffffff/parentCID=12345678/' "$T/k.vmdk"; bad "delta without parentFileNameHint" "$T/k.vmdk" "parentFileNameHint"
desc l; printf 'createType="vmfsRDM"\n' >> "$T/l.vmdk";     bad "raw device mappings refused" "$T/l.vmdk" "not supported"
desc m; sed -i 's/^ddb.adapterType.*/just some words/' "$T/m.vmdk"; bad "line that is neither key nor extent" "$T/m.vmdk" "neither"
printf '# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\nRW 100 FLAT "x\001y" 0\n' > "$T/ctl.vmdk"
bad "control characters in a descriptor" "$T/ctl.vmdk" "control character|unknown image format"
# sparse extent whose capacity is smaller than its descriptor line
mk s; sed -i 's/^RW 16384 SPARSE/RW 32768 SPARSE/' "$T/s.vmdk" 2>/dev/null
bad "extent sizes do not add up" "$T/s.vmdk" "holds 16384 sectors"

# a ZERO extent reads as zeros; writing it is refused
printf '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 16384 FLAT "f-flat.vmdk" 0\nRW 2048 ZERO\n' > "$T/z.vmdk"
check "ZERO extent reads zeros" "$VDISK" io -r -c "read -P 0 8M 1M" "$T/z.vmdk"
check_fails "writing a ZERO extent is refused" "$VDISK" io -c "write -P 1 8M 4k" "$T/z.vmdk"
printf '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRDONLY 16384 FLAT "f-flat.vmdk" 0\n' > "$T/ro.vmdk"
check "RDONLY extent reads" "$VDISK" io -r -c "read 0 4k" "$T/ro.vmdk"
check_fails "writing an RDONLY extent is refused" "$VDISK" io -c "write -P 1 0 4k" "$T/ro.vmdk"

# compressed grains: garbage and wrong LBA
"$VDISK" create -q -f vmdk -o subformat=streamOptimized "$T/so.vmdk" 8M
"$VDISK" io -c "write -P 0x11 0 64k" -c "write -P 0x12 1M 64k" "$T/so.vmdk" >/dev/null
cp "$T/so.vmdk" "$T/so1.vmdk"; patch "$T/so1.vmdk" $((65536 + 14)) "deadbeefdeadbeefdeadbeef"
bad "compressed grain that does not inflate" "$T/so1.vmdk" "inflate"
cp "$T/so.vmdk" "$T/so2.vmdk"; patch "$T/so2.vmdk" 65536 "0500000000000000"
bad "compressed grain for another sector" "$T/so2.vmdk" "is for sector"
cp "$T/so.vmdk" "$T/so3.vmdk"; truncate -s -1024 "$T/so3.vmdk"
bad "stream without its footer" "$T/so3.vmdk" "footer"

# ---- VHD ----
"$VDISK" create -q -f vhd "$T/dyn.vhd" 8M
"$VDISK" io -c "write -P 0x11 0 64k" "$T/dyn.vhd" >/dev/null
"$VDISK" create -q -f vhd -o subformat=fixed "$T/fix.vhd" 8M
fs=$(stat -c %s "$T/fix.vhd")
cp "$T/fix.vhd" "$T/x1.vhd"; patch "$T/x1.vhd" $((fs - 512 + 48)) "00000000ffffffff"
bad "vhd: fixed footer checksum mismatch" "$T/x1.vhd" "checksum"
cp "$T/dyn.vhd" "$T/x2.vhd"; patch "$T/x2.vhd" $((512 + 32)) "$(be32 3000)"
bad "vhd: dynamic header checksum mismatch" "$T/x2.vhd" "checksum"
# fix-up helper: recompute the dynamic header checksum after a patch
fixsum() { python3 - "$1" <<'EOF'
import sys
p=sys.argv[1]; b=bytearray(open(p,'rb').read())
h=b[512:1536]; h[36:40]=b'\0\0\0\0'; s=(~sum(h))&0xffffffff
b[512+36:512+40]=s.to_bytes(4,'big'); open(p,'wb').write(b)
EOF
}
cp "$T/dyn.vhd" "$T/x3.vhd"; patch "$T/x3.vhd" $((512 + 32)) "$(be32 3000)"; fixsum "$T/x3.vhd"
bad "vhd: block size not a power of two" "$T/x3.vhd" "block size"
cp "$T/dyn.vhd" "$T/x4.vhd"; patch "$T/x4.vhd" $((512 + 28)) "$(be32 1)"; fixsum "$T/x4.vhd"
bad "vhd: BAT too small for the disk" "$T/x4.vhd" "BAT has"
cp "$T/dyn.vhd" "$T/x5.vhd"; patch "$T/x5.vhd" $((512 + 16)) "00000000ff000000"; fixsum "$T/x5.vhd"
bad "vhd: BAT outside the file" "$T/x5.vhd" "outside"
bat=$(od -An -tu8 --endian=big -j$((512 + 16)) -N8 "$T/dyn.vhd" | tr -d ' ')
cp "$T/dyn.vhd" "$T/x6.vhd"; patch "$T/x6.vhd" "$bat" "$(be32 0x7fffff00)"
bad "vhd: BAT entry past the end" "$T/x6.vhd" "past the end"
cp "$T/dyn.vhd" "$T/x7.vhd"; patch "$T/x7.vhd" "$bat" "$(be32 2)"
bad "vhd: BAT entry inside the metadata" "$T/x7.vhd" "metadata"
cp "$T/dyn.vhd" "$T/x8.vhd"; patch "$T/x8.vhd" 512 "6e6f7473706172"
bad "vhd: no dynamic header cookie" "$T/x8.vhd" "cxsparse"
python3 - "$T/x9.vhd" <<'EOF'
import sys
b=bytearray(512); b[0:8]=b'conectix'; b[60:64]=(7).to_bytes(4,'big'); b[48:56]=(1<<20).to_bytes(8,'big')
b[64:68]=((~sum(b))&0xffffffff).to_bytes(4,'big'); open(sys.argv[1],'wb').write(bytes(1<<20)+b)
EOF
bad "vhd: unknown disk type" "$T/x9.vhd" "disk type"
# differencing: locator outside the file; a garbage bitmap is just data
"$VDISK" create -q -f vhd -b dyn.vhd "$T/diff.vhd"
"$VDISK" io -c "write -P 0x22 4k 4k" "$T/diff.vhd" >/dev/null
cp "$T/diff.vhd" "$T/x10.vhd"; patch "$T/x10.vhd" $((512 + 576 + 16)) "00000000ff000000"; fixsum "$T/x10.vhd"
bad "vhd: parent locator outside the file" "$T/x10.vhd" "locator"
dbat=$(od -An -tu8 --endian=big -j$((512 + 16)) -N8 "$T/diff.vhd" | tr -d ' ')
blk=$(od -An -tu4 --endian=big -j"$dbat" -N4 "$T/diff.vhd" | tr -d ' ')
cp "$T/diff.vhd" "$T/x11.vhd"; patch "$T/x11.vhd" $((blk * 512)) "a5a5a5a5a5a5a5a5"
check "vhd: any bitmap pattern reads without error" "$VDISK" io -r -c "read 0 64k" "$T/x11.vhd"
cp "$T/diff.vhd" "$T/x12.vhd"; patch "$T/x12.vhd" $((blk * 512)) "ff"
check "vhd: bitmap bits select child or parent (MSB first)" "$VDISK" io -r -c "read -P 0 0 4k" \
    -c "read -P 0x22 4k 4k" -c "read -P 0x11 8k 4k" "$T/x12.vhd"
check_fails "truncated to nothing" bash -c ": > '$T/empty.vhd'; '$VDISK' io -f vhd -r -c 'read 0 512' '$T/empty.vhd'"

# ESX vmfsSparse: a COWD extent (header, directory, a 4096-entry table)
python3 - "$T/esx-delta.vmdk" <<'PY'
import struct, sys
h = bytearray(2048)
struct.pack_into('<8I', h, 0, 0x44574f43, 1, 3, 2048, 8, 4, 1, 45 + 8)
f = bytearray(h) + bytearray(512)                  # header (4 sectors), directory (sector 4)
struct.pack_into('<I', f, 4 * 512, 5)              # table at sector 5 (32 sectors)
gt = bytearray(4096 * 4)
struct.pack_into('<I', gt, 0, 37)                  # grain 0 at sector 37
struct.pack_into('<I', gt, 3 * 4, 45)              # grain 3 at sector 45
f += gt + b'\xab' * 4096 + b'\xcd' * 4096
open(sys.argv[1], 'wb').write(f)
PY
printf '# Disk DescriptorFile\nversion=1\nCID=11111111\nparentCID=ffffffff\ncreateType="vmfsSparse"\n\nRW 2048 VMFSSPARSE "esx-delta.vmdk"\n' > "$T/esx.vmdk"
check "vmfsSparse (COWD) extent reads" "$VDISK" io -r -c "read -P 0xab 0 4k" -c "read -P 0 4k 8k" -c "read -P 0xcd 12k 4k" \
    -c "read -P 0 16k 1000k" "$T/esx.vmdk"
# (qemu-img 7.2 reports 2 MiB for this 1 MiB disk, counting the COWD extent
# twice; the first MiB is the disk)
check "qemu-img reads the COWD extent the same" bash -c "qemu-img convert -O raw '$T/esx.vmdk' '$T/esx.raw' &&
    truncate -s 1M '$T/esx.raw' && '$VDISK' compare -q '$T/esx.vmdk' -F raw '$T/esx.raw'"
check_fails "writing a COWD extent is refused" "$VDISK" io -c "write -P 1 64k 4k" "$T/esx.vmdk"
python3 -c "import sys; f=open(sys.argv[1],'r+b'); f.seek(24); f.write(b'\x00\x00\x00\x00')" "$T/esx-delta.vmdk"
bad "COWD directory with no entries" "$T/esx.vmdk" "COWD directory"

# vdisk check: overlapping blocks are corruption (exit 2)
"$VDISK" create -q -f vhd "$T/ov.vhd" 8M
"$VDISK" io -c "write -P 1 0 4k" "$T/ov.vhd" >/dev/null
obat=$(od -An -tu8 --endian=big -j$((512 + 16)) -N8 "$T/ov.vhd" | tr -d ' ')
patch "$T/ov.vhd" $((obat + 4)) "$(od -An -tx1 -j"$obat" -N4 "$T/ov.vhd" | tr -d ' ')"
"$VDISK" check "$T/ov.vhd" > "$T/ov.out" 2>&1; rc=$?
[ $rc = 2 ] && grep -q "overlap" "$T/ov.out" && ok "vhd check: overlapping BAT entries are corruption" || fail "vhd check overlap" "rc $rc"
check "vmdk check of a good image" "$VDISK" check "$T/good.vmdk"

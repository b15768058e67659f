#!/usr/bin/env bash
# QEMU reads what vdisk writes: images created and written by vdisk (random
# writes, zero writes, discards, partial-cluster writes over a backing file,
# refcount table growth, preallocation, compressed converts) must pass
# `qemu-img check` with no errors or leaks and compare identical with a raw
# shadow copy that qemu-io wrote the same way.
source "$(dirname "$0")/../lib.sh"

# ops SEED SIZE CLUSTER DISCARD: random qemu-io style commands, one a line.
# Discards are cluster-aligned, so that they read as zeros in qcow2 and in
# the raw shadow alike.
ops() {
    python3 - "$@" <<'PY'
import random, sys
seed, size, cs, disc = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
r = random.Random(seed)
for i in range(32):
    k = r.random()
    off = r.randrange(0, size - 1)
    ln = min(size - off, r.choice([1, 511, 512, 4096, 65536, 100000, 300000, 1 << 20, 3 << 20]))
    if k < 0.62:
        print("write -P 0x%02x %d %d" % (r.randrange(1, 255), off, ln))
    elif k < 0.75:
        print("write -z %d %d" % (off, ln))
    elif k < 0.85:
        print("write -z -u %d %d" % (off, ln))
    elif disc:
        a = (off + cs - 1) // cs * cs
        b = (off + ln) // cs * cs
        if b > a:
            print("discard %d %d" % (a, b - a))
PY
}

run_ops() {   # tool file fmt cmdfile
    local tool=$1 f=$2 fmt=$3 cmds=$4 args=()
    while read -r line; do args+=(-c "$line"); done < "$cmds"
    if [ "$tool" = vdisk ]; then "$VDISK" io -f "$fmt" "${args[@]}" "$f" >/dev/null
    else qemu-io -f "$fmt" "${args[@]}" "$f" >/dev/null; fi
}

qcheck() {   # file name
    local out rc
    out=$(qemu-img check "$1" 2>&1); rc=$?
    if [ $rc -eq 0 ] && grep -q "No errors were found" <<<"$out"; then ok "$2: qemu-img check finds no errors or leaks"
    else fail "$2: qemu-img check (rc $rc)" "$(echo "$out" | head -4 | tr '\n' ' ')"; fi
}

qcompare() {   # a b name
    check "$3: qemu-img compare with the raw shadow says identical" qemu-img compare "$1" "$2"
}

SIZE=$((16 << 20))
configs=(
    "v2|compat=0.10|65536"
    "v3|compat=1.1|65536"
    "c512-r64-growth|cluster_size=512,refcount_bits=64|512"
    "c4k-r1|cluster_size=4096,refcount_bits=1|4096"
    "c2m|cluster_size=2M|2097152"
    "r8|refcount_bits=8|65536"
    "extl2|extended_l2=on|65536"
    "extl2-c2m|extended_l2=on,cluster_size=2M|2097152"
    "lazy|lazy_refcounts=on|65536"
    "zstd|compression_type=zstd|65536"
    "prealloc-metadata|preallocation=metadata|65536"
    "prealloc-falloc|preallocation=falloc,cluster_size=4096|4096"
    "prealloc-full|preallocation=full|65536"
)
seed=1
for c in "${configs[@]}"; do
    IFS='|' read -r name opts cs <<<"$c"
    img=$T/$name.qcow2 shadow=$T/$name.raw
    if ! "$VDISK" create -q -f qcow2 -o "$opts" "$img" $SIZE >/dev/null 2>"$T/err"; then
        fail "$name: vdisk create" "$(cat "$T/err")"; continue
    fi
    qcheck "$img" "$name (fresh)"
    truncate -s $SIZE "$shadow"
    # several sessions, so that images are reopened between batches
    for batch in 1 2; do
        ops $seed $SIZE "$cs" 1 > "$T/ops"; seed=$((seed + 1))
        run_ops vdisk "$img" qcow2 "$T/ops" || fail "$name: vdisk io batch $batch"
        run_ops qemu "$shadow" raw "$T/ops"
    done
    qcheck "$img" "$name"
    qcompare "$img" "$shadow" "$name"
done

# the refcount table had to grow (512-byte clusters, 64-bit refcounts)
rtc=$(python3 -c "import struct,sys; d=open(sys.argv[1],'rb').read(60); print(struct.unpack('>I', d[56:60])[0])" "$T/c512-r64-growth.qcow2")
if [ "$rtc" -gt 1 ]; then ok "refcount table grew past its first cluster ($rtc clusters)"; else fail "refcount table did not grow ($rtc)"; fi

# partial-cluster writes over a backing file (copy-on-write from below)
qemu-img create -q -f qcow2 "$T/base.qcow2" $SIZE
qemu-io -c "write -P 0x5b 0 $SIZE" -c "write -z 1M 1M" "$T/base.qcow2" >/dev/null
for o in compat=1.1 compat=0.10 extended_l2=on "cluster_size=4096" "extended_l2=on,cluster_size=2M"; do
    img=$T/over.qcow2 shadow=$T/over.raw
    rm -f "$img"
    "$VDISK" create -q -f qcow2 -o "$o" -b base.qcow2 -F qcow2 "$img" >/dev/null
    qemu-img convert -O raw "$T/base.qcow2" "$shadow"
    disc=1; [ "$o" = compat=0.10 ] && disc=0   # v2 ignores discard over a backing file
    ops $seed $SIZE 2097152 $disc > "$T/ops"; seed=$((seed + 1))
    run_ops vdisk "$img" qcow2 "$T/ops" || fail "over backing ($o): vdisk io"
    run_ops qemu "$shadow" raw "$T/ops"
    qcheck "$img" "over backing ($o)"
    qcompare "$img" "$shadow" "over backing ($o)"
done

# a three-level chain written at the top
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$T/mid.qcow2"
qemu-io -c "write -P 0x6c 3M 5M" "$T/mid.qcow2" >/dev/null
"$VDISK" create -q -f qcow2 -b mid.qcow2 -F qcow2 "$T/top.qcow2" >/dev/null
qemu-img convert -O raw "$T/mid.qcow2" "$T/top.raw"
ops $seed $SIZE 65536 1 > "$T/ops"
run_ops vdisk "$T/top.qcow2" qcow2 "$T/ops" || fail "chain of three: vdisk io"
run_ops qemu "$T/top.raw" raw "$T/ops"
qcheck "$T/top.qcow2" "chain of three"
qcompare "$T/top.qcow2" "$T/top.raw" "chain of three"

# rebase -u rewrites the backing name in the header
if "$VDISK" rebase -u -b base.qcow2 -F qcow2 "$T/top.qcow2" 2>"$T/err"; then
    bf=$(qemu-img info --output=json "$T/top.qcow2" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("backing-filename"), d.get("backing-filename-format"))')
    if [ "$bf" = "base.qcow2 qcow2" ]; then ok "rebase -u: qemu-img sees the new backing file"; else fail "rebase -u" "$bf"; fi
    qcheck "$T/top.qcow2" "after rebase -u"
else
    fail "rebase -u" "$(cat "$T/err")"
fi

# resize: grow (the L1 table moves), then shrink over unused space only
"$VDISK" create -q -f qcow2 -o cluster_size=4096 "$T/rs.qcow2" 8M >/dev/null
"$VDISK" io -c "write -P 0x71 0 1M" -c "write -P 0x72 7M 1M" "$T/rs.qcow2" >/dev/null
check "resize grows to 5G" "$VDISK" resize "$T/rs.qcow2" 5G
"$VDISK" io -c "write -P 0x73 4G 1M" "$T/rs.qcow2" >/dev/null
qcheck "$T/rs.qcow2" "grown image"
check "qemu-io reads the data after growth" qemu-io -c "read -P 0x71 0 1M" -c "read -P 0x72 7M 1M" -c "read -P 0x73 4G 1M" -c "read -P 0 8M 1M" "$T/rs.qcow2"
check_fails "shrinking over data is refused" "$VDISK" resize --shrink "$T/rs.qcow2" 1G
"$VDISK" io -c "write -z -u 4G 1M" "$T/rs.qcow2" >/dev/null
check "shrinking over unused clusters works" "$VDISK" resize --shrink "$T/rs.qcow2" 8M
qcheck "$T/rs.qcow2" "shrunk image"

# lazy refcounts: an image left dirty is repaired on the next writable open
"$VDISK" create -q -f qcow2 -o lazy_refcounts=on "$T/lz.qcow2" 16M >/dev/null
bash -c 'qemu-io -c "write -P 0x21 0 4M" -c "sigraise 9" "$1"' _ "$T/lz.qcow2" >/dev/null 2>&1
dirty=$(qemu-img info --output=json "$T/lz.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["dirty-flag"])')
if [ "$dirty" = True ]; then ok "qemu left the lazy-refcount image dirty"; else fail "image not dirty ($dirty)"; fi
"$VDISK" io -c "write -P 0x22 8M 1M" "$T/lz.qcow2" >/dev/null
qcheck "$T/lz.qcow2" "dirty image repaired on open"
check "data written before the crash is there" qemu-io -c "read -P 0x21 0 4M" -c "read -P 0x22 8M 1M" "$T/lz.qcow2"

# compressed converts
if "$VDISK" convert --help >/dev/null 2>&1; then
    rand_file "$T/rnd.raw" 4 11
    python3 -c "
import sys
with open(sys.argv[1], 'r+b') as f:
    for i in range(0, 4 << 20, 1 << 18):
        f.seek(i); f.write((b'compressible %d ' % i) * 4096)
" "$T/rnd.raw"
    for ct in zlib zstd; do
        for cs in 4096 65536 2M; do
            rm -f "$T/c.qcow2"
            if "$VDISK" convert -f raw -c -O qcow2 -o "compression_type=$ct,cluster_size=$cs" "$T/rnd.raw" "$T/c.qcow2" 2>"$T/err"; then
                qcheck "$T/c.qcow2" "convert -c ($ct, $cs)"
                qcompare "$T/c.qcow2" "$T/rnd.raw" "convert -c ($ct, $cs)"
            else
                fail "convert -c ($ct, $cs)" "$(head -3 "$T/err")"
            fi
        done
    done
fi

#!/usr/bin/env bash
# vdisk convert to qcow2 reserves (fallocate) the host span of each write into
# fresh clusters before writing it. The image must stay exactly what it was:
# qemu-img check clean, identical to the source, and no more space allocated
# than qemu-img's own convert of the same source, for every cache mode, for
# cluster sizes from 512 B to 2 MiB (within a few file-system blocks for
# small clusters), with subclusters, and with a backing
# file (where whole clusters are written).
source "$(dirname "$0")/../lib.sh"

# A 40 MiB sparse source: short runs inside clusters, runs across clusters,
# a long run, single 4 KiB blocks, and data with a zero hole inside.
src=$T/src.raw
truncate -s 40M "$src"
rand_file "$T/r" 4 7
put() { dd if="$T/r" of="$src" bs=64k iflag=skip_bytes,count_bytes oflag=seek_bytes skip=$(($1 % (3 << 20))) \
          seek="$1" count="$2" conv=notrunc status=none; }
for i in 0 1 2 3 4 5 6 7; do put $((i * 1048576 + 12288)) 102400; done       # 100 KiB at 12 KiB into each MiB
putb() { dd if="$T/r" of="$src" bs=64k skip="$1" seek="$2" count="$3" conv=notrunc status=none; }
putb 0 192 48                                                                  # 3 MiB at 12 MiB
for i in 0 1 2 3; do dd if="$T/r" of="$src" bs=4k skip=$i seek=$((5120 + i * 16)) count=1 conv=notrunc status=none; done
putb 8 384 16                                                                  # 1 MiB at 24 MiB ...
dd if=/dev/zero of="$src" bs=4k seek=$((6144 + 100)) count=2 conv=notrunc status=none   # ... with an 8 KiB zero hole
putb 20 544 40                                                                 # 2.5 MiB at 34 MiB, to near the end

blocks() { stat -c %b "$1"; }

# conv_check NAME VDISK-ARGS QEMU-ARGS [SLACK]: SLACK blocks (512 B) more
# than qemu-img's are allowed where small clusters share file-system blocks
# with metadata and the extent tree's own blocks differ (as before
# reserving: 512 B clusters were 112 blocks over qemu-img's without it).
conv_check() {
    local name=$1 vargs=$2 qargs=$3 slack=${4:-0}
    rm -f "$T/v.qcow2" "$T/q.qcow2"
    # shellcheck disable=SC2086
    check "$name: vdisk convert" "$VDISK" convert -f raw -O qcow2 $vargs "$src" "$T/v.qcow2"
    # shellcheck disable=SC2086
    qemu-img convert -f raw -O qcow2 $qargs "$src" "$T/q.qcow2"
    if out=$(qemu-img check "$T/v.qcow2" 2>&1); then ok "$name: qemu-img check clean"
    else fail "$name: qemu-img check clean" "$(echo "$out" | tr '\n' ' ')"; fi
    check "$name: identical to the source" qemu-img compare -q -f raw -F qcow2 "$src" "$T/v.qcow2"
    local vb qb
    vb=$(blocks "$T/v.qcow2"); qb=$(blocks "$T/q.qcow2")
    [ "$vb" -le $((qb + slack)) ] && ok "$name: allocated no more than qemu-img's ($vb <= $qb blocks)" \
        || fail "$name: allocated no more than qemu-img's" "vdisk $vb blocks, qemu-img $qb"
}

conv_check "default" "" ""
conv_check "-t unsafe" "-t unsafe" ""
conv_check "-t writeback" "-t writeback" "-t writeback"
conv_check "-t none" "-t none" "-t none"
conv_check "-W" "-W -t unsafe" "-W"
conv_check "512 B clusters" "-t unsafe -o cluster_size=512" "-o cluster_size=512" 256
conv_check "2 MiB clusters" "-t unsafe -o cluster_size=2M" "-o cluster_size=2M"
conv_check "subclusters" "-t unsafe -o extended_l2=on,cluster_size=128k" "-o extended_l2=on,cluster_size=128k" 64
conv_check "compat 0.10" "-t unsafe -o compat=0.10" "-o compat=0.10"

# The reserved span is what the write fills: 100 KiB runs in fresh 64 KiB
# clusters allocate 100 KiB of data each, not whole clusters.
rm -f "$T/v.qcow2"
truncate -s 16M "$T/runs.raw"
for i in $(seq 0 15); do dd if="$T/r" of="$T/runs.raw" bs=4k skip=$i seek=$((i * 256 + 3)) count=25 conv=notrunc status=none; done
"$VDISK" convert -t unsafe -f raw -O qcow2 "$T/runs.raw" "$T/v.qcow2"
vb=$(( $(blocks "$T/v.qcow2") * 512 ))
# 16 x 100 KiB of data plus header, L1, refcount table and block, one L2 table
[ "$vb" -le $(( 16 * 102400 + 5 * 65536 )) ] && ok "only the written span is allocated ($vb bytes)" \
    || fail "only the written span is allocated" "$vb bytes allocated"
check "runs: identical to the source" qemu-img compare -q -f raw -F qcow2 "$T/runs.raw" "$T/v.qcow2"

# A backing file: fresh clusters are filled whole from it.
qemu-img create -q -f qcow2 "$T/base.qcow2" 40M
qemu-io -c "write -P 0x5a 0 40M" "$T/base.qcow2" > /dev/null
rm -f "$T/v.qcow2"
check "backing: vdisk convert -B" "$VDISK" convert -t unsafe -f raw -O qcow2 -B "$T/base.qcow2" -F qcow2 "$src" "$T/v.qcow2"
if out=$(qemu-img check "$T/v.qcow2" 2>&1); then ok "backing: qemu-img check clean"
else fail "backing: qemu-img check clean" "$(echo "$out" | tr '\n' ' ')"; fi
rm -f "$T/q.qcow2"
qemu-img convert -f raw -O qcow2 -B "$T/base.qcow2" -F qcow2 "$src" "$T/q.qcow2"
check "backing: reads as qemu-img's convert" qemu-img compare -q -f qcow2 -F qcow2 "$T/q.qcow2" "$T/v.qcow2"

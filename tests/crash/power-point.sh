#!/usr/bin/env bash
# A deterministic power-loss point, to reproduce a finding of crash.sh -P:
#
#   tests/crash/power-point.sh FORMAT [-o create_opts] [-t cache] [-k fsync_no]
#                              [-s seed] [-p keep_pct] [-n writes] [-f flush_every]
#
# Creates a 64M image, mounts tests/helpers/plfs over it with the power going
# during fsync #k (plfs -F), runs `crashio write -q 1` (one write at a time,
# so the order plfs sees, and so the loss, is the same every run), then a
# dirty lazy-refcount qcow2 image is repaired as an open would, and vdisk
# check, qemu-img check and crashio verify run. Exit 0 when they all pass;
# the image, journal and plfs log stay in build/crash-failures/point-* when not.
# Example (before sparse VMDK wrote its tables at the flush, this point kept
# a grain table entry past the end of the file):
#   tests/crash/power-point.sh vmdk -k 2 -s 1
source "$(dirname "$0")/../lib.sh"
CRASHIO=$VDISK_BUILD/tests/helpers/crashio PLFS=$VDISK_BUILD/tests/helpers/plfs
fmt=${1:?usage: power-point.sh FORMAT [-o opts] [-t cache] [-k fsync_no] [-s seed] [-p keep_pct] [-n writes] [-f flush_every]}
shift
opts="" cache=writeback k=1 seed=1 pct=50 nw=60 every=20
while getopts "o:t:k:s:p:n:f:" c; do
    case $c in
        o) opts=$OPTARG ;; t) cache=$OPTARG ;; k) k=$OPTARG ;; s) seed=$OPTARG ;;
        p) pct=$OPTARG ;; n) nw=$OPTARG ;; f) every=$OPTARG ;; *) exit 2 ;;
    esac
done
qf=; case $fmt in qcow2) qf=qcow2 ;; vmdk) qf=vmdk ;; vhd|vpc) qf=vpc ;; esac
img=$T/img mnt=$T/mnt journal=$T/journal log=$T/plfs.log pid=""
on_exit '[ -n "$pid" ] && kill -9 $pid 2>/dev/null; umount -l "$mnt" 2>/dev/null'
: > "$mnt"
"$VDISK" create -q -f "$fmt" ${opts:+-o "$opts"} "$img" 64M || exit 2
"$PLFS" -s "$seed" -p "$pct" -F "$k" -l "$log" "$img" "$mnt" & pid=$!
for ((w = 0; w < 100; w++)); do grep -q '^plfs: mounted' "$log" 2>/dev/null && break; sleep 0.05; done
"$CRASHIO" write -f "$fmt" -t "$cache" -s "$seed" -n "$nw" -k "$every" -b 16 -q 1 "$mnt" "$journal" 2> "$T/writer.log"
kill -0 $pid 2>/dev/null && kill -USR1 $pid
wait $pid; pid=""
umount -l "$mnt" 2>/dev/null
grep '^plfs: power loss' "$log"
bad=0
if [ "$fmt" = qcow2 ] && "$VDISK" info --output=json -f qcow2 "$img" 2>/dev/null | grep -q '"dirty-flag": true'; then
    "$VDISK" check -q -r all -f qcow2 "$img" || bad=1
fi
"$VDISK" check -f "$fmt" "$img"; case $? in 0|3|63) ;; *) bad=1 ;; esac
if [ -n "$qf" ]; then qemu-img check -f "$qf" "$img"; case $? in 0|3) ;; *) bad=1 ;; esac; fi
"$CRASHIO" verify -f "$fmt" "$img" "$journal" || bad=1
if [ $bad -ne 0 ]; then
    keep=$VDISK_ROOT/build/crash-failures/point-$fmt-k$k-s$seed
    mkdir -p "$keep" && cp "$img" "$journal" "$log" "$keep/"
    echo "power-point: FAILED (kept in $keep)"
    exit 1
fi
echo "power-point: passed"

#!/usr/bin/env bash
# fio's NBD engine (libnbd) against vdiskd: random and sequential writes
# at depth, verified with crc32c on read-back; cache=none (O_DIRECT) too.
source "$(dirname "$0")/../lib.sh"
source "$VDISK_ROOT/tests/helpers/nbd_common.bash"

truncate -s 128M "$T/a.raw"
truncate -s 128M "$T/b.raw"
start_vdiskd d --nbd "unix:$T/s.sock" --threads 2 --log-level=warning \
    --export "name=a,file=$T/a.raw,format=raw" --export "name=b,file=$T/b.raw,format=raw,cache=none" || exit 1

runfio() {   # NAME EXPORT RW BS DEPTH JOBS
    local out
    out=$(fio --name="$1" --ioengine=nbd --uri="nbd+unix:///$2?socket=$T/s.sock" --rw="$3" --bs="$4" \
        --iodepth="$5" --numjobs="$6" --size=16M --offset_increment=32M --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --verify_state_save=0 --randrepeat=0 --group_reporting --output-format=terse 2>&1)
    if [ $? -eq 0 ] && ! grep -qi 'verify.*fail\|bad magic\|crc32c.*wanted' <<<"$out"; then ok "fio $1"
    else fail "fio $1" "$(tail -3 <<<"$out" | tr '\n' ' ')"; fi
}
runfio "randwrite 4k QD32 verify crc32c" a randwrite 4k 32 1
runfio "randwrite 4k-64k QD16 x 3 jobs (3 connections) verify" a randwrite 4k-64k 16 3
runfio "sequential write 1M QD8 verify" a write 1M 8 1
runfio "randwrite 4k QD32 verify, cache=none" b randwrite 4k 32 1
runfio "randwrite 512B unaligned QD64 verify, cache=none" b randwrite 512 64 1

check "daemon still serving" alive d "nbd+unix:///a?socket=$T/s.sock"
stop_vdiskd d

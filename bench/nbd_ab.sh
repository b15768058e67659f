#!/usr/bin/env bash
# A/B of NBD servers on one fio job, servers interleaved round by round:
#   bench/nbd_ab.sh ROUNDS SERVER...   (SERVER: a vdiskd binary, qemu-nbd or nbdkit)
# Per run: IOPS, the server's CPU per request (us, /proc), fio's CPU per
# request (us, fio's usr+sys), the share of samples in which fio's job
# thread and the server's busiest thread were on the same CPU (same=), and
# the server's voluntary context switches (sleeps) per request; then the
# medians. Environment: RT (seconds, default 3, after 1 s of ramp),
# QD (32), BS (4k), JOB (randread|randwrite|read), MODE (cache: writeback|none), FMT
# (raw), IMG (default build/bench/nbd/img.raw, made by bench/nbd_fio.sh),
# FIOX (more fio options, e.g. --rate_iops=60000), PINS / PINC (commands
# that prefix the server / fio, e.g. "taskset -c 1"), ENVV (VAR=value for
# vdiskd).
set -u
cd "$(dirname "$0")/.."
R=$1; shift
RT=${RT:-3}; MODE=${MODE:-writeback}; JOB=${JOB:-randread}
W=$PWD/build/bench/nbd; img=${IMG:-$W/img.raw}; sock=$W/ab.sock
hz=$(getconf CLK_TCK)
echo "# $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg) rounds $R rt $RT cache $MODE job $JOB"
[ "$MODE" = writeback ] && cat $img > /dev/null
declare -A ALL
for r in $(seq $R); do
  for b in "$@"; do
    rm -f $sock
    case $b in
      qemu-nbd) qemu-nbd -t -f raw --cache=$MODE --aio=io_uring -e 8 -k $sock $img & ;;
      nbdkit) nbdkit -f -U $sock file $img & ;;
      *) env ${ENVV:-X=1} ${PINS:-} $b --log-level=warning --nbd unix:$sock --export file=$img,format=${FMT:-raw},cache=$MODE & ;;
    esac
    srv=$!
    for i in $(seq 100); do [ -S $sock ] && break; sleep 0.05; done
    a=$(awk '{print $14+$15}' /proc/$srv/stat)
    cs0=$(cat /proc/$srv/task/*/status | awk '/^voluntary_ctxt/ {s+=$2} END {print s}')
    ( sleep 1.2; bench/nbd_place.py $srv $$ $RT > $W/place.out ) &
    pl=$!
    ${PINC:-} fio --name=x --rw=$JOB --bs=${BS:-4k} --iodepth=${QD:-32} --size=1G --runtime=$RT --ramp_time=1 --time_based --norandommap --randrepeat=0 ${FIOX:-} --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --output-format=json > $W/ab.json 2>/dev/null
    z=$(awk '{print $14+$15}' /proc/$srv/stat)
    wait $pl; same=$(cat $W/place.out)
    cs1=$(cat /proc/$srv/task/*/status | awk '/^voluntary_ctxt/ {s+=$2} END {print s}')
    kill $srv; wait $srv 2>/dev/null
    out=$(sed -n '/^{/,$p' $W/ab.json | jq -r '.jobs[0] | (if .read.io_bytes > 0 then .read else .write end) as $x | "\($x.iops|floor) \(.usr_cpu + .sys_cpu)"')
    read -r iops fcpu <<<"$out"
    line=$(awk -v i=$iops -v f=$fcpu -v d=$((z-a)) -v hz=$hz -v rt=$RT 'BEGIN{ops=i*(rt+1); printf "%d %.2f %.2f", i, d*1e6/hz/ops, f/100*1e6/i}')
    echo "$b $line same=$same sleeps/op=$(awk -v a=$cs0 -v b=$cs1 -v i=$iops -v rt=$RT 'BEGIN{printf "%.3f", (b-a)/(i*(rt+1))}')"
    ALL[$b]="${ALL[$b]:-} $line"
  done
done
echo "# end $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
for b in "$@"; do
  echo "${ALL[$b]}" | python3 -c '
import sys,statistics as st
v=sys.stdin.read().split(); n=len(v)//3
c=[[float(v[i*3+k]) for i in range(n)] for k in range(3)]
print("median %-22s iops %7d  srv_us/op %5.2f  fio_us/op %5.2f  (n=%d; iops %s)" % (sys.argv[1], st.median(c[0]), st.median(c[1]), st.median(c[2]), n, " ".join(str(int(x)) for x in c[0])))' "$b"
done

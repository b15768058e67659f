#!/usr/bin/env bash
# A throwaway single-node Ceph cluster on 127.0.0.1 for tests and benchmarks:
# one monitor, one OSD, no manager, no cephx, pool size 1.
#
#   tests/rbd/cluster.sh start DIR [POOL]   start; prints the path of DIR/ceph.conf
#   tests/rbd/cluster.sh stop DIR           stop the daemons by their recorded PIDs
#
# Every ceph/rbd command runs under `timeout` (without a manager several of
# them wait forever). Start fails loudly (non-zero, with the daemons' logs)
# when the cluster is not usable within RBD_CLUSTER_TIMEOUT seconds (60).
# RBD_OSD_STORE=memstore (default, data in memory) or bluestore (on a file
# in DIR, survives an OSD restart). RBD_CEPH_CONF: more configuration lines
# (appended as a second [global] section). Only loopback addresses are used.
set -uo pipefail

cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR [POOL]" >&2; exit 2; }

# A port for the monitor: RBD_MON_PORT, else a free one in 46000-46999,
# starting at a random place so that concurrent test runs do not collide.
free_port() {
    local p i start=${RBD_MON_PORT:-$((46000 + RANDOM % 1000))}
    for i in $(seq 0 999); do
        p=$(( start + i )); [ -n "${RBD_MON_PORT:-}" ] || p=$(( 46000 + (start - 46000 + i) % 1000 ))
        ss -Htln "sport = :$p" 2>/dev/null | grep -q . || { echo "$p"; return 0; }
    done
    return 1
}

c() {   # a ceph command, bounded in time
    timeout "${RBD_CMD_TIMEOUT:-30}" "$@" -c "$dir/ceph.conf"
}

dump_logs() {
    echo "--- ceph logs ($dir) ---" >&2
    tail -n 30 "$dir"/log/*.log "$dir"/*.out 2>/dev/null >&2
}

stop() {
    local f pid n
    for f in "$dir"/osd.pid "$dir"/mon.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        if kill -0 "$pid" 2>/dev/null; then
            kill -CONT "$pid" 2>/dev/null; kill -TERM "$pid" 2>/dev/null
            for n in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        fi
        rm -f "$f"
    done
    return 0
}

start() {
    local pool=${1:-rbd} port fsid deadline store osd_uuid
    mkdir -p "$dir/mon" "$dir/osd" "$dir/log" "$dir/run" || return 1
    dir=$(cd "$dir" && pwd)
    port=$(free_port) || { echo "cluster: no free port" >&2; return 1; }
    fsid=$(uuidgen)
    store=${RBD_OSD_STORE:-memstore}
    cat > "$dir/ceph.conf" <<CONF
[global]
fsid = $fsid
mon initial members = a
mon host = v2:127.0.0.1:$port
public addr = 127.0.0.1
public network = 127.0.0.0/8
ms bind msgr1 = false
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool delete = true
mon allow pool size one = true
mon warn on pool no redundancy = false
# a nearly full disk must not stop the throwaway monitor
mon data avail warn = 1
mon data avail crit = 0
paxos propose interval = 0.1
run dir = $dir/run
pid file =
debug ms = 0
keyring = /dev/null
[client]
admin socket =
log file =
[mon]
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
mon data = $dir/mon
mon cluster log file = $dir/log/cluster.log
[osd]
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
osd data = $dir/osd
osd objectstore = $store
memstore device bytes = ${RBD_MEMSTORE_BYTES:-4294967296}
bluestore block path = $dir/osd-block
bluestore block create = true
bluestore block size = ${RBD_BLUESTORE_BYTES:-4294967296}
bluestore fsck on mount = false
osd min pg log entries = 100
osd max pg log entries = 200
osd pg log trim min = 50
osd heartbeat grace = 60
# a crashed client's watch (and so its exclusive lock) goes after 10 s, not 30
osd client watch timeout = ${RBD_WATCH_TIMEOUT:-10}
# one op thread: on 2 CPUs a second one on the same shard costs 40-70 us of
# CPU per 4 KiB read in hand-offs (6-7 us with one; bench/RESULTS.md)
osd op num shards = 1
osd op num threads per shard = ${RBD_OSD_THREADS:-1}
osd journal size = 64
osd class load list = *
osd class default list = *
CONF
    # RBD_CEPH_CONF: more lines for [global] (bench/rbd.sh: BENCH_TUNED)
    [ -z "${RBD_CEPH_CONF:-}" ] || printf '[global]\n%s\n' "$RBD_CEPH_CONF" >> "$dir/ceph.conf"
    local deadline=$((SECONDS + ${RBD_CLUSTER_TIMEOUT:-60}))
    timeout 30 monmaptool --create --clobber --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" \
        "$dir/monmap" > "$dir/mon-mkfs.out" 2>&1 \
        && timeout 30 ceph-mon --mkfs -i a --monmap "$dir/monmap" -c "$dir/ceph.conf" >> "$dir/mon-mkfs.out" 2>&1 \
        || { echo "cluster: ceph-mon --mkfs failed" >&2; cat "$dir/mon-mkfs.out" >&2; return 1; }
    ceph-mon -f -i a -c "$dir/ceph.conf" > "$dir/mon.out" 2>&1 &
    echo $! > "$dir/mon.pid"
    osd_uuid=$(uuidgen)
    until c ceph osd create "$osd_uuid" > "$dir/osd-id.out" 2>&1; do
        [ $SECONDS -lt "$deadline" ] && kill -0 "$(cat "$dir/mon.pid")" 2>/dev/null \
            || { echo "cluster: monitor did not come up" >&2; dump_logs; stop; return 1; }
        sleep 0.2
    done
    timeout 60 ceph-osd -i 0 --mkfs --osd-uuid "$osd_uuid" -c "$dir/ceph.conf" > "$dir/osd-mkfs.out" 2>&1 \
        || { echo "cluster: ceph-osd --mkfs failed" >&2; cat "$dir/osd-mkfs.out" >&2; stop; return 1; }
    ceph-osd -f -i 0 -c "$dir/ceph.conf" > "$dir/osd.out" 2>&1 &
    echo $! > "$dir/osd.pid"
    c ceph osd pool create "$pool" 8 8 > "$dir/pool.out" 2>&1 \
        || { echo "cluster: pool create failed" >&2; cat "$dir/pool.out" >&2; dump_logs; stop; return 1; }
    c ceph osd pool set "$pool" size 1 --yes-i-really-mean-it >> "$dir/pool.out" 2>&1
    # `rbd pool init` returns once the pool's PGs are active.
    local left=$((deadline - SECONDS)); [ $left -gt 1 ] || left=1
    RBD_CMD_TIMEOUT=$left c rbd pool init "$pool" >> "$dir/pool.out" 2>&1 \
        || { echo "cluster: pool $pool not usable within ${RBD_CLUSTER_TIMEOUT:-60}s" >&2; cat "$dir/pool.out" >&2; dump_logs; stop; return 1; }
    echo "$dir/ceph.conf"
}

case $cmd in
    start) shift 2; start "$@" ;;
    stop)  stop ;;
    *) echo "usage: $0 start|stop DIR [POOL]" >&2; exit 2 ;;
esac

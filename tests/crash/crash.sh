#!/usr/bin/env bash
# Crash-consistency campaign for one format: kill a writer with SIGKILL at
# random moments and check that the image is consistent and that no write
# acknowledged as flushed was lost.
#
#   tests/crash/crash.sh FORMAT [-P] [-o create_opts] [-t cache] [-s size] [-r rounds] [POINTS]
#
# For each kill point: create a fresh image (vdisk create -f FORMAT -o ...),
# run `crashio write` on it (self-describing 4 KiB blocks at random places,
# a flush every few writes, a journal of what was flushed), kill it after a
# random delay, then
#   - `vdisk check` must report no corruption (leaks are allowed: exit 0, 3,
#     or 63 for formats without checks),
#   - `qemu-img check` too, for formats QEMU knows (qcow2, vmdk, vpc),
#   - `crashio verify`: every block holds zeros or a valid block, never older
#     than its last flushed write.
# With -r N (default 1) each point does N such rounds on the same image:
# rounds after the first open the crashed image, write over it and are
# killed again (recovery paths), and verify checks all rounds together.
# With -P (or CRASH_POWER=1) each kill is also a power loss: the writer
# works through tests/helpers/plfs, a FUSE file system over the image that
# records every write not yet covered by a completed fsync; after the kill
# it loses a random subset of those (each kept with a probability of 0, 25,
# 50, 75 or 100 %, drawn per round), sector by sector, as a disk with a
# volatile cache could, and the checks run on what is left.
# Prints TAP (one line per kill point). CRASH_SEED fixes the random choices;
# a failing point keeps its image (and the plfs log) under build/crash-failures/
# (CRASH_KEEP=0: not).
source "$(dirname "$0")/../lib.sh"
CRASHIO=$VDISK_BUILD/tests/helpers/crashio
PLFS=$VDISK_BUILD/tests/helpers/plfs
usage="usage: crash.sh FORMAT [-P] [-o opts] [-t cache] [-s size] [-r rounds] [POINTS]"

fmt=${1:?$usage}
shift
opts="" cache=writeback size=64M rounds=1 power=${CRASH_POWER:-0}
while getopts "Po:t:s:r:" c; do
    case $c in
        P) power=1 ;;
        o) opts=$OPTARG ;;
        t) cache=$OPTARG ;;
        s) size=$OPTARG ;;
        r) rounds=$OPTARG ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
points=${1:-${CRASH_POINTS:-20}}
seed=${CRASH_SEED:-$(( $(date +%s) % 100000 ))}
qfmt=
case $fmt in qcow2) qfmt=qcow2 ;; vmdk) qfmt=vmdk ;; vhd|vpc) qfmt=vpc ;; esac

for prog in "$VDISK" "$CRASHIO" $([ "$power" = 1 ] && echo "$PLFS"); do
    if [ ! -x "$prog" ]; then fail "crash $fmt: $prog is not built (make tests)"; exit 1; fi
done
if [ "$power" = 1 ] && [ ! -c /dev/fuse ]; then
    fail "crash $fmt: power loss needs FUSE" "/dev/fuse is missing (modprobe fuse; in a container: --device /dev/fuse)"
    exit 1
fi
echo "# crash $fmt: $points kill points, $rounds round(s) each, seed $seed, cache=$cache, -o '${opts}'$([ "$power" = 1 ] && echo ', power loss')"
RANDOM=$seed
img=$T/crash.img journal=$T/crash.journal
# -P: the writer sees the image at $mnt, a plfs mount over an empty file
mnt=$T/crash.mnt plfs_pid=""
target=$img
if [ "$power" = 1 ]; then
    target=$mnt
    on_exit 'if [ -n "$plfs_pid" ]; then kill -TERM $plfs_pid 2>/dev/null; wait $plfs_pid 2>/dev/null; fi; umount -l "$mnt" 2>/dev/null'
fi

# plfs_start SEED PCT: mount plfs over $mnt (backing $img); sets $why on failure
plfs_start() {
    : > "$mnt"
    "$PLFS" -s "$1" -p "$2" -l "$T/plfs.log" "$img" "$mnt" 2>> "$T/plfs.log" &
    plfs_pid=$!
    local w
    for ((w = 0; w < 200; w++)); do
        grep -q '^plfs: mounted' "$T/plfs.log" 2>/dev/null && return
        kill -0 $plfs_pid 2>/dev/null || break
        sleep 0.05
    done
    why="plfs did not mount: $(tail -2 "$T/plfs.log" | tr '\n' ' ')"
    kill -TERM $plfs_pid 2>/dev/null; wait $plfs_pid 2>/dev/null; plfs_pid=""
}

# plfs_power_loss: lose the unsynced writes, unmount; sets $why on failure
plfs_power_loss() {
    local prc w
    kill -USR1 $plfs_pid 2>/dev/null
    for ((w = 0; w < 200; w++)); do kill -0 $plfs_pid 2>/dev/null || break; sleep 0.05; done
    kill -9 $plfs_pid 2>/dev/null        # stuck: the wait below says so
    wait $plfs_pid; prc=$?
    plfs_pid=""
    if findmnt "$mnt" > /dev/null 2>&1; then umount -l "$mnt" 2>/dev/null; fi
    if [ $prc -ne 0 ] || ! grep -q '^plfs: power loss' "$T/plfs.log"; then
        why="plfs power loss failed (exit $prc): $(tail -2 "$T/plfs.log" | tr '\n' ' ')"
        return
    fi
    desc="$desc, $(sed -n 's/^plfs: power loss.*: \([0-9]*\) unsynced changes, [0-9]* kept, \([0-9]*\) lost.*/lost \2 of \1 unsynced writes/p' "$T/plfs.log" | tail -1)"
}

# round SEED APPEND: one writer run killed at a random moment, then the
# checks; sets $why (empty: passed) and $desc, $out.
round() {
    local s=$1 append=$2 maxb every q delay pid wrc rc w
    # vary the shape: sizes up to 1..32 blocks, flush every 1..16 writes, 1..8 in flight
    maxb=$((1 + RANDOM % 32)) every=$((1 + RANDOM % 16)) q=$((1 + RANDOM % 8))
    delay=$(awk -v r=$RANDOM 'BEGIN { printf "%.3f", 0.05 + (r % 900) / 1000 }')
    desc="$desc${desc:+; }seed $s -b $maxb -k $every -q $q, kill after ${delay}s"
    why=""
    if [ "$power" = 1 ]; then
        local pct=$((RANDOM % 5 * 25))
        pct=${CRASH_POWER_KEEP:-$pct}
        desc="$desc, power loss keeping $pct%"
        echo "plfs: round seed $s" >> "$T/plfs.log"
        plfs_start "$s" "$pct"
        [ -n "$why" ] && return
    fi
    local before=0
    [ -f "$journal" ] && before=$(stat -c %s "$journal")
    "$CRASHIO" write $append -f "$fmt" -t "$cache" -s "$s" -b $maxb -k $every -q $q "$target" "$journal" \
        2> "$T/writer.log" &
    pid=$!
    # the delay counts from the writer's start (its journal header), not
    # from the exec: start-up under a sanitizer or load varies a lot
    for ((w = 0; w < 200; w++)); do
        [ -f "$journal" ] && [ "$(stat -c %s "$journal")" -gt "$before" ] && break
        kill -0 $pid 2>/dev/null || break
        sleep 0.05
    done
    sleep "$delay"
    kill -9 $pid 2>/dev/null
    wait $pid 2>/dev/null; wrc=$?
    # A killed process's io_uring is torn down by the kernel after it is
    # reaped; until then the image lock may still look held: wait for it.
    for ((w = 0; w < 100; w++)); do
        "$VDISK" info -f "$fmt" "$target" > /dev/null 2>&1 && break
        sleep 0.05
    done
    # the writer is gone: now the power goes too
    [ "$power" = 1 ] && plfs_power_loss
    [ -n "$why" ] && return
    if [ $wrc -ne 137 ] && [ $wrc -ne 0 ]; then
        why="writer exited with status $wrc before the kill: $(head -3 "$T/writer.log" | tr '\n' ' ')"
        return
    fi
    if grep -qE 'AddressSanitizer|runtime error|crashio: .*failed' "$T/writer.log"; then
        why="writer: $(head -3 "$T/writer.log" | tr '\n' ' ')"
        return
    fi
    # A dirty qcow2 image with lazy refcounts may have stale refcounts by
    # design; any read-write open repairs them first: do the same here.
    if [ "$fmt" = qcow2 ] && "$VDISK" info --output=json -f qcow2 "$img" 2>/dev/null | grep -q '"dirty-flag": true'; then
        out=$("$VDISK" check -r all -f qcow2 "$img" 2>&1); rc=$?
        case $rc in 0|3) ;; *) why="repair of the dirty image (vdisk check -r all) exit $rc: $(echo "$out" | head -5 | tr '\n' ' ')"; return ;; esac
    fi
    out=$("$VDISK" check -f "$fmt" "$img" 2>&1); rc=$?
    case $rc in 0|3|63) ;; *) why="vdisk check exit $rc: $(echo "$out" | head -5 | tr '\n' ' ')"; return ;; esac
    if [ -n "$qfmt" ]; then
        out=$(qemu-img check -f "$qfmt" "$img" 2>&1); rc=$?
        case $rc in 0|3|63) ;; *) why="qemu-img check exit $rc: $(echo "$out" | head -5 | tr '\n' ' ')"; return ;; esac
    fi
    out=$("$CRASHIO" verify -f "$fmt" "$img" "$journal" 2>&1); rc=$?
    [ $rc -eq 0 ] || why="verify exit $rc: $(echo "$out" | head -6 | tr '\n' ' ')"
}

for ((i = 1; i <= points; i++)); do
    rm -f "$img" "$journal" "$T/plfs.log"
    if ! "$VDISK" create -q -f "$fmt" ${opts:+-o "$opts"} "$img" "$size" > "$T/create.log" 2>&1; then
        fail "crash $fmt point $i: create" "$(tr '\n' ' ' < "$T/create.log")"
        continue
    fi
    desc="" why=""
    for ((r = 1; r <= rounds; r++)); do
        s=$(( (seed * 1000 + i) * 16 + r ))
        round "$s" "$([ $r -gt 1 ] && echo -a)"
        [ -n "$why" ] && { why="round $r: $why"; break; }
    done
    if [ -z "$why" ]; then
        ok "crash $fmt point $i ($desc): $(echo "$out" | tail -1 | sed 's/^crashio: //')"
    elif [ "${CRASH_KEEP:-1}" = 0 ]; then
        fail "crash $fmt point $i ($desc)" "$why"
    else
        keep=$VDISK_ROOT/build/crash-failures/$fmt$([ "$power" = 1 ] && echo -power)-$seed-$i
        mkdir -p "$keep" && cp "$img" "$journal" "$keep/" 2>/dev/null
        [ "$power" = 1 ] && cp "$T/plfs.log" "$T/writer.log" "$keep/" 2>/dev/null
        fail "crash $fmt point $i ($desc)" "$why (kept in $keep)"
    fi
done

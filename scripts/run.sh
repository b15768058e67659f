#!/usr/bin/env bash
# `make run`: the main job on a thin image in ./run. For now: create a thin
# image (once), write to it through the block layer with `vdisk io`, and
# show `vdisk info` and `vdisk map`. Idempotent: a second run reuses the
# image and rewrites the same data.
set -euo pipefail
cd "$(dirname "$0")/.."
VDISK=${VDISK:-build/bin/vdisk}
mkdir -p run
img=run/disk.qcow2 fmt=qcow2
"$VDISK" --help | grep -q '^Supported formats:.* qcow2' || { img=run/disk.raw fmt=raw; }
if [ ! -e "$img" ]; then
    "$VDISK" create -f "$fmt" -o provisioning=thin "$img" 1G
fi
echo "== writing to $img (vdisk io)"
"$VDISK" io -f "$fmt" \
    -c "write -q -P 0xab 0 1M" \
    -c "write -q -P 0x5a 256M 64k" \
    -c "aio_write -q -P 0x11 512M 128k" -c "aio_write -q -P 0x22 768M 128k" -c "aio_flush" \
    -c "read -q -P 0xab 0 1M" -c "read -q -P 0x22 768M 128k" \
    -c "write -q -z 1023M 1M" "$img"
echo "== vdisk info $img"
"$VDISK" info -f "$fmt" "$img"
echo "== vdisk map $img"
"$VDISK" map -f "$fmt" "$img"
echo "== vdisk check $img"
rc=0; "$VDISK" check -f "$fmt" "$img" || rc=$?
[ $rc -eq 0 ] || [ $rc -eq 63 ] || exit $rc

# ---- serve it over NBD with vdiskd, in the foreground (Ctrl-C stops it) ----
# RUN_SECONDS=N stops it after N seconds (for unattended runs).
VDISKD=${VDISKD:-build/bin/vdiskd}
sock=$PWD/run/nbd.sock
ctl=$PWD/run/ctl.sock
uri="nbd+unix:///disk?socket=$sock"
echo "== serving $img with vdiskd"
"$VDISKD" --nbd "unix:$sock" --control "$ctl" --pidfile run/vdiskd.pid \
    --export "name=disk,file=$img,format=$fmt" &
vd=$!
stop_vdiskd() { kill -INT "$vd" 2>/dev/null || true; }
# Ctrl-C reaches vdiskd directly (same process group); forward only TERM.
trap stop_vdiskd TERM
trap : INT
for _ in $(seq 100); do [ -s run/vdiskd.pid ] && break; sleep 0.05; done
[ -s run/vdiskd.pid ] || { echo "vdiskd did not start" >&2; wait "$vd"; exit 1; }
if command -v nbdinfo >/dev/null; then
    echo "== nbdinfo $uri"
    nbdinfo "$uri" || true
fi
cat <<EOT

vdiskd is serving $img as export "disk" (pid $vd). Attach with:
  URI        $uri
  nbdinfo    nbdinfo '$uri'
             nbdinfo --map '$uri'
  qemu-img   qemu-img info '$uri'
  qemu-io    qemu-io -f raw -c 'read -P 0xab 0 1M' '$uri'
  nbdcopy    nbdcopy '$uri' run/copy.raw
  QEMU       -drive file=$uri,format=raw,if=virtio
  control    $VDISK ctl $ctl query-stats
Ctrl-C stops it (in-flight requests finish, the image is flushed and closed).
EOT
if [ -n "${RUN_SECONDS:-}" ]; then
    (sleep "$RUN_SECONDS"; kill -INT "$vd" 2>/dev/null) &
fi
rc=0
while kill -0 "$vd" 2>/dev/null; do
    wait "$vd" && rc=0 || rc=$?
done
echo "== vdiskd stopped (exit $rc)"
[ $rc -eq 0 ] || [ $rc -eq 130 ]

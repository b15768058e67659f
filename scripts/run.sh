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

#!/usr/bin/env bash
# Build (cached) the test VM: Debian's kernel, unpacked from its package
# with dpkg -x rather than installed, and a busybox initramfs holding the
# virtio modules, /init and the static guest program.
#   tests/guest/build.sh [OUTDIR]   (default build/guest) -> OUTDIR/{vmlinuz,initramfs.gz,guest_io}
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:-$ROOT/build/guest}
SRC=$ROOT/tests/guest
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# the kernel: the versioned package linux-image-amd64 depends on
if [ ! -f "$OUT/vmlinuz" ] || [ ! -d "$OUT/modules" ]; then
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    if [ -z "$pkg" ]; then
        apt-get update -qq >/dev/null 2>&1 || true
        pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    fi
    [ -n "$pkg" ] || { echo "build.sh: cannot find the kernel package" >&2; exit 1; }
    rm -rf "$OUT/deb" "$OUT/x"
    mkdir -p "$OUT/deb"
    (cd "$OUT/deb" && apt-get download "$pkg" >/dev/null 2>&1)
    dpkg -x "$OUT"/deb/*.deb "$OUT/x"
    cp "$OUT"/x/boot/vmlinuz-* "$OUT/vmlinuz"
    kdir=$(ls -d "$OUT"/x/lib/modules/*)
    mkdir -p "$OUT/modules"
    for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
        if grep -q "/$m.ko" "$kdir/modules.builtin"; then continue; fi    # built in
        f=$(find "$kdir" -name "$m.ko*" | head -1)
        [ -n "$f" ] || { echo "build.sh: module $m not found" >&2; exit 1; }
        case $f in
            *.xz) xz -dc "$f" > "$OUT/modules/$m.ko" ;;
            *.zst) zstd -qdc "$f" > "$OUT/modules/$m.ko" ;;
            *) cp "$f" "$OUT/modules/$m.ko" ;;
        esac
    done
    rm -rf "$OUT/x" "$OUT/deb"
fi

# the guest program, static
if [ ! -x "$OUT/guest_io" ] || [ "$SRC/guest_io.c" -nt "$OUT/guest_io" ]; then
    gcc -static -O2 -Wall -o "$OUT/guest_io" "$SRC/guest_io.c"
fi

# the initramfs
if [ ! -f "$OUT/initramfs.gz" ] || [ "$SRC/init" -nt "$OUT/initramfs.gz" ] || [ "$OUT/guest_io" -nt "$OUT/initramfs.gz" ]; then
    r=$OUT/root
    rm -rf "$r"
    mkdir -p "$r"/{bin,dev,proc,sys,lib/modules}
    cp /bin/busybox "$r/bin/busybox"
    cp "$SRC/init" "$r/init"
    chmod 755 "$r/init"
    cp "$OUT/guest_io" "$r/guest_io"
    cp "$OUT"/modules/*.ko "$r/lib/modules/" 2>/dev/null || true
    (cd "$r" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT/initramfs.gz"
    rm -rf "$r"
fi

#!/usr/bin/env bash
# make install: programs, library, headers and pkg-config file land under
# PREFIX, and a program built with `pkg-config vdisk` against the installed
# library creates, writes and reads an image.
source "$(dirname "$0")/../lib.sh"
cd "$VDISK_ROOT"
inst=$T/inst
if make --no-print-directory -s install PREFIX="$inst" > "$T/install.log" 2>&1; then ok "make install"
else fail "make install" "$(tail -3 "$T/install.log" | tr '\n' ' ')"; fi
check "headers installed" test -f "$inst/include/vdisk/block.h"
check "libraries installed" test -f "$inst/lib/libvdisk.a" -a -f "$inst/lib/libvdisk.so"
check "pkg-config file installed" test -f "$inst/lib/pkgconfig/vdisk.pc"
for p in build/bin/*; do
    check "program $(basename "$p") installed" test -x "$inst/bin/$(basename "$p")"
done
cat > "$T/prog.c" <<'C'
#include <stdio.h>
#include <string.h>
#include <vdisk/block.h>
#include <vdisk/error.h>
int main(int argc, char **argv)
{
    struct vd_create_opts co = { .size = 1 << 20 };
    int r = vd_image_create(argv[1], "raw", &co);
    struct vd_open_opts o = { .format = "raw" };
    struct vd_disk *d;
    if (r == 0) r = vd_disk_open(argv[1], &o, &d);
    if (r < 0) { fprintf(stderr, "%s\n", vd_errmsg(r)); return 1; }
    char w[4096], rd[4096];
    memset(w, 0x5a, sizeof(w));
    r = vd_disk_pwrite(d, w, sizeof(w), 8192, 0);
    if (r == 0) r = vd_disk_pread(d, rd, sizeof(rd), 8192);
    vd_disk_close(d);
    return r == 0 && memcmp(w, rd, sizeof(w)) == 0 ? 0 : 1;
}
C
export PKG_CONFIG_PATH=$inst/lib/pkgconfig
if gcc -o "$T/prog" "$T/prog.c" $(pkg-config --cflags --libs vdisk) 2> "$T/cc.log"; then ok "program builds with pkg-config vdisk"
else fail "program builds with pkg-config vdisk" "$(head -3 "$T/cc.log" | tr '\n' ' ')"; fi
check "installed library creates, writes and reads an image" env LD_LIBRARY_PATH="$inst/lib" "$T/prog" "$T/img.raw"
check "image has the data" cmp -n 4096 -i 8192:0 "$T/img.raw" <(head -c 4096 /dev/zero | tr '\0' 'Z')
for m in man/*.1 man/*.8; do
    [ -f "$m" ] || continue
    sec=${m##*.}
    check "man page $(basename "$m") installed" test -f "$inst/share/man/man$sec/$(basename "$m")"
    check "man page $(basename "$m") renders" sh -c "man -l '$m' > /dev/null 2>&1 || groff -man -Tutf8 '$m' > /dev/null"
done

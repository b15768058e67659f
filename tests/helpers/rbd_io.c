/* Test helper for tests/integration/rbd.sh: drives a disk through the
 * library, for what the CLI does not do.
 *   rbd_io hold NAME            open for writing, print "open", hold the
 *                               image (and its lock) until stdin closes
 *   rbd_io write NAME SEED N    N 4 KiB writes at pseudo-random offsets
 *   rbd_io verify NAME SEED N   check what `write` wrote
 * Exit 0 on success, 1 with a message on error. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "vdisk/block.h"
#include "vdisk/error.h"

static uint64_t next(uint64_t *s)   /* splitmix64 */
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void fill(uint8_t *b, uint64_t seed, uint64_t off)
{
    uint64_t s = seed ^ off;
    for (size_t i = 0; i < 4096; i += 8) { uint64_t v = next(&s); memcpy(b + i, &v, 8); }
}

int main(int argc, char **argv)
{
    if (argc < 3) { fprintf(stderr, "usage: rbd_io hold|write|verify NAME [SEED N]\n"); return 1; }
    const char *cmd = argv[1], *name = argv[2];
    bool rw = strcmp(cmd, "verify") != 0;
    struct vd_open_opts o = { .readonly = !rw };
    struct vd_disk *d;
    int r = vd_disk_open(name, &o, &d);
    if (r < 0) { fprintf(stderr, "rbd_io: %s\n", vd_errmsg(r)); return 1; }
    if (!strcmp(cmd, "hold")) {
        printf("open\n");
        fflush(stdout);
        char c;
        while (read(0, &c, 1) > 0) {}
    } else if (argc == 5) {
        uint64_t seed = strtoull(argv[3], NULL, 0), n = strtoull(argv[4], NULL, 0);
        uint64_t blocks = vd_disk_size(d) / 4096, s = seed;
        static uint8_t want[4096], got[4096];
        for (uint64_t i = 0; i < n && r == 0 && blocks; i++) {
            uint64_t off = next(&s) % blocks * 4096;
            fill(want, seed, off);
            if (rw) {
                r = vd_disk_pwrite(d, want, 4096, off, 0);
            } else if ((r = vd_disk_pread(d, got, 4096, off)) == 0 && memcmp(want, got, 4096)) {
                fprintf(stderr, "rbd_io: %s: data differs at offset %llu\n", name, (unsigned long long)off);
                r = -EIO;
            }
        }
        if (r == 0 && rw) r = vd_disk_flush(d);
        if (r < 0) fprintf(stderr, "rbd_io: %s: %s\n", name, vd_errmsg(r));
    } else {
        fprintf(stderr, "rbd_io: bad arguments\n");
        r = -EINVAL;
    }
    int c = vd_disk_close(d);
    if (c < 0 && r == 0) { fprintf(stderr, "rbd_io: close: %s\n", vd_errmsg(c)); r = c; }
    return r < 0;
}

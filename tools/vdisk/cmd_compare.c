/* vdisk compare: qemu-img compare's semantics, output and exit codes
 * (0 identical, 1 different, 2 error). Ranges that both images report as
 * zeros are not read. A larger image equals a smaller one when its extra
 * part reads as zeros, unless -s (strict) is given. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cli.h"
#include "vdisk/error.h"

#define BUF_SIZE (2u << 20)
#define SECTOR 512

struct img {
    const char *name;
    struct vd_disk *d;
    uint64_t size;
};

static int status(struct img *im, uint64_t off, uint64_t len, struct vd_extent *e)
{
    vd_err_clear();
    int r = vd_disk_block_status(im->d, off, len, e);
    if (r < 0) {
        vd_cli_err("Error while reading block status at offset %" PRIu64 " of %s: %s", off, im->name, vd_errmsg(r));
        return r;
    }
    if (e->len == 0 || e->len > len)
        e->len = len;
    return 0;
}

static int readbuf(struct img *im, void *buf, size_t len, uint64_t off)
{
    vd_err_clear();
    int r = vd_disk_pread(im->d, buf, len, off);
    if (r < 0)
        vd_cli_err("Error while reading offset %" PRIu64 " of %s: %s", off, im->name, vd_errmsg(r));
    return r;
}

/* Byte index of the first SECTOR-sized block where a and b differ, or -1. */
static int64_t first_diff(const uint8_t *a, const uint8_t *b, size_t len)
{
    if (!memcmp(a, b, len))
        return -1;
    for (size_t i = 0; i < len; i += SECTOR) {
        size_t n = len - i < SECTOR ? len - i : SECTOR;
        if (memcmp(a + i, b + i, n))
            return (int64_t)i;
    }
    return -1;
}

static int64_t first_nonzero(const uint8_t *a, size_t len)
{
    for (size_t i = 0; i < len; i += SECTOR) {
        size_t n = len - i < SECTOR ? len - i : SECTOR;
        for (size_t j = 0; j < n; j++)
            if (a[i + j])
                return (int64_t)i;
    }
    return -1;
}

/* The images differ at byte off: end the progress line, say where (unless
 * -q) and give compare's exit status for "different". */
static int content_mismatch(struct vd_cli_progress *pr, bool quiet, uint64_t off)
{
    vd_cli_progress_end(pr);
    if (!quiet)
        printf("Content mismatch at offset %" PRIu64 "!\n", off);
    return 1;
}

#define STATUS_MASK (VD_EXT_ALLOCATED | VD_EXT_ZERO | VD_EXT_DATA)

static int run(int argc, char **argv)
{
    static const struct option lopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 },
    };
    struct vd_cli_open o1 = { .readonly = true }, o2 = { .format_opt = "-F", .readonly = true };
    bool strict = false, progress = false, quiet = false;
    int c;

    while ((c = getopt_long(argc, argv, ":f:F:T:pqsU", lopts, NULL)) != -1) {
        switch (c) {
        case 'f': o1.format = optarg; break;
        case 'F': o2.format = optarg; break;
        case 'p': progress = true; break;
        case 'q': quiet = true; break;
        case 's': strict = true; break;
        case 'U': o1.force_share = o2.force_share = true; break;
        case 'T':
            if (vd_cli_cache(optarg, &o1.cache) < 0)
                return 2;
            o2.cache = o1.cache;
            break;
        default:
            vd_cli_bad_option(argv[0], c, argv);
            return 2;
        }
    }
    if (argc - optind != 2) {
        vd_cli_usage(argv[0], "Expecting two image file names");
        return 2;
    }
    if (quiet)
        progress = false;
    struct img a = { .name = argv[optind] }, b = { .name = argv[optind + 1] };
    uint8_t *ba = NULL, *bb = NULL;
    int rc = 2;

    if (vd_cli_open(a.name, &o1, &a.d) < 0)
        return 2;
    if (vd_cli_open(b.name, &o2, &b.d) < 0)
        goto out;
    a.size = vd_disk_size(a.d);
    b.size = vd_disk_size(b.d);
    ba = vd_alloc_aligned(BUF_SIZE);
    bb = vd_alloc_aligned(BUF_SIZE);
    if (!ba || !bb) {
        vd_cli_err("out of memory");
        goto out;
    }
    if (a.size != b.size) {
        if (strict) {
            if (!quiet)
                printf("Strict mode: Image size mismatch!\n");
            rc = 1;
            goto out;
        }
        if (!quiet)
            printf("Warning: Image size mismatch!\n");
    }

    struct vd_cli_progress pr;
    uint64_t common = a.size < b.size ? a.size : b.size;
    uint64_t total = a.size > b.size ? a.size : b.size;
    vd_cli_progress_init(&pr, progress);

    for (uint64_t off = 0; off < common;) {
        struct vd_extent ea, eb;
        if (status(&a, off, common - off, &ea) < 0 || status(&b, off, common - off, &eb) < 0)
            goto out;
        uint64_t chunk = ea.len < eb.len ? ea.len : eb.len;
        if (strict && (ea.flags & STATUS_MASK) != (eb.flags & STATUS_MASK)) {
            vd_cli_progress_end(&pr);
            if (!quiet)
                printf("Strict mode: Offset %" PRIu64 " block status mismatch!\n", off);
            rc = 1;
            goto out;
        }
        if ((ea.flags & VD_EXT_ZERO) && (eb.flags & VD_EXT_ZERO)) {
            off += chunk;
            vd_cli_progress(&pr, off * 100.0 / (double)total);
            continue;
        }
        if (chunk > BUF_SIZE)
            chunk = BUF_SIZE;
        int64_t diff;
        if (ea.flags & VD_EXT_ZERO) {
            if (readbuf(&b, bb, chunk, off) < 0)
                goto out;
            diff = first_nonzero(bb, chunk);
        } else if (eb.flags & VD_EXT_ZERO) {
            if (readbuf(&a, ba, chunk, off) < 0)
                goto out;
            diff = first_nonzero(ba, chunk);
        } else {
            if (readbuf(&a, ba, chunk, off) < 0 || readbuf(&b, bb, chunk, off) < 0)
                goto out;
            diff = first_diff(ba, bb, chunk);
        }
        if (diff >= 0) {
            rc = content_mismatch(&pr, quiet, off + (uint64_t)diff);
            goto out;
        }
        off += chunk;
        vd_cli_progress(&pr, off * 100.0 / (double)total);
    }

    /* The extra part of the larger image must read as zeros. */
    struct img *big = a.size > b.size ? &a : &b;
    for (uint64_t off = common; off < big->size;) {
        struct vd_extent e;
        if (status(big, off, big->size - off, &e) < 0)
            goto out;
        uint64_t chunk = e.len;
        if (!(e.flags & VD_EXT_ZERO)) {
            if (chunk > BUF_SIZE)
                chunk = BUF_SIZE;
            if (readbuf(big, ba, chunk, off) < 0)
                goto out;
            int64_t nz = first_nonzero(ba, chunk);
            if (nz >= 0) {
                rc = content_mismatch(&pr, quiet, off + (uint64_t)nz);
                goto out;
            }
        }
        off += chunk;
        vd_cli_progress(&pr, off * 100.0 / (double)total);
    }
    vd_cli_progress_end(&pr);
    if (!quiet)
        printf("Images are identical.\n");
    rc = 0;
out:
    free(ba);
    free(bb);
    if (b.d)
        vd_disk_close(b.d);
    vd_disk_close(a.d);
    return rc;
}

static const struct vd_cli_cmd cmd_compare = {
    "compare",
    "[-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2",
    "Check whether two images have the same content.\n"
    "  -f / -F   the formats of the first / second image (probed when omitted;\n"
    "            a raw image must be named: -f raw / -F raw)\n"
    "  -s        strict: sizes and allocation status must match too\n"
    "  -p        show progress;  -q  print nothing (the exit status tells)\n"
    "Exit status: 0 identical, 1 different, 2 error.\n",
    run,
};
VD_CLI_COMMAND(cmd_compare)

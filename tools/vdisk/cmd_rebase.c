/* vdisk rebase: change an image's backing file. With -u only the header
 * changes (the new backing file must hold the same data); without it, every
 * range the image does not hold itself and that differs between the old and
 * the new backing chain is first copied into the image. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cli.h"
#include "vdisk/error.h"

#define CHUNK (1u << 20)

/* Copy into the top of d what reads differently through nb (NULL: no
 * backing, zeros). */
static int copy_differences(const char *file, struct vd_disk *d, struct vd_disk *nb, bool progress)
{
    uint64_t size = vd_disk_size(d), nsize = nb ? vd_disk_size(nb) : 0;
    uint8_t *a = vd_alloc_aligned(CHUNK), *b = vd_alloc_aligned(CHUNK);
    struct vd_cli_progress pr;
    int r = -ENOMEM;

    if (!a || !b) {
        vd_cli_err("out of memory");
        goto out;
    }
    vd_cli_progress_init(&pr, progress);
    for (uint64_t off = 0; off < size;) {
        struct vd_extent e;
        vd_err_clear();
        r = vd_disk_block_status(d, off, size - off, &e);
        if (r < 0) {
            vd_cli_err("%s: block status at offset %" PRIu64 ": %s", file, off, vd_errmsg(r));
            goto out;
        }
        uint64_t len = e.len ? e.len : size - off;
        if ((e.flags & VD_EXT_ALLOCATED) && e.depth == 0) {
            off += len;           /* the image's own data: unaffected */
            continue;
        }
        if (len > CHUNK)
            len = CHUNK;
        vd_err_clear();
        r = vd_disk_pread(d, a, len, off);
        if (r < 0) {
            vd_cli_err("Could not read old backing data at offset %" PRIu64 ": %s", off, vd_errmsg(r));
            goto out;
        }
        memset(b, 0, len);
        if (nb && off < nsize) {
            uint64_t n = nsize - off < len ? nsize - off : len;
            vd_err_clear();
            r = vd_disk_pread(nb, b, n, off);
            if (r < 0) {
                vd_cli_err("Could not read new backing data at offset %" PRIu64 ": %s", off, vd_errmsg(r));
                goto out;
            }
        }
        if (memcmp(a, b, len)) {
            vd_err_clear();
            r = vd_disk_pwrite(d, a, len, off, 0);
            if (r < 0) {
                vd_cli_err_file(file, r);
                goto out;
            }
        }
        off += len;
        vd_cli_progress(&pr, off * 100.0 / (double)size);
    }
    vd_cli_progress_end(&pr);
    vd_err_clear();
    r = vd_disk_flush(d);
    if (r < 0)
        vd_cli_err_file(file, r);
out:
    free(a);
    free(b);
    return r;
}

static int run(int argc, char **argv)
{
    static const struct option lopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { NULL, 0, NULL, 0 },
    };
    struct vd_cli_open oo = { 0 };
    const char *backing = NULL, *bfmt = NULL;
    bool unsafe = false, progress = false, quiet = false;
    int c, rc = 1;

    while ((c = getopt_long(argc, argv, ":f:F:b:t:T:upqU", lopts, NULL)) != -1) {
        switch (c) {
        case 'f': oo.format = optarg; break;
        case 'F': bfmt = optarg; break;
        case 'b': backing = optarg; break;
        case 'u': unsafe = true; break;
        case 'p': progress = true; break;
        case 'q': quiet = true; break;
        case 't':
            if (vd_cli_cache(optarg, &oo.cache) < 0)
                return 1;
            break;
        case 'T': {
            enum vd_cache ignored;
            if (vd_cli_cache(optarg, &ignored) < 0)
                return 1;
            break;
        }
        case 'U':
            vd_cli_err("--force-share/-U is not allowed with rebase");
            return 1;
        default:
            return vd_cli_bad_option(argv[0], c, argv);
        }
    }
    if (optind != argc - 1)
        return vd_cli_usage(argv[0], "Expecting one image file name");
    if (!backing)
        return vd_cli_usage(argv[0], "Must specify backing file (-b), or -b \"\" to remove it");
    if (quiet)
        progress = false;
    const char *file = argv[optind];
    if (!*backing)
        backing = NULL;
    if (bfmt && !vd_format_find(bfmt)) {
        vd_cli_err("Unknown backing file format '%s'", bfmt);
        return 1;
    }

    struct vd_disk *d = NULL, *nb = NULL;
    char *path = backing ? vd_cli_backing_path(file, backing) : NULL;
    if (backing && !path) {
        vd_cli_err("out of memory");
        return 1;
    }
    if (backing && (!unsafe || !bfmt)) {
        /* Open the new backing file: safe mode reads it, and its format is
         * needed when -F is missing (a probed raw file is not accepted). */
        struct vd_cli_open bo = { .format = bfmt, .format_opt = "-F", .readonly = true, .force_share = true };
        if (vd_cli_open(path, &bo, &nb) < 0) {
            vd_cli_err("Could not open new backing file '%s'", backing);
            goto out;
        }
        if (!bfmt) {
            struct vd_file *f;
            const struct vd_format *pf = NULL;
            if (vd_file_open(path, VD_FILE_RDONLY | VD_FILE_NOLOCK, VD_CACHE_WRITEBACK, &f) == 0) {
                if (vd_format_probe(f, &pf) < 0)
                    pf = NULL;
                vd_file_close(f);
            }
            if (!pf) {
                vd_cli_err("Could not change the backing file to '%s': backing format must be specified", backing);
                goto out;
            }
            bfmt = pf->name;
        }
    }
    oo.no_backing = unsafe;
    if (vd_cli_open(file, &oo, &d) < 0)
        goto out;
    struct vd_layer *l = vd_disk_top(d);
    if (!l->fmt->set_backing) {
        vd_cli_err("%s: the %s format has no backing file", file, l->fmt->name);
        goto out;
    }
    if (!unsafe && copy_differences(file, d, nb, progress) < 0)
        goto out;
    vd_err_clear();
    pthread_mutex_lock(&l->lock);
    int r = l->fmt->set_backing(l, backing, backing ? bfmt : NULL);
    pthread_mutex_unlock(&l->lock);
    if (r < 0) {
        vd_cli_err("Could not change the backing file to '%s': %s", backing ? backing : "", vd_errmsg(r));
        goto out;
    }
    vd_err_clear();
    r = vd_disk_close(d);
    d = NULL;
    if (r < 0) {
        vd_cli_err_file(file, r);
        goto out;
    }
    rc = 0;
out:
    if (d)
        vd_disk_close(d);
    if (nb)
        vd_disk_close(nb);
    free(path);
    return rc;
}

static const struct vd_cli_cmd cmd_rebase = {
    "rebase",
    "[-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename",
    "Change the backing file of an image.\n"
    "  -b FILE   the new backing file (relative to the image), \"\" for none\n"
    "  -F FMT    its format (probed when omitted; raw must be named)\n"
    "  -u        unsafe: rewrite the header only; the new backing file must\n"
    "            already read the same as the old one\n"
    "  without -u: data that differs between the old and the new backing\n"
    "            chain is copied into the image first, so its content is kept\n"
    "  -p        show progress\n",
    run,
};
VD_CLI_COMMAND(cmd_rebase)

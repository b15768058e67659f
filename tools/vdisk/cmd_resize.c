/* vdisk resize: grow (or with --shrink, shrink) an image's virtual size. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include "cli.h"
#include "vdisk/error.h"

static int run(int argc, char **argv)
{
    enum { OPT_SHRINK = 256, OPT_PREALLOC };
    static const struct option lopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "shrink", no_argument, NULL, OPT_SHRINK },
        { "preallocation", required_argument, NULL, OPT_PREALLOC },
        { NULL, 0, NULL, 0 },
    };
    struct vd_cli_open oo = { 0 };
    enum vd_prealloc prealloc = VD_PREALLOC_OFF;
    bool shrink = false, quiet = false;
    int c;

    if (argc < 3)
        return vd_cli_usage(argv[0], "Expecting image file name and size");
    /* The size is always last; take it out before getopt so that "-1G"
     * is not read as options. */
    const char *size_arg = argv[--argc];
    while ((c = getopt_long(argc, argv, ":f:qU", lopts, NULL)) != -1) {
        switch (c) {
        case 'f': oo.format = optarg; break;
        case 'q': quiet = true; break;
        case 'U':
            vd_cli_err("--force-share/-U is not allowed with resize");
            return 1;
        case OPT_SHRINK: shrink = true; break;
        case OPT_PREALLOC: {
            struct vd_opts po = { 0 };
            vd_err_clear();
            int r = vd_opts_set(&po, "preallocation", optarg);
            if (r == 0)
                r = vd_prealloc_from_opts(&po, &prealloc);
            vd_opts_free(&po);
            if (r < 0) {
                vd_cli_err("Invalid preallocation mode '%s' (off, metadata, falloc or full)", optarg);
                return 1;
            }
            break;
        }
        default:
            return vd_cli_bad_option(argv[0], c, argv);
        }
    }
    if (optind != argc - 1)
        return vd_cli_usage(argv[0], "Expecting image file name and size");
    const char *file = argv[optind];

    int rel = 0;
    const char *s = size_arg;
    if (*s == '+' || *s == '-') {
        rel = *s == '+' ? 1 : -1;
        s++;
    }
    uint64_t n;
    if (vd_cli_size(s, &n, "image size") < 0)
        return 1;

    struct vd_disk *d;
    oo.no_backing = true;
    if (vd_cli_open(file, &oo, &d) < 0)
        return 1;
    uint64_t cur = vd_disk_size(d), size = n;
    if (rel > 0) {
        if (n > INT64_MAX - cur) {
            vd_cli_err("%s: New image size is too large", file);
            goto fail;
        }
        size = cur + n;
    } else if (rel < 0) {
        if (n >= cur) {
            vd_cli_err("New image size must be positive");
            goto fail;
        }
        size = cur - n;
    }
    if (size < cur && !shrink) {
        vd_cli_err("Use the --shrink option to perform a shrink operation.");
        goto fail;
    }
    if (size < cur && prealloc != VD_PREALLOC_OFF) {
        vd_cli_err("Preallocation can only be used for growing images");
        goto fail;
    }
    if (size < cur && !quiet)
        fprintf(stderr, "vdisk: warning: Shrinking an image will delete all data beyond the shrunken image's "
                        "end. Before performing such an operation, make sure there is no important data there.\n");
    vd_err_clear();
    int r = vd_disk_resize(d, size, prealloc);
    if (r < 0) {
        vd_cli_err_file(file, r);
        goto fail;
    }
    vd_err_clear();
    r = vd_disk_close(d);
    if (r < 0) {
        vd_cli_err_file(file, r);
        return 1;
    }
    if (!quiet)
        printf("Image resized.\n");
    return 0;
fail:
    vd_disk_close(d);
    return 1;
}

static const struct vd_cli_cmd cmd_resize = {
    "resize",
    "[-q] [-f fmt] [--shrink] [--preallocation=mode] filename [+|-]size",
    "Change an image's virtual size.\n"
    "The size is absolute, or +size / -size relative to the current one.\n"
    "  --shrink              allow making the image smaller (data past the end is lost)\n"
    "  --preallocation=MODE  off, metadata, falloc or full, for the new part\n",
    run,
};
VD_CLI_COMMAND(cmd_resize)

/* vdisk create: a new image, qemu-img create's options and message. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cli.h"
#include "vdisk/error.h"

static int run(int argc, char **argv)
{
    static const struct option lopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "quiet", no_argument, NULL, 'q' },
        { NULL, 0, NULL, 0 },
    };
    const char *fmt_name = "raw", *backing = NULL, *backing_fmt = NULL;
    bool quiet = false, unsafe = false, want_help = false;
    struct vd_opts opts = { 0 }, fopts = { 0 };
    int c, rc = 1;

    while ((c = getopt_long(argc, argv, ":f:o:b:F:uq", lopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt_name = optarg; break;
        case 'b': backing = optarg; break;
        case 'F': backing_fmt = optarg; break;
        case 'u': unsafe = true; break;
        case 'q': quiet = true; break;
        case 'o':
            if (vd_cli_opts_arg(&opts, optarg, &want_help) < 0)
                goto out;
            break;
        default:
            rc = vd_cli_bad_option(argv[0], c, argv);
            goto out;
        }
    }
    const struct vd_format *fmt = vd_format_find(fmt_name);
    if (!fmt) {
        vd_cli_err("%s%sUnknown file format '%s'", optind < argc ? argv[optind] : "",
                   optind < argc ? ": " : "", fmt_name);
        goto out;
    }
    for (size_t i = 0; i < opts.n; i++)
        if (!strcmp(opts.kv[i].key, "help") || !strcmp(opts.kv[i].key, "?"))
            want_help = true;
    if (want_help) {
        vd_cli_print_create_opts(fmt);
        rc = 0;
        goto out;
    }
    if (optind >= argc) {
        rc = vd_cli_usage(argv[0], "Expecting image file name");
        goto out;
    }
    if (argc - optind > 2) {
        rc = vd_cli_usage(argv[0], "Unexpected argument: %s", argv[optind + 2]);
        goto out;
    }
    const char *file = argv[optind];
    struct vd_create_opts co = { .opts = &fopts };
    bool have_size = false;

    for (size_t i = 0; i < opts.n; i++) {
        if (!vd_cli_create_opt_known(fmt, opts.kv[i].key)) {
            vd_cli_err("%s: Invalid parameter '%s'", file, opts.kv[i].key);
            goto out;
        }
    }
    vd_err_clear();
    const char *osize = vd_opts_get(&opts, "size");
    if (osize) {
        if (vd_cli_size(osize, &co.size, "image size") < 0)
            goto out;
        have_size = true;
    }
    if (optind + 1 < argc) {
        if (vd_cli_size(argv[optind + 1], &co.size, "image size") < 0)
            goto out;
        have_size = true;
    }
    const char *ob = vd_opts_get(&opts, "backing_file");
    const char *obf = vd_opts_get(&opts, "backing_fmt");
    if (!backing)
        backing = ob;
    if (!backing_fmt)
        backing_fmt = obf;
    if (backing && !*backing)
        backing = NULL;
    if (backing_fmt && !backing) {
        vd_cli_err("%s: -F (backing_fmt) requires a backing file (-b)", file);
        goto out;
    }
    if (backing_fmt && !vd_format_find(backing_fmt)) {
        vd_cli_err("%s: Unknown backing file format '%s'", file, backing_fmt);
        goto out;
    }
    if (vd_prealloc_from_opts(&opts, &co.prealloc) < 0) {
        vd_cli_err("%s: %s", file, vd_errmsg(-EINVAL));
        goto out;
    }
    if (backing && !unsafe) {
        /* The backing file must open (and gives the size when none was given). */
        char *path = vd_cli_backing_path(file, backing);
        struct vd_cli_open oo = { .format = backing_fmt, .format_opt = "-F", .readonly = true,
                                  .force_share = true };
        struct vd_disk *bd;
        if (!path) {
            vd_cli_err("%s: out of memory", file);
            goto out;
        }
        int r = vd_cli_open(path, &oo, &bd);
        free(path);
        if (r < 0) {
            vd_cli_err("%s: Could not open backing image '%s'", file, backing);
            goto out;
        }
        if (!have_size) {
            co.size = vd_disk_size(bd);
            have_size = true;
        }
        if (!backing_fmt)
            backing_fmt = vd_disk_top(bd)->fmt->name;
        vd_disk_close(bd);
    }
    if (!have_size && !backing) {
        vd_cli_err("%s: Image creation needs a size parameter", file);
        goto out;
    }
    co.backing = backing;
    co.backing_fmt = backing_fmt;
    /* The format gets the options that are its own (the rest are fields of co). */
    for (size_t i = 0; i < opts.n; i++) {
        const char *k = opts.kv[i].key;
        if (strcmp(k, "size") && strcmp(k, "backing_file") && strcmp(k, "backing_fmt") &&
            vd_opts_set(&fopts, k, opts.kv[i].val) < 0) {
            vd_cli_err("out of memory");
            goto out;
        }
    }

    if (!quiet) {
        printf("Formatting '%s', fmt=%s", file, fmt->name);
        if (have_size)
            printf(" size=%llu", (unsigned long long)co.size);
        if (backing)
            printf(" backing_file=%s", backing);
        if (backing_fmt)
            printf(" backing_fmt=%s", backing_fmt);
        for (size_t i = 0; i < opts.n; i++) {
            const char *k = opts.kv[i].key;
            if (strcmp(k, "size") && strcmp(k, "backing_file") && strcmp(k, "backing_fmt"))
                printf(" %s=%s", k, opts.kv[i].val);
        }
        putchar('\n');
        fflush(stdout);
    }
    vd_err_clear();
    int r = vd_image_create(file, fmt->name, &co);
    if (r < 0) {
        vd_cli_err_file(file, r);
        goto out;
    }
    rc = 0;
out:
    vd_opts_free(&opts);
    vd_opts_free(&fopts);
    return rc;
}

static const struct vd_cli_cmd cmd_create = {
    "create",
    "[-q] [-f fmt] [-o options] [-b backing_file [-F backing_fmt]] [-u] filename [size]",
    "Create a new disk image.\n"
    "  -f fmt          image format (raw, qcow2, vmdk, vhd/vpc; default raw)\n"
    "  -o options      format options, key=value[,key=value...]; -o help lists them\n"
    "                  (provisioning=thin|lazy-zeroed|eager-zeroed or\n"
    "                  preallocation=off|metadata|falloc|full for every format)\n"
    "  -b backing_file backing file (relative names are relative to the image)\n"
    "  -F backing_fmt  its format (probed when omitted; a raw one needs -F raw)\n"
    "  -u              do not open the backing file (the size must be given)\n"
    "  -q              do not print the 'Formatting' line\n"
    "  size            bytes, or with a suffix k, M, G, T, P, E (binary units)\n",
    run,
};
VD_CLI_COMMAND(cmd_create)

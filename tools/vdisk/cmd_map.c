/* vdisk map: the image's allocation as qemu-img map prints it (7.2). */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include "cli.h"
#include "vdisk/error.h"

struct entry {
    uint64_t start, length, offset;
    int depth;
    bool present, zero, data, has_offset;
    const char *filename;
};

static bool mergeable(const struct entry *a, const struct entry *b)
{
    if (a->length == 0 || a->zero != b->zero || a->data != b->data || a->depth != b->depth ||
        a->present != b->present || a->has_offset != b->has_offset || !a->filename != !b->filename)
        return false;
    if (a->filename && strcmp(a->filename, b->filename))
        return false;
    if (a->has_offset && a->offset + a->length != b->offset)
        return false;
    return a->start + a->length == b->start;
}

static int dump(const struct entry *e, bool json, bool more)
{
    if (json) {
        printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %d, \"present\": %s,"
               " \"zero\": %s, \"data\": %s", e->start, e->length, e->depth,
               e->present ? "true" : "false", e->zero ? "true" : "false", e->data ? "true" : "false");
        if (e->has_offset)
            printf(", \"offset\": %" PRIu64, e->offset);
        putchar('}');
        if (more)
            puts(",");
        return 0;
    }
    if (e->data && !e->has_offset) {
        vd_cli_err("File contains external, encrypted or compressed clusters.");
        return -ENOTSUP;
    }
    if (e->data && !e->zero) {
        /* %#x prints 0 as "0", as qemu-img's output has it */
        printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e->start, e->length,
               e->has_offset ? e->offset : 0, e->filename ? e->filename : "");
    }
    return 0;
}

static int run(int argc, char **argv)
{
    enum { OPT_OUTPUT = 256 };
    static const struct option lopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "output", required_argument, NULL, OPT_OUTPUT },
        { "start-offset", required_argument, NULL, 's' },
        { "max-length", required_argument, NULL, 'l' },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 },
    };
    struct vd_cli_open oo = { .readonly = true };
    uint64_t start = 0, maxlen = UINT64_MAX;
    int json = 0, c;

    while ((c = getopt_long(argc, argv, ":f:s:l:U", lopts, NULL)) != -1) {
        switch (c) {
        case 'f': oo.format = optarg; break;
        case 'U': oo.force_share = true; break;
        case 's':
            if (vd_cli_size(optarg, &start, "start offset") < 0)
                return 1;
            break;
        case 'l':
            if (vd_cli_size(optarg, &maxlen, "length") < 0)
                return 1;
            break;
        case OPT_OUTPUT:
            if ((json = vd_cli_output(optarg)) < 0)
                return 1;
            break;
        default:
            return vd_cli_bad_option(argv[0], c, argv);
        }
    }
    if (optind != argc - 1)
        return vd_cli_usage(argv[0], "Expecting one image file name");
    const char *file = argv[optind];
    struct vd_disk *d;
    if (vd_cli_open(file, &oo, &d) < 0)
        return 1;

    uint64_t size = vd_disk_size(d);
    uint64_t end = start >= size ? start : (maxlen > size - start ? size : start + maxlen);
    struct entry cur = { 0 }, next;
    bool have = false;
    int rc = 0;

    if (json)
        putchar('[');
    else
        printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
    for (uint64_t off = start; off < end;) {
        struct vd_extent e;
        vd_err_clear();
        int r = vd_disk_block_status(d, off, end - off, &e);
        if (r < 0) {
            vd_cli_err("%s: Could not read block status at offset %" PRIu64 ": %s", file, off, vd_errmsg(r));
            rc = 1;
            break;
        }
        if (e.len == 0) {
            vd_cli_err("%s: empty block status answer at offset %" PRIu64, file, off);
            rc = 1;
            break;
        }
        next = (struct entry){
            .start = off,
            .length = e.len > end - off ? end - off : e.len,
            .depth = e.depth,
            .present = e.flags & VD_EXT_ALLOCATED,
            .zero = e.flags & VD_EXT_ZERO,
            .data = e.flags & VD_EXT_DATA,
            .has_offset = e.flags & VD_EXT_OFFSET,
            .offset = e.host_off,
            .filename = (e.flags & VD_EXT_OFFSET) && e.file ? e.file->name : NULL,
        };
        if (!json && (!next.data || next.zero)) {
            /* the human format does not tell zero from unallocated: merge them */
            next.data = false;
            next.zero = true;
        }
        off += next.length;
        if (have && mergeable(&cur, &next)) {
            cur.length += next.length;
            continue;
        }
        if (have && dump(&cur, json, true) < 0) {
            rc = 1;
            have = false;
            break;
        }
        cur = next;
        have = true;
    }
    if (!have && rc == 0) {
        /* nothing to map (empty image, start past the end): qemu-img shows
         * one empty extent */
        cur = (struct entry){ .start = start };
        have = true;
    }
    if (have && dump(&cur, json, false) < 0)
        rc = 1;
    if (json)
        puts("]");
    vd_disk_close(d);
    return rc;
}

static const struct vd_cli_cmd cmd_map = {
    "map",
    "[-f fmt] [--output=human|json] [-s start] [-l length] [-U] filename",
    "Show where an image's data lives (its block status, top to bottom of the chain).\n"
    "  --output=json     one object per extent: start, length, depth (0 = top),\n"
    "                    present (allocated in the chain), zero, data, offset (host)\n"
    "  --output=human    data extents only: offset, length, host offset, file\n"
    "  -s, --start-offset=OFFSET   -l, --max-length=LENGTH   a part of the image\n"
    "  -U, --force-share do not take the image lock\n",
    run,
};
VD_CLI_COMMAND(cmd_map)

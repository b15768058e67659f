/* vdisk io: run I/O commands against an image through the block layer, in
 * the spirit of qemu-io (-c "write -P 0xab 0 64k" -c "read -P 0xab 0 64k").
 * Synchronous commands (read, write, discard, flush, truncate) and
 * asynchronous ones (aio_read, aio_write, then aio_flush to wait for them)
 * exercise the request path with each I/O engine and cache mode. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "cli.h"
#include "vdisk/error.h"

#define MAX_ARGS 32
#define MAX_LEN (1ull << 30)

struct io_ctx {
    const char *file;
    struct vd_disk *d;
    struct vd_loop *loop;
    int inflight;
    int aio_failed;
};

struct aio {
    struct io_ctx *ctx;
    struct vd_req req;
    struct iovec iov;
    void *buf;
    int pattern;            /* read: expected byte or -1 */
    bool quiet;
    struct timespec t0;
};

static double now_since(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - t0->tv_sec) + (double)(t.tv_nsec - t0->tv_nsec) / 1e9;
}

static void report(const char *verb, uint64_t len, uint64_t off, double secs)
{
    char sz[32], rate[32];
    printf("%s %" PRIu64 "/%" PRIu64 " bytes at offset %" PRIu64 "\n", verb, len, len, off);
    vd_format_size(len, sz, sizeof(sz));
    if (secs <= 0)
        secs = 1e-9;
    vd_format_size((uint64_t)((double)len / secs), rate, sizeof(rate));
    printf("%s, 1 ops; %.4f sec (%s/sec and %.4f ops/sec)\n", sz, secs, rate, 1 / secs);
}

static int num(const char *s, uint64_t *out)
{
    char *end;
    if (!strncmp(s, "0x", 2) || !strncmp(s, "0X", 2)) {
        errno = 0;
        *out = strtoull(s, &end, 16);
        return errno || *end ? -EINVAL : 0;
    }
    if (s[0] == '-')
        return -EINVAL;
    return vd_parse_size(s, out);
}

static int get_pattern(const char *s, int *out)
{
    char *end;
    long v = strtol(s, &end, 0);
    if (*end || v < 0 || v > 255) {
        vd_cli_err("invalid pattern '%s' (a byte, 0..255)", s);
        return -EINVAL;
    }
    *out = (int)v;
    return 0;
}

/* Pattern check: the first byte that differs, or -1. */
static int64_t verify(const uint8_t *b, uint64_t len, int pat)
{
    for (uint64_t i = 0; i < len; i++)
        if (b[i] != (uint8_t)pat)
            return (int64_t)i;
    return -1;
}

static void aio_done(struct vd_req *r, int res)
{
    struct aio *a = r->opaque;
    struct io_ctx *ctx = a->ctx;
    bool rd = r->op == VD_OP_READ;
    if (res < 0) {
        vd_cli_err("%s: aio_%s failed at offset %" PRIu64 ": %s", ctx->file, rd ? "read" : "write", r->off,
                   strerror(-res));
        ctx->aio_failed = 1;
    } else if (rd && a->pattern >= 0 && verify(a->buf, r->len, a->pattern) >= 0) {
        printf("Pattern verification failed at offset %" PRIu64 ", %" PRIu64 " bytes\n", r->off, r->len);
        ctx->aio_failed = 1;
    } else if (!a->quiet) {
        report(rd ? "read" : "wrote", r->len, r->off, now_since(&a->t0));
    }
    ctx->inflight--;
    free(a->buf);
    free(a);
}

static int drain(struct io_ctx *ctx)
{
    while (ctx->inflight > 0)
        vd_loop_run_once(ctx->loop, -1);
    int f = ctx->aio_failed;
    ctx->aio_failed = 0;
    return f ? -EIO : 0;
}

/* Parse "[-P pat] [-z] [-u] [-f] [-q] off len" style arguments. */
struct args {
    int pattern;
    bool zero, unmap, fua, quiet;
    uint64_t off, len;
    int nnum;
};

static int parse_args(const char *cmd, int argc, char **argv, const char *allowed, struct args *a, int need)
{
    *a = (struct args){ .pattern = -1 };
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i];
        if (s[0] == '-' && s[1] && strchr(allowed, s[1]) && !s[2]) {
            switch (s[1]) {
            case 'P':
                if (i + 1 >= argc) {
                    vd_cli_err("%s: -P needs a pattern", cmd);
                    return -EINVAL;
                }
                if (get_pattern(argv[++i], &a->pattern) < 0)
                    return -EINVAL;
                break;
            case 'z': a->zero = true; break;
            case 'u': a->unmap = true; break;
            case 'f': a->fua = true; break;
            case 'q': a->quiet = true; break;
            }
            continue;
        }
        uint64_t v;
        if (a->nnum >= 2 || num(s, &v) < 0) {
            vd_cli_err("%s: invalid argument '%s'", cmd, s);
            return -EINVAL;
        }
        if (a->nnum++ == 0)
            a->off = v;
        else
            a->len = v;
    }
    if (a->nnum != need) {
        vd_cli_err("%s: expects %s", cmd, need == 2 ? "an offset and a length" : "one number");
        return -EINVAL;
    }
    if (need == 2 && a->len > MAX_LEN && !a->zero && strcmp(cmd, "discard")) {
        vd_cli_err("%s: length %" PRIu64 " is too large (at most 1 GiB per command)", cmd, a->len);
        return -EINVAL;
    }
    return 0;
}

static int do_cmd(struct io_ctx *ctx, char *line)
{
    char *argv[MAX_ARGS], *save = NULL;
    int argc = 0;
    for (char *t = strtok_r(line, " \t\n", &save); t; t = strtok_r(NULL, " \t\n", &save)) {
        if (argc == MAX_ARGS) {
            vd_cli_err("too many arguments");
            return -EINVAL;
        }
        argv[argc++] = t;
    }
    if (argc == 0 || argv[0][0] == '#')
        return 0;
    const char *cmd = argv[0];
    struct args a;
    struct timespec t0;
    int r;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    vd_err_clear();

    if (!strcmp(cmd, "read") || !strcmp(cmd, "write")) {
        bool rd = cmd[0] == 'r';
        if (parse_args(cmd, argc, argv, rd ? "Pq" : "Pzufq", &a, 2) < 0)
            return -EINVAL;
        if (!rd && a.zero) {
            r = vd_disk_write_zeroes(ctx->d, a.off, a.len, (a.unmap ? VD_REQ_MAY_UNMAP : 0));
            if (r < 0) {
                vd_cli_err("%s: write failed: %s", ctx->file, vd_cli_strip(vd_errmsg(r), ctx->file));
                return r;
            }
            if (!a.quiet)
                report("wrote", a.len, a.off, now_since(&t0));
            return 0;
        }
        uint8_t *buf = vd_alloc_aligned(a.len ? a.len : 1);
        if (!buf) {
            vd_cli_err("out of memory");
            return -ENOMEM;
        }
        if (rd) {
            r = vd_disk_pread(ctx->d, buf, a.len, a.off);
            if (r < 0) {
                vd_cli_err("%s: read failed: %s", ctx->file, vd_cli_strip(vd_errmsg(r), ctx->file));
            } else if (a.pattern >= 0 && verify(buf, a.len, a.pattern) >= 0) {
                printf("Pattern verification failed at offset %" PRIu64 ", %" PRIu64 " bytes\n", a.off, a.len);
                r = -EIO;
            } else if (!a.quiet) {
                report("read", a.len, a.off, now_since(&t0));
            }
        } else {
            memset(buf, a.pattern >= 0 ? a.pattern : 0xcd, a.len);
            r = vd_disk_pwrite(ctx->d, buf, a.len, a.off, a.fua ? VD_REQ_FUA : 0);
            if (r < 0)
                vd_cli_err("%s: write failed: %s", ctx->file, vd_cli_strip(vd_errmsg(r), ctx->file));
            else if (!a.quiet)
                report("wrote", a.len, a.off, now_since(&t0));
        }
        free(buf);
        return r;
    }
    if (!strcmp(cmd, "aio_read") || !strcmp(cmd, "aio_write")) {
        bool rd = cmd[4] == 'r';
        if (parse_args(cmd, argc, argv, rd ? "Pq" : "Pfq", &a, 2) < 0)
            return -EINVAL;
        struct aio *x = calloc(1, sizeof(*x));
        if (!x || !(x->buf = vd_alloc_aligned(a.len ? a.len : 1))) {
            free(x);
            vd_cli_err("out of memory");
            return -ENOMEM;
        }
        if (!rd)
            memset(x->buf, a.pattern >= 0 ? a.pattern : 0xcd, a.len);
        x->ctx = ctx;
        x->pattern = a.pattern;
        x->quiet = a.quiet;
        x->t0 = t0;
        x->iov = (struct iovec){ x->buf, a.len };
        x->req = (struct vd_req){ .op = rd ? VD_OP_READ : VD_OP_WRITE, .flags = a.fua ? VD_REQ_FUA : 0,
                                  .off = a.off, .len = a.len, .iov = &x->iov, .iovcnt = 1,
                                  .done = aio_done, .opaque = x };
        ctx->inflight++;
        vd_disk_submit(ctx->d, &x->req);
        return 0;
    }
    if (!strcmp(cmd, "aio_flush")) {
        if (drain(ctx) < 0)
            return -EIO;
        r = vd_disk_flush(ctx->d);
        if (r < 0)
            vd_cli_err("%s: flush failed: %s", ctx->file, vd_cli_strip(vd_errmsg(r), ctx->file));
        return r;
    }
    if (!strcmp(cmd, "discard")) {
        if (parse_args(cmd, argc, argv, "q", &a, 2) < 0)
            return -EINVAL;
        r = vd_disk_discard(ctx->d, a.off, a.len);
        if (r < 0)
            vd_cli_err("%s: discard failed: %s", ctx->file, vd_cli_strip(vd_errmsg(r), ctx->file));
        else if (!a.quiet)
            report("discard", a.len, a.off, now_since(&t0));
        return r;
    }
    if (!strcmp(cmd, "flush")) {
        r = vd_disk_flush(ctx->d);
        if (r < 0)
            vd_cli_err("%s: flush failed: %s", ctx->file, vd_cli_strip(vd_errmsg(r), ctx->file));
        return r;
    }
    if (!strcmp(cmd, "truncate")) {
        if (parse_args(cmd, argc, argv, "", &a, 1) < 0)
            return -EINVAL;
        r = vd_disk_resize(ctx->d, a.off, VD_PREALLOC_OFF);
        if (r < 0)
            vd_cli_err("%s: truncate failed: %s", ctx->file, vd_cli_strip(vd_errmsg(r), ctx->file));
        return r;
    }
    if (!strcmp(cmd, "sleep")) {
        if (parse_args(cmd, argc, argv, "", &a, 1) < 0)
            return -EINVAL;
        if (a.off > 3600000) {
            vd_cli_err("sleep: at most 3600000 ms");
            return -EINVAL;
        }
        struct timespec ts = { (time_t)(a.off / 1000), (long)(a.off % 1000) * 1000000 };
        nanosleep(&ts, NULL);
        return 0;
    }
    if (!strcmp(cmd, "length")) {
        char sz[32];
        vd_format_size(vd_disk_size(ctx->d), sz, sizeof(sz));
        printf("%s\n", sz);
        return 0;
    }
    if (!strcmp(cmd, "engine")) {
        printf("%s\n", vd_loop_engine_name(ctx->loop));
        return 0;
    }
    if (!strcmp(cmd, "help")) {
        printf("read [-P pat] [-q] off len       read (and check every byte is pat)\n"
               "write [-P pat] [-f] [-q] off len  write pat (default 0xcd); -f: FUA\n"
               "write -z [-u] [-q] off len        write zeroes (-u: may deallocate)\n"
               "aio_read / aio_write ...          the same, asynchronous\n"
               "aio_flush                         wait for asynchronous requests, then flush\n"
               "discard [-q] off len              discard\n"
               "flush                             flush\n"
               "truncate size                     resize the image\n"
               "length                            print the virtual size\n"
               "sleep ms                          wait (holding the image open)\n"
               "engine                            print the I/O engine in use\n");
        return 0;
    }
    vd_cli_err("command not found: %s (try 'help')", cmd);
    return -EINVAL;
}

static int run(int argc, char **argv)
{
    static const struct option lopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "cmd", required_argument, NULL, 'c' },
        { "read-only", no_argument, NULL, 'r' },
        { "cache", required_argument, NULL, 't' },
        { "aio", required_argument, NULL, 'i' },
        { "discard", required_argument, NULL, 'd' },
        { "nocache", no_argument, NULL, 'n' },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 },
    };
    struct vd_cli_open oo = { 0 };
    char **cmds = calloc((size_t)argc, sizeof(*cmds));
    int ncmds = 0, c, rc = 1;

    if (!cmds)
        return 1;
    while ((c = getopt_long(argc, argv, ":f:c:rt:i:d:nU", lopts, NULL)) != -1) {
        switch (c) {
        case 'f': oo.format = optarg; break;
        case 'c': cmds[ncmds++] = optarg; break;
        case 'r': oo.readonly = true; break;
        case 'n': oo.cache = VD_CACHE_NONE; break;
        case 'U': oo.force_share = true; break;
        case 't':
            if (vd_cli_cache(optarg, &oo.cache) < 0)
                goto out;
            break;
        case 'i':
            if (vd_cli_aio(optarg, &oo.aio) < 0)
                goto out;
            break;
        case 'd':
            if (!strcmp(optarg, "unmap") || !strcmp(optarg, "on")) {
                oo.discard_ignore = false;
            } else if (!strcmp(optarg, "ignore") || !strcmp(optarg, "off")) {
                oo.discard_ignore = true;
            } else {
                vd_cli_err("Invalid discard option: %s (unmap or ignore)", optarg);
                goto out;
            }
            break;
        default:
            rc = vd_cli_bad_option(argv[0], c, argv);
            goto out;
        }
    }
    if (optind != argc - 1) {
        rc = vd_cli_usage(argv[0], "Expecting one image file name");
        goto out;
    }
    struct io_ctx ctx = { .file = argv[optind] };
    int r = vd_loop_new(oo.aio, &ctx.loop);
    if (r < 0) {
        vd_cli_err("Could not start the I/O engine: %s", vd_errmsg(r));
        goto out;
    }
    if (vd_cli_open(ctx.file, &oo, &ctx.d) < 0) {
        vd_loop_free(ctx.loop);
        goto out;
    }
    rc = 0;
    if (ncmds) {
        for (int i = 0; i < ncmds; i++) {
            char *line = strdup(cmds[i]);
            if (!line || do_cmd(&ctx, line) < 0)
                rc = 1;
            free(line);
        }
    } else {
        char *line = NULL;
        size_t cap = 0;
        while (getline(&line, &cap, stdin) > 0)
            if (do_cmd(&ctx, line) < 0)
                rc = 1;
        free(line);
    }
    if (drain(&ctx) < 0)
        rc = 1;
    vd_err_clear();
    r = vd_disk_close(ctx.d);
    if (r < 0) {
        vd_cli_err_file(ctx.file, r);
        rc = 1;
    }
    vd_loop_free(ctx.loop);
out:
    free(cmds);
    return rc;
}

static const struct vd_cli_cmd cmd_io = {
    "io",
    "[-f fmt] [-r] [-t cache] [-n] [--aio=engine] [-d discard] [-U] [-c command]... filename",
    "Run I/O commands against an image (like qemu-io).\n"
    "Without -c, one command per line is read from standard input.\n"
    "  -c CMD        a command; repeat for several, run in order ('-c help' lists them)\n"
    "  -t, --cache=  writeback (default) or none (O_DIRECT); -n is -t none\n"
    "  --aio=ENGINE  io_uring, native (libaio) or threads (default: the first that works)\n"
    "  -d MODE       discard=unmap (default: discards free space) or ignore\n"
    "  -r            read-only;  -U  do not take the image lock\n"
    "Offsets and lengths take suffixes (64k, 1M) or 0x-prefixed hex.\n"
    "Exit status: 0 when every command succeeded (and every -P check matched), 1 otherwise.\n",
    run,
};
VD_CLI_COMMAND(cmd_io)

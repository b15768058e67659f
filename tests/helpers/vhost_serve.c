/* Serve one image over vhost-user-blk until SIGINT/SIGTERM, without the
 * daemon: for tests and benchmarks of the back-end library alone.
 *   vhost_serve [--num-queues N] [--threads N] [--format F] [--cache none|writeback]
 *               [--aio io_uring|native|threads] [--readonly] [--serial S]
 *               [--pidfile P] IMAGE SOCKET
 * SIGUSR1 grows the image by 64 MiB and signals a config change. On exit
 * prints the request counters. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "vdisk/block.h"
#include "vdisk/engine.h"
#include "vdisk/error.h"
#include "vmm-glue/vhost_blk.h"

static volatile sig_atomic_t stop, resized;
static void on_sig(int s) { if (s == SIGUSR1) resized = 1; else stop = 1; }

int main(int argc, char **argv)
{
    struct vd_open_opts oo = { 0 };
    struct vd_vhost_blk_opts bo = { 0 };
    const char *pidfile = NULL;
    static const struct option lo[] = {
        { "num-queues", 1, 0, 'q' }, { "threads", 1, 0, 't' }, { "format", 1, 0, 'f' },
        { "cache", 1, 0, 'c' }, { "aio", 1, 0, 'a' }, { "readonly", 0, 0, 'r' },
        { "serial", 1, 0, 's' }, { "pidfile", 1, 0, 'p' }, { 0 } };
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'q': bo.num_queues = atoi(optarg); break;
        case 't': bo.nthreads = atoi(optarg); break;
        case 'f': oo.format = optarg; break;
        case 'c': if (vd_cache_parse(optarg, &oo.cache) < 0) { fprintf(stderr, "bad cache\n"); return 1; } break;
        case 'a': if (vd_aio_parse(optarg, &oo.aio) < 0) { fprintf(stderr, "bad aio\n"); return 1; }
                  bo.aio = oo.aio; break;
        case 'r': oo.readonly = bo.readonly = true; break;
        case 's': bo.serial = optarg; break;
        case 'p': pidfile = optarg; break;
        default: return 1;
        }
    }
    if (argc - optind != 2) {
        fprintf(stderr, "usage: vhost_serve [options] IMAGE SOCKET\n");
        return 1;
    }
    struct vd_disk *d;
    int rc = vd_disk_open(argv[optind], &oo, &d);
    if (rc < 0) { fprintf(stderr, "vhost_serve: %s\n", vd_errmsg(rc)); return 1; }
    struct vd_vhost_blk *b;
    rc = vd_vhost_blk_new(d, argv[optind + 1], &bo, &b);
    if (rc < 0) {
        fprintf(stderr, "vhost_serve: %s\n", vd_errmsg(rc));
        vd_disk_close(d);
        return 1;
    }
    struct sigaction sa = { .sa_handler = on_sig };
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    if (pidfile) {
        FILE *p = fopen(pidfile, "w");
        if (p) { fprintf(p, "%d\n", getpid()); fclose(p); }
    }
    while (!stop) {
        pause();
        if (resized) {
            resized = 0;
            rc = vd_disk_resize(d, vd_disk_size(d) + (64u << 20), VD_PREALLOC_OFF);
            if (rc < 0) fprintf(stderr, "vhost_serve: resize: %s\n", vd_errmsg(rc));
            else vd_vhost_blk_resized(b);
        }
    }
    struct vd_vhost_blk_stats st;
    vd_vhost_blk_get_stats(b, &st);
    vd_vhost_blk_free(b);
    fprintf(stderr, "vhost_serve: requests %llu reads %llu writes %llu flushes %llu discards %llu "
            "write-zeroes %llu errors %llu connections %llu\n",
            (unsigned long long)st.requests, (unsigned long long)st.reads,
            (unsigned long long)st.writes, (unsigned long long)st.flushes,
            (unsigned long long)st.discards, (unsigned long long)st.write_zeroes,
            (unsigned long long)st.errors, (unsigned long long)st.connections);
    fprintf(stderr, "vhost_serve: per-queue ");
    for (unsigned i = 0; i < st.num_queues; i++)
        fprintf(stderr, "%s%llu", i ? "," : "", (unsigned long long)st.queue_requests[i]);
    fprintf(stderr, "\n");
    rc = vd_disk_close(d);
    return rc < 0 ? 1 : 0;
}

/* The NBD client backend against a real server (nbdkit's memory plugin on
 * a Unix socket): blocking and asynchronous I/O, reads past the end,
 * block status, zeroing, several loops sharing one connection, and a
 * raw disk opened over NBD. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include "vdisk/block.h"
#include "vdisk/engine.h"
#include "vdisk/error.h"
#include "vdisk/file.h"
#include "vdisk/loop.h"
#include "nbdkit.h"

#define SIZE (64u << 20)

static char dir[64];
static char uri[256], ro_uri[256];
static pid_t servers[2];

static int setup(void **s)
{
    snprintf(dir, sizeof(dir), "/tmp/vdisk-nbd-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    char sock[128];
    snprintf(sock, sizeof(sock), "%s/rw.sock", dir);
    servers[0] = start_nbdkit(sock, "memory", "64M", (char *)NULL);
    snprintf(uri, sizeof(uri), "nbd+unix:///?socket=%s", sock);
    snprintf(sock, sizeof(sock), "%s/ro.sock", dir);
    servers[1] = start_nbdkit(sock, "-r", "memory", "64M", (char *)NULL);
    snprintf(ro_uri, sizeof(ro_uri), "nbd+unix:///?socket=%s", sock);
    return servers[0] > 0 && servers[1] > 0 ? 0 : -1;
}

static int teardown(void **s)
{
    for (int i = 0; i < 2; i++)
        if (servers[i] > 0) {
            kill(servers[i], SIGTERM);
            waitpid(servers[i], NULL, 0);
        }
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static void fill(uint8_t *p, size_t len, uint64_t seed)
{
    for (size_t i = 0; i < len; i++)
        p[i] = (uint8_t)((i + seed) * 2654435761u >> 13);
}

static void sync_ops(void **s)
{
    struct vd_file *f;
    assert_int_equal(vd_file_open(uri, 0, VD_CACHE_WRITEBACK, &f), 0);
    uint64_t size;
    assert_int_equal(vd_file_size(f, &size), 0);
    assert_int_equal(size, SIZE);
    assert_int_equal(f->fd, -1);

    uint8_t *w = malloc(1 << 20), *r = malloc(1 << 20);
    fill(w, 1 << 20, 1);
    assert_int_equal(vd_file_pwrite(f, w, 1 << 20, 3 << 20), 0);
    assert_int_equal(vd_file_sync(f), 0);
    assert_int_equal(vd_file_pread(f, r, 1 << 20, 3 << 20), 0);
    assert_memory_equal(w, r, 1 << 20);

    /* block status: zeros, then the written MiB as data */
    bool data;
    uint64_t end;
    assert_int_equal(vd_file_extent(f, 0, &data, &end), 0);
    assert_false(data);
    assert_int_equal(end, 3 << 20);
    assert_int_equal(vd_file_extent(f, 3 << 20, &data, &end), 0);
    assert_true(data);
    assert_int_equal(end, 4 << 20);

    /* zero keeps the size of what reads as zeros */
    assert_int_equal(vd_file_zero(f, 3 << 20, 4096), 0);
    assert_int_equal(vd_file_punch(f, (3 << 20) + 4096, 4096), 0);
    assert_int_equal(vd_file_pread(f, r, 8192, 3 << 20), 0);
    for (int i = 0; i < 8192; i++)
        assert_int_equal(r[i], 0);

    /* past the end: reads zero-fill, writes fail */
    memset(r, 0xff, 8192);
    assert_int_equal(vd_file_pread(f, r, 8192, SIZE - 4096), 0);
    for (int i = 4096; i < 8192; i++)
        assert_int_equal(r[i], 0);
    assert_int_equal(vd_file_pwrite(f, w, 8192, SIZE - 4096), -ENOSPC);
    assert_non_null(strstr(vd_errmsg(-ENOSPC), "nbd+unix://"));
    assert_int_equal(vd_file_truncate(f, SIZE), 0);
    assert_int_equal(vd_file_truncate(f, SIZE * 2), -ENOTSUP);
    free(w);
    free(r);
    vd_file_close(f);
}

static void open_errors(void **s)
{
    struct vd_file *f;
    char bad[300];
    snprintf(bad, sizeof(bad), "nbd+unix:///?socket=%s/none.sock", dir);
    vd_err_clear();
    int r = vd_file_open(bad, 0, VD_CACHE_WRITEBACK, &f);
    assert_true(r < 0);
    assert_non_null(strstr(vd_errmsg(r), "none.sock"));
    /* a read-only export: read-only opens work, others are refused */
    assert_int_equal(vd_file_open(ro_uri, 0, VD_CACHE_WRITEBACK, &f), -EROFS);
    assert_int_equal(vd_file_open(ro_uri, VD_FILE_RDONLY, VD_CACHE_WRITEBACK, &f), 0);
    vd_file_close(f);
}

/* ---- asynchronous I/O ---- */

#define NREQ 128
#define RLEN 65536

struct areq {
    struct vd_io io;
    struct iovec iov[3];
    int res;
    int *pending;
};

static void areq_done(struct vd_io *io, int res)
{
    struct areq *a = (struct areq *)io;
    a->res = res;
    (*a->pending)--;
}

static void run_until(struct vd_loop *l, int *pending)
{
    for (int i = 0; *pending > 0 && i < 100000; i++)
        assert_true(vd_loop_run_once(l, 1000) >= 0);
    assert_int_equal(*pending, 0);
}

struct worker_arg {
    struct vd_file *f;
    uint64_t base;
    int ok;
};

/* Writes (three iovecs each), a flush, reads back: all asynchronous. */
static void *async_worker(void *opaque)
{
    struct worker_arg *wa = opaque;
    struct vd_loop *l = vd_loop_current();
    struct areq *q = calloc(NREQ, sizeof(*q));
    uint8_t *w = malloc((size_t)NREQ * RLEN), *r = malloc((size_t)NREQ * RLEN);
    fill(w, (size_t)NREQ * RLEN, wa->base);
    memset(r, 0xaa, (size_t)NREQ * RLEN);
    int pending = 0;
    for (int pass = 0; pass < 2; pass++) {
        uint8_t *buf = pass ? r : w;
        for (int i = 0; i < NREQ; i++) {
            uint8_t *p = buf + (size_t)i * RLEN;
            q[i].iov[0] = (struct iovec){ p, 1000 };
            q[i].iov[1] = (struct iovec){ p + 1000, 24 };
            q[i].iov[2] = (struct iovec){ p + 1024, RLEN - 1024 };
            q[i].io = (struct vd_io){ .op = pass ? VD_IO_READ : VD_IO_WRITE, .file = wa->f,
                                      .off = wa->base + (uint64_t)i * RLEN, .iov = q[i].iov,
                                      .iovcnt = 3, .done = areq_done };
            q[i].pending = &pending;
            q[i].res = 1;
            pending++;
            vd_loop_submit_io(l, &q[i].io);
        }
        run_until(l, &pending);
        for (int i = 0; i < NREQ; i++)
            if (q[i].res != 0)
                goto out;
        if (!pass) {
            q[0].io = (struct vd_io){ .op = VD_IO_SYNC, .file = wa->f, .done = areq_done };
            q[0].res = 1;
            pending = 1;
            vd_loop_submit_io(l, &q[0].io);
            run_until(l, &pending);
            if (q[0].res != 0)
                goto out;
        }
    }
    wa->ok = memcmp(w, r, (size_t)NREQ * RLEN) == 0;
out:
    free(q);
    free(w);
    free(r);
    return NULL;
}

static void async_io(void **s)
{
    struct vd_file *f;
    assert_int_equal(vd_file_open(uri, 0, VD_CACHE_WRITEBACK, &f), 0);
    struct worker_arg a = { .f = f, .base = 0 };
    async_worker(&a);
    assert_true(a.ok);

    /* a read straddling the end of the export */
    struct vd_loop *l = vd_loop_current();
    uint8_t *buf = malloc(8192);
    memset(buf, 0xff, 8192);
    struct areq q = { 0 };
    int pending = 1;
    q.iov[0] = (struct iovec){ buf, 8192 };
    q.io = (struct vd_io){ .op = VD_IO_READ, .file = f, .off = SIZE - 4096, .iov = q.iov,
                           .iovcnt = 1, .done = areq_done };
    q.pending = &pending;
    vd_loop_submit_io(l, &q.io);
    run_until(l, &pending);
    assert_int_equal(q.res, 0);
    for (int i = 4096; i < 8192; i++)
        assert_int_equal(buf[i], 0);
    /* a write past the end fails cleanly */
    q.io = (struct vd_io){ .op = VD_IO_WRITE, .file = f, .off = SIZE + 4096, .iov = q.iov,
                           .iovcnt = 1, .done = areq_done };
    pending = 1;
    vd_loop_submit_io(l, &q.io);
    run_until(l, &pending);
    assert_true(q.res < 0);
    free(buf);
    vd_file_close(f);
}

/* Several threads, each with its own loop, on one connection. */
static void async_threads(void **s)
{
    struct vd_file *f;
    assert_int_equal(vd_file_open(uri, 0, VD_CACHE_WRITEBACK, &f), 0);
    pthread_t t[3];
    struct worker_arg a[3];
    for (int i = 0; i < 3; i++) {
        a[i] = (struct worker_arg){ .f = f, .base = (uint64_t)(i + 1) * NREQ * RLEN };
        assert_int_equal(pthread_create(&t[i], NULL, async_worker, &a[i]), 0);
    }
    /* meanwhile, blocking calls on the same connection from this thread */
    uint8_t buf[4096];
    for (int i = 0; i < 200; i++) {
        bool data;
        uint64_t end;
        assert_int_equal(vd_file_pread(f, buf, sizeof(buf), (uint64_t)i * 4096), 0);
        assert_int_equal(vd_file_extent(f, 40 << 20, &data, &end), 0);
        assert_false(data);
    }
    for (int i = 0; i < 3; i++) {
        pthread_join(t[i], NULL);
        assert_true(a[i].ok);
    }
    vd_file_close(f);
}

/* The server goes away: requests fail, nothing hangs or crashes. */
static void server_gone(void **s)
{
    char sock[128], u[256];
    snprintf(sock, sizeof(sock), "%s/gone.sock", dir);
    pid_t pid = start_nbdkit(sock, "memory", "64M", (char *)NULL);
    assert_true(pid > 0);
    snprintf(u, sizeof(u), "nbd+unix:///?socket=%s", sock);
    struct vd_file *f;
    assert_int_equal(vd_file_open(u, 0, VD_CACHE_WRITEBACK, &f), 0);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    uint8_t buf[4096];
    assert_true(vd_file_pread(f, buf, sizeof(buf), 0) < 0);
    struct vd_loop *l = vd_loop_current();
    struct areq q = { 0 };
    int pending = 1;
    q.iov[0] = (struct iovec){ buf, sizeof(buf) };
    q.io = (struct vd_io){ .op = VD_IO_READ, .file = f, .iov = q.iov, .iovcnt = 1,
                           .done = areq_done };
    q.pending = &pending;
    vd_loop_submit_io(l, &q.io);
    run_until(l, &pending);
    assert_true(q.res < 0);
    vd_file_close(f);
}

/* A raw disk over NBD through the whole request path. */
static void disk_raw(void **s)
{
    struct vd_disk *d;
    struct vd_open_opts o = { .format = "raw" };
    assert_int_equal(vd_disk_open(uri, &o, &d), 0);
    assert_int_equal(vd_disk_size(d), SIZE);
    uint8_t *w = malloc(300000), *r = malloc(300000);
    fill(w, 300000, 77);
    assert_int_equal(vd_disk_pwrite(d, w, 300000, 12345, VD_REQ_FUA), 0);
    assert_int_equal(vd_disk_pread(d, r, 300000, 12345), 0);
    assert_memory_equal(w, r, 300000);
    assert_int_equal(vd_disk_flush(d), 0);
    assert_int_equal(vd_disk_write_zeroes(d, 12345, 4096, 0), 0);
    assert_int_equal(vd_disk_pread(d, r, 4096, 12345), 0);
    for (int i = 0; i < 4096; i++)
        assert_int_equal(r[i], 0);
    struct vd_extent e;
    assert_int_equal(vd_disk_block_status(d, 40 << 20, 1 << 20, &e), 0);
    assert_true(e.flags & VD_EXT_ZERO);
    assert_int_equal(vd_disk_close(d), 0);
    free(w);
    free(r);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(sync_ops),
        cmocka_unit_test(open_errors),
        cmocka_unit_test(async_io),
        cmocka_unit_test(async_threads),
        cmocka_unit_test(disk_raw),
        cmocka_unit_test(server_gone),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

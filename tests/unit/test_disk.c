/* The block core: requests on raw images through every engine and cache
 * mode, block status, and the allocating-write path (alloc, copy-on-write
 * from a backing layer, commit, serialisation of writes to one unit) with a
 * small allocating format defined here. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include "vdisk/block.h"
#include "vdisk/error.h"

static char dir[] = "/var/tmp/vdisk-test-disk.XXXXXX";

static void path(char *buf, const char *name) { snprintf(buf, 256, "%s/%s", dir, name); }

static void fill(void *buf, size_t len, unsigned seed)
{
    unsigned char *p = buf;
    for (size_t i = 0; i < len; i++)
        p[i] = (unsigned char)((i * 131 + seed * 7 + (i >> 9)) & 0xff);
}

static struct vd_disk *mkraw(const char *name, uint64_t size, const struct vd_open_opts *oo)
{
    char p[256];
    path(p, name);
    struct vd_create_opts co = { .size = size };
    assert_int_equal(vd_image_create(p, "raw", &co), 0);
    struct vd_open_opts o = oo ? *oo : (struct vd_open_opts){0};
    o.format = "raw";
    struct vd_disk *d = NULL;
    int r = vd_disk_open(p, &o, &d);
    if (r < 0)
        fail_msg("open %s: %s", p, vd_errmsg(r));
    return d;
}

/* ---- raw through every engine and cache mode ---- */

static void raw_rw(enum vd_aio aio, enum vd_cache cache)
{
    struct vd_loop *loop;
    /* a fresh loop for this thread with the engine under test */
    assert_int_equal(vd_loop_new(aio, &loop), 0);
    struct vd_open_opts o = { .cache = cache, .aio = aio };
    struct vd_disk *d = mkraw("rw.raw", 4 << 20, &o);
    size_t n = 256 * 1024;
    char *w = vd_alloc_aligned(n), *rd = vd_alloc_aligned(n);
    fill(w, n, aio * 3 + cache);
    assert_int_equal(vd_disk_pwrite(d, w, n, 65536, 0), 0);
    assert_int_equal(vd_disk_pread(d, rd, n, 65536), 0);
    assert_memory_equal(w, rd, n);
    /* unaligned, from unaligned buffers (direct files bounce) */
    assert_int_equal(vd_disk_pwrite(d, w + 1, 1000, 3 * 1048576 + 7, VD_REQ_FUA), 0);
    assert_int_equal(vd_disk_pread(d, rd + 3, 1000, 3 * 1048576 + 7), 0);
    assert_memory_equal(w + 1, rd + 3, 1000);
    assert_int_equal(vd_disk_flush(d), 0);
    /* write-zeroes and discard read back as zeros */
    assert_int_equal(vd_disk_write_zeroes(d, 65536, 8192, 0), 0);
    assert_int_equal(vd_disk_discard(d, 65536 + 65536, 65536), 0);
    assert_int_equal(vd_disk_pread(d, rd, n, 65536), 0);
    for (size_t i = 0; i < 8192; i++)
        assert_int_equal(rd[i], 0);
    assert_memory_equal(rd + 8192, w + 8192, 65536 - 8192);
    for (size_t i = 65536; i < 131072; i++)
        assert_int_equal(rd[i], 0);
    /* past the end is refused */
    assert_int_equal(vd_disk_pread(d, rd, 4096, (4 << 20) - 2048), -EINVAL);
    free(w);
    free(rd);
    assert_int_equal(vd_disk_close(d), 0);
    vd_loop_free(loop);
}

static void raw_uring_writeback(void **s) { raw_rw(VD_AIO_IO_URING, VD_CACHE_WRITEBACK); }
static void raw_uring_direct(void **s) { raw_rw(VD_AIO_IO_URING, VD_CACHE_NONE); }
static void raw_aio_writeback(void **s) { raw_rw(VD_AIO_NATIVE, VD_CACHE_WRITEBACK); }
static void raw_aio_direct(void **s) { raw_rw(VD_AIO_NATIVE, VD_CACHE_NONE); }
static void raw_threads_writeback(void **s) { raw_rw(VD_AIO_THREADS, VD_CACHE_WRITEBACK); }
static void raw_threads_direct(void **s) { raw_rw(VD_AIO_THREADS, VD_CACHE_NONE); }

static void raw_block_status(void **s)
{
    struct vd_disk *d = mkraw("bs.raw", 8 << 20, NULL);
    char buf[65536];
    fill(buf, sizeof(buf), 1);
    assert_int_equal(vd_disk_pwrite(d, buf, sizeof(buf), 1 << 20, 0), 0);
    struct vd_extent e;
    assert_int_equal(vd_disk_block_status(d, 0, 8 << 20, &e), 0);
    assert_int_equal(e.len, 1 << 20);
    assert_true(e.flags & VD_EXT_ZERO);
    assert_false(e.flags & VD_EXT_DATA);
    assert_int_equal(vd_disk_block_status(d, 1 << 20, 8 << 20, &e), 0);
    assert_true(e.flags & VD_EXT_DATA);
    assert_int_equal(e.host_off, 1 << 20);
    assert_int_equal(e.len, 65536);
    assert_int_equal(vd_disk_block_status(d, 8 << 20, 1, &e), -EINVAL);
    vd_disk_close(d);
}

static void raw_read_only_and_lock(void **s)
{
    struct vd_disk *d = mkraw("ro.raw", 1 << 20, NULL);
    char p[256];
    path(p, "ro.raw");
    struct vd_open_opts o = { .format = "raw" };
    struct vd_disk *d2 = NULL;
    assert_int_equal(vd_disk_open(p, &o, &d2), -EBUSY);   /* second writer */
    assert_non_null(strstr(vd_errmsg(-EBUSY), "in use"));
    vd_disk_close(d);
    o.readonly = true;
    assert_int_equal(vd_disk_open(p, &o, &d2), 0);
    char b[512] = {0};
    assert_int_equal(vd_disk_pwrite(d2, b, 512, 0, 0), -EROFS);
    vd_disk_close(d2);
}

static void probe_refuses_unknown(void **s)
{
    struct vd_disk *d = mkraw("plain.raw", 1 << 20, NULL);
    vd_disk_close(d);
    char p[256];
    path(p, "plain.raw");
    int r = vd_disk_open(p, NULL, &d);
    assert_int_equal(r, -EINVAL);
    assert_non_null(strstr(vd_errmsg(r), "-f raw"));
    struct vd_open_opts o = { .format = "nonsense" };
    assert_int_equal(vd_disk_open(p, &o, &d), -EINVAL);
    path(p, "missing.raw");
    o.format = "raw";
    r = vd_disk_open(p, &o, &d);
    assert_int_equal(r, -ENOENT);
    assert_non_null(strstr(vd_errmsg(r), "missing.raw"));
}

/* ---- an allocating format for the COW path ----
 * Header (first 4 KiB): "TCOW", size (u64), backing name (NUL-terminated).
 * Clusters of 4 KiB appended after it; the table lives in memory only. */

#define TC 4096
struct tcow { uint64_t *table; uint64_t nclusters, next; int commits; };

static int tcow_probe(const uint8_t *b, size_t len, struct vd_file *f)
{
    return len >= 4 && !memcmp(b, "TCOW", 4) ? 100 : 0;
}

static int tcow_open(struct vd_layer *l)
{
    char hdr[TC];
    int r = vd_file_pread(l->file, hdr, TC, 0);
    if (r < 0)
        return r;
    struct tcow *t = calloc(1, sizeof(*t));
    memcpy(&l->size, hdr + 4, 8);
    t->nclusters = (l->size + TC - 1) / TC;
    t->table = calloc(t->nclusters, 8);
    t->next = TC;
    if (hdr[12]) {
        l->backing_name = strdup(hdr + 12);
        l->backing_fmt = strdup("raw");
    }
    l->alloc_unit = TC;
    l->priv = t;
    return 0;
}

static void tcow_close(struct vd_layer *l)
{
    struct tcow *t = l->priv;
    free(t->table);
    free(t);
}

static int tcow_map(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags, struct vd_map *m)
{
    struct tcow *t = l->priv;
    uint64_t c = off / TC, in = off % TC;
    m->len = TC - in < len ? TC - in : len;
    if (t->table[c]) {
        m->kind = VD_MAP_DATA;
        m->file = l->file;
        m->host_off = t->table[c] + in;
    } else {
        m->kind = VD_MAP_UNALLOC;
    }
    return 0;
}

static int tcow_alloc(struct vd_layer *l, uint64_t off, uint64_t len, struct vd_alloc *a)
{
    struct tcow *t = l->priv;
    uint64_t in = off % TC;
    a->off = off;
    a->len = TC - in < len ? TC - in : len;
    a->fill_off = off - in;
    a->fill_len = TC;
    a->file = l->file;
    a->host_off = t->next;
    a->fresh = true;
    a->priv[0] = off / TC;
    t->next += TC;
    return 0;
}

static int tcow_commit(struct vd_layer *l, struct vd_alloc *a, int err)
{
    struct tcow *t = l->priv;
    if (err == 0) {
        assert_int_equal(t->table[a->priv[0]], 0);   /* never allocated twice */
        t->table[a->priv[0]] = a->host_off;
        t->commits++;
    }
    return 0;
}

static const struct vd_format tcow = {
    .name = "tcow", .probe = tcow_probe, .open = tcow_open, .close = tcow_close,
    .map = tcow_map, .alloc = tcow_alloc, .commit = tcow_commit,
};

static struct vd_disk *mktcow(const char *name, uint64_t size, const char *backing)
{
    char p[256], hdr[TC] = "TCOW";
    path(p, name);
    memcpy(hdr + 4, &size, 8);
    if (backing)
        snprintf(hdr + 12, TC - 12, "%s", backing);
    int fd = open(p, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, hdr, TC), TC);
    close(fd);
    struct vd_disk *d = NULL;
    int r = vd_disk_open(p, NULL, &d);
    if (r < 0)
        fail_msg("open %s: %s", p, vd_errmsg(r));
    return d;
}

static void cow_partial_writes(void **s)
{
    size_t size = 1 << 20;
    struct vd_disk *base = mkraw("base.raw", size, NULL);
    char *pat = malloc(size), *rd = malloc(size);
    fill(pat, size, 9);
    assert_int_equal(vd_disk_pwrite(base, pat, size, 0, 0), 0);
    vd_disk_close(base);

    struct vd_disk *d = mktcow("top.tcow", size, "base.raw");
    assert_int_equal(vd_disk_depth(d), 2);
    char w[100];
    memset(w, 0xEE, sizeof(w));
    assert_int_equal(vd_disk_pwrite(d, w, sizeof(w), 5000, 0), 0);
    memcpy(pat + 5000, w, sizeof(w));
    assert_int_equal(vd_disk_pread(d, rd, size, 0), 0);
    assert_memory_equal(rd, pat, size);

    struct vd_extent e;
    assert_int_equal(vd_disk_block_status(d, 4096, size, &e), 0);
    assert_int_equal(e.depth, 0);
    assert_int_equal(e.len, 4096);
    assert_true(e.flags & VD_EXT_DATA);
    assert_int_equal(vd_disk_block_status(d, 8192, size, &e), 0);
    assert_int_equal(e.depth, 1);
    assert_true(e.flags & VD_EXT_ALLOCATED);
    vd_disk_close(d);
    free(pat);
    free(rd);
}

struct pending { int left; int err; };
static void count_done(struct vd_req *r, int res)
{
    struct pending *p = r->opaque;
    p->left--;
    if (res < 0)
        p->err = res;
}

/* Many writes to one unallocated cluster at once: one allocation, no lost write. */
static void concurrent_writes_one_cluster(void **s)
{
    struct vd_disk *d = mktcow("conc.tcow", 1 << 20, NULL);
    enum { N = 64 };
    static struct vd_req reqs[N];
    static struct iovec iov[N];
    static char bufs[N][64];
    struct pending p = { N, 0 };
    for (int i = 0; i < N; i++) {
        memset(bufs[i], i + 1, 64);
        iov[i] = (struct iovec){ bufs[i], 64 };
        reqs[i] = (struct vd_req){ .op = VD_OP_WRITE, .off = 8192 + (uint64_t)i * 64, .len = 64,
                                   .iov = &iov[i], .iovcnt = 1, .done = count_done, .opaque = &p };
        vd_disk_submit(d, &reqs[i]);
    }
    while (p.left)
        vd_loop_run_once(vd_loop_current(), -1);
    assert_int_equal(p.err, 0);
    struct tcow *t = vd_disk_top(d)->priv;
    assert_int_equal(t->commits, 1);
    char rd[TC];
    assert_int_equal(vd_disk_pread(d, rd, TC, 8192), 0);
    for (int i = 0; i < N; i++)
        for (int k = 0; k < 64; k++)
            assert_int_equal((unsigned char)rd[i * 64 + k], i + 1);
    vd_disk_close(d);
}

static void backing_loop_detected(void **s)
{
    char p[256], hdr[TC] = "TCOW";
    uint64_t size = 1 << 20;
    path(p, "loop.tcow");
    memcpy(hdr + 4, &size, 8);
    strcpy(hdr + 12, "loop.tcow");
    int fd = open(p, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    assert_int_equal(write(fd, hdr, TC), TC);
    close(fd);
    struct vd_disk *d;
    struct vd_open_opts o = {0};
    int r = vd_disk_open(p, &o, &d);
    assert_int_equal(r, -ELOOP);
    assert_non_null(strstr(vd_errmsg(r), "loop"));
}

static int setup(void **s)
{
    if (!mkdtemp(dir))
        return -1;
    return vd_format_register(&tcow);
}

static int teardown(void **s)
{
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(raw_uring_writeback),
        cmocka_unit_test(raw_uring_direct),
        cmocka_unit_test(raw_aio_writeback),
        cmocka_unit_test(raw_aio_direct),
        cmocka_unit_test(raw_threads_writeback),
        cmocka_unit_test(raw_threads_direct),
        cmocka_unit_test(raw_block_status),
        cmocka_unit_test(raw_read_only_and_lock),
        cmocka_unit_test(probe_refuses_unknown),
        cmocka_unit_test(cow_partial_writes),
        cmocka_unit_test(concurrent_writes_one_cluster),
        cmocka_unit_test(backing_loop_detected),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

/* qcow2 driver: entry encodings (standard, compressed at every cluster
 * size, extended L2), refcount arithmetic at every width, the metadata
 * cache, and the driver through the disk API (allocation, refcount table
 * growth, compressed writes, check and repair). */
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
#include "formats/qcow2/qcow2.h"

static char dir[] = "/var/tmp/vdisk-test-qcow2.XXXXXX";

static void path(char *buf, const char *name) { snprintf(buf, 256, "%s/%s", dir, name); }

static void geom(struct q2 *s, uint32_t cb, uint32_t order, bool ext)
{
    memset(s, 0, sizeof(*s));
    s->fname = "test";
    s->cluster_bits = cb;
    s->refcount_order = order;
    s->ext_l2 = ext;
    vd_q2_geometry(s);
}

/* ---- encodings ---- */

static void test_compressed_descriptor(void **st)
{
    (void)st;
    for (uint32_t cb = 9; cb <= 21; cb++) {
        struct q2 s;
        geom(&s, cb, 4, false);
        assert_int_equal(s.csize_shift, 62 - (int)(cb - 8));
        uint64_t cs = 1ull << cb;
        uint64_t hosts[] = { cs, 3 * cs + 17, 5 * cs + 511, 7 * cs + 512, (1ull << 40) + 1000 };
        uint64_t lens[] = { 1, 100, 511, 512, 513, cs - 1 };
        for (size_t h = 0; h < 5; h++) {
            for (size_t k = 0; k < 6; k++) {
                uint64_t host = hosts[h], len = lens[k];
                if (host + len > (1ull << s.csize_shift))
                    continue;
                uint64_t e = vd_q2_comp_encode(&s, host, len);
                assert_true(e & Q2_COMPRESSED);
                assert_false(e & Q2_COPIED);
                uint64_t h2, l2;
                vd_q2_comp_decode(&s, e, &h2, &l2);
                assert_int_equal(h2, host);
                /* covers the blob, ends on a sector boundary */
                assert_true(l2 >= len);
                assert_int_equal((h2 + l2) % 512, 0);
                assert_true(l2 - len < 512);
                enum q2_kind kk;
                assert_int_equal(vd_q2_classify(&s, e, 0, 0, &kk), 0);
                assert_int_equal(kk, Q2_COMPRESSED_K);
            }
        }
    }
    /* a known value: 64 KiB clusters, blob of 1000 bytes at 0x30010 */
    struct q2 s;
    geom(&s, 16, 4, false);
    uint64_t e = vd_q2_comp_encode(&s, 0x30010, 1000);
    /* sectors 0x180 .. 0x181: one additional sector, at bit 54 */
    assert_int_equal(e, Q2_COMPRESSED | (1ull << 54) | 0x30010);
}

static void test_standard_entries(void **st)
{
    (void)st;
    struct q2 s;
    enum q2_kind k;
    geom(&s, 16, 4, false);
    assert_int_equal(vd_q2_classify(&s, 0, 0, 0, &k), 0);
    assert_int_equal(k, Q2_UNALLOC);
    assert_int_equal(vd_q2_classify(&s, 0x50000 | Q2_COPIED, 0, 0, &k), 0);
    assert_int_equal(k, Q2_NORMAL);
    assert_int_equal(vd_q2_classify(&s, Q2_ZERO, 0, 0, &k), 0);
    assert_int_equal(k, Q2_ZERO_PLAIN);
    assert_int_equal(vd_q2_classify(&s, 0x50000 | Q2_COPIED | Q2_ZERO, 0, 0, &k), 0);
    assert_int_equal(k, Q2_ZERO_ALLOC);
    /* reserved bits and unaligned offsets are errors */
    assert_int_equal(vd_q2_classify(&s, 0x50000 | 0x2, 0, 0, &k), -EIO);
    assert_int_equal(vd_q2_classify(&s, 0x50000 | (1ull << 57), 0, 0, &k), -EIO);
    assert_int_equal(vd_q2_classify(&s, 0x50200, 0, 0, &k), -EIO);
    /* 512-byte clusters: 0x200 is aligned */
    geom(&s, 9, 4, false);
    assert_int_equal(vd_q2_classify(&s, 0x200 | Q2_COPIED, 0, 0, &k), 0);
    assert_int_equal(k, Q2_NORMAL);
}

static void test_extended_entries(void **st)
{
    (void)st;
    struct q2 s;
    enum q2_kind k;
    geom(&s, 16, 4, true);
    assert_int_equal(s.l2_esize, 16);
    assert_int_equal(s.l2_entries, 4096);
    assert_int_equal(s.sc_size, 2048);
    uint64_t host = 0x70000 | Q2_COPIED;
    uint64_t bm = (1ull << 0) | (1ull << 5) | (1ull << (32 + 1)) | (1ull << (32 + 31));
    assert_int_equal(vd_q2_classify(&s, host, bm, 0, &k), 0);
    assert_int_equal(k, Q2_NORMAL);
    assert_int_equal(vd_q2_classify(&s, host, bm, 5, &k), 0);
    assert_int_equal(k, Q2_NORMAL);
    assert_int_equal(vd_q2_classify(&s, host, bm, 1, &k), 0);
    assert_int_equal(k, Q2_ZERO_ALLOC);
    assert_int_equal(vd_q2_classify(&s, host, bm, 2, &k), 0);
    assert_int_equal(k, Q2_UNALLOC);
    assert_int_equal(vd_q2_classify(&s, 0, bm, 0, &k), -EIO);       /* allocated without offset */
    assert_int_equal(vd_q2_classify(&s, 0, 1ull << 63, 31, &k), 0);
    assert_int_equal(k, Q2_ZERO_PLAIN);
    assert_int_equal(vd_q2_classify(&s, host, 1 | (1ull << 32), 0, &k), -EIO); /* both bits */
    /* an extended table entry is 16 bytes: entry then bitmap, big-endian */
    uint8_t t[64] = {0};
    q2_l2_set(&s, t, 2, host, bm);
    assert_int_equal(q2_l2_entry(&s, t, 2), host);
    assert_int_equal(q2_l2_bitmap(&s, t, 2), bm);
    assert_int_equal(t[32], 0x80);
    assert_int_equal(t[47], 0x21);
}

static void test_refcounts_every_width(void **st)
{
    (void)st;
    for (uint32_t order = 0; order <= 6; order++) {
        struct q2 s;
        geom(&s, 9, order, false);
        assert_int_equal(s.rb_entries, 512 * 8 >> order);
        uint64_t max = s.rc_max;
        assert_int_equal(max, order == 6 ? UINT64_MAX : (1ull << (1u << order)) - 1);
        uint8_t blk[512];
        memset(blk, 0, sizeof(blk));
        for (uint64_t i = 0; i < s.rb_entries; i++)
            vd_q2_rc_set(blk, i, order, (i * 2654435761u) & max);
        for (uint64_t i = 0; i < s.rb_entries; i++)
            assert_int_equal(vd_q2_rc_get(blk, i, order), (i * 2654435761u) & max);
        /* setting one entry leaves its neighbours alone */
        vd_q2_rc_set(blk, 7, order, max);
        vd_q2_rc_set(blk, 7, order, 0);
        assert_int_equal(vd_q2_rc_get(blk, 6, order), (6ull * 2654435761u) & max);
        assert_int_equal(vd_q2_rc_get(blk, 8, order), (8ull * 2654435761u) & max);
        assert_int_equal(vd_q2_rc_get(blk, 7, order), 0);
    }
    /* sub-byte entries start at the least significant bit */
    uint8_t b[2] = {0};
    vd_q2_rc_set(b, 0, 0, 1);
    assert_int_equal(b[0], 0x01);
    vd_q2_rc_set(b, 1, 1, 3);
    assert_int_equal(b[0], 0x0d);
    vd_q2_rc_set(b, 1, 2, 0xa);
    assert_int_equal(b[0], 0xad);
    /* 16 bits: big-endian */
    uint8_t w[4] = {0};
    vd_q2_rc_set(w, 1, 4, 0x1234);
    assert_int_equal(w[2], 0x12);
    assert_int_equal(w[3], 0x34);
}

/* ---- the metadata cache ---- */

static int pre_writes;
static int count_pre_write(struct q2 *s) { (void)s; pre_writes++; return 0; }

static void test_cache(void **st)
{
    (void)st;
    char p[256];
    path(p, "cache.bin");
    struct vd_file *f;
    assert_int_equal(vd_file_open(p, VD_FILE_CREATE | VD_FILE_TRUNC, VD_CACHE_WRITEBACK, &f), 0);
    assert_int_equal(vd_file_truncate(f, 64 * 4096), 0);
    struct q2 s;
    geom(&s, 12, 4, false);
    s.f = f;
    struct q2_cache c;
    assert_int_equal(vd_q2_cache_init(&c, &s, "table", 4, 4096, count_pre_write), 0);
    pre_writes = 0;
    uint8_t *b;
    for (int i = 1; i <= 4; i++) {
        assert_int_equal(vd_q2_cache_get(&c, (uint64_t)i * 4096, false, &b), 0);
        memset(b, i, 4096);
        vd_q2_cache_dirty(&c, b);
    }
    assert_int_equal(pre_writes, 0);      /* nothing written yet */
    /* touch 1 so that 2 is the least recently used, then evict it */
    assert_int_equal(vd_q2_cache_get(&c, 4096, true, &b), 0);
    assert_int_equal(b[0], 1);
    assert_int_equal(vd_q2_cache_get(&c, 10 * 4096, true, &b), 0);
    assert_int_equal(pre_writes, 1);
    assert_true(c.wrote);
    uint8_t r[4096];
    assert_int_equal(vd_file_pread(f, r, 4096, 2 * 4096), 0);
    assert_int_equal(r[0], 2);
    assert_int_equal(vd_file_pread(f, r, 4096, 3 * 4096), 0);
    assert_int_equal(r[100], 0);          /* still only in the cache */
    /* 2 comes back from disk (evicting 3, the least recently used now) */
    assert_int_equal(vd_q2_cache_get(&c, 2 * 4096, true, &b), 0);
    assert_int_equal(b[4095], 2);
    assert_int_equal(pre_writes, 2);
    /* flush writes the rest; a dropped table is never written */
    assert_int_equal(vd_q2_cache_get(&c, 20 * 4096, false, &b), 0);
    b[0] = 33;
    vd_q2_cache_dirty(&c, b);
    vd_q2_cache_drop(&c, 20 * 4096);
    assert_int_equal(vd_q2_cache_flush(&c), 0);
    assert_int_equal(vd_file_pread(f, r, 4096, 20 * 4096), 0);
    assert_int_equal(r[0], 0);
    assert_int_equal(vd_file_pread(f, r, 4096, 3 * 4096), 0);
    assert_int_equal(r[0], 3);
    assert_int_equal(vd_file_pread(f, r, 4096, 4 * 4096), 0);
    assert_int_equal(r[0], 4);
    assert_true(c.hits > 0 && c.misses > 0);
    vd_q2_cache_fini(&c);
    vd_file_close(f);
}

/* ---- the driver through the disk API ---- */

static void fill(void *buf, size_t len, unsigned seed)
{
    unsigned char *q = buf;
    for (size_t i = 0; i < len; i++)
        q[i] = (unsigned char)((i * 131 + seed * 7 + (i >> 9)) & 0xff);
}

static struct vd_disk *mk(const char *name, uint64_t size, const char *opts)
{
    char p[256];
    path(p, name);
    struct vd_opts o = {0};
    if (opts)
        assert_int_equal(vd_opts_parse(&o, opts), 0);
    struct vd_create_opts co = { .size = size, .opts = &o };
    int r = vd_image_create(p, "qcow2", &co);
    if (r < 0)
        fail_msg("create %s: %s", p, vd_errmsg(r));
    vd_opts_free(&o);
    struct vd_open_opts oo = { .format = "qcow2" };
    struct vd_disk *d = NULL;
    r = vd_disk_open(p, &oo, &d);
    if (r < 0)
        fail_msg("open %s: %s", p, vd_errmsg(r));
    return d;
}

static void check_clean(struct vd_disk *d)
{
    struct vd_layer *l = vd_disk_top(d);
    struct vd_check c = {0};
    pthread_mutex_lock(&l->lock);
    assert_int_equal(l->fmt->check(l, 0, &c), 0);
    pthread_mutex_unlock(&l->lock);
    assert_int_equal(c.corruptions, 0);
    assert_int_equal(c.leaks, 0);
}

static void rw_config(const char *opts, uint64_t size)
{
    struct vd_disk *d = mk("rw.qcow2", size, opts);
    size_t n = 300000;
    char *w = malloc(n), *r = malloc(n);
    fill(w, n, 1);
    assert_int_equal(vd_disk_pwrite(d, w, n, 12345, 0), 0);
    assert_int_equal(vd_disk_pwrite(d, w, 4096, size - 4096, 0), 0);
    assert_int_equal(vd_disk_pread(d, r, n, 12345), 0);
    assert_memory_equal(w, r, n);
    memset(w, 0, 12345);
    assert_int_equal(vd_disk_pread(d, r, 12345, 0), 0);
    assert_memory_equal(w, r, 12345);
    assert_int_equal(vd_disk_flush(d), 0);
    check_clean(d);
    assert_int_equal(vd_disk_close(d), 0);
    free(w);
    free(r);
}

static void test_driver_configs(void **st)
{
    (void)st;
    rw_config(NULL, 8 << 20);
    rw_config("compat=0.10", 8 << 20);
    rw_config("cluster_size=512,refcount_bits=64", 4 << 20);   /* grows the refcount table */
    rw_config("cluster_size=512,refcount_bits=1", 4 << 20);
    rw_config("cluster_size=2M,extended_l2=on", 16 << 20);
    rw_config("extended_l2=on,lazy_refcounts=on", 8 << 20);
}

static void test_compressed_write(void **st)
{
    (void)st;
    const char *types[] = { "compression_type=zlib", "compression_type=zstd" };
    for (int t = 0; t < 2; t++) {
        struct vd_disk *d = mk("c.qcow2", 1 << 20, types[t]);
        struct vd_layer *l = vd_disk_top(d);
        char *w = malloc(65536), *r = malloc(65536), *blob = malloc(65536);
        for (int i = 0; i < 16; i++) {
            memset(w, 'a' + i, 65536);
            snprintf(w, 64, "cluster %d", i);
            if (i == 5)
                fill(w, 65536, 9);      /* does not shrink: stored plainly */
            pthread_mutex_lock(&l->lock);
            if (i % 2) {
                assert_int_equal(l->fmt->write_compressed(l, (uint64_t)i * 65536, w, 65536), 0);
            } else {
                size_t ol = 65536;
                assert_int_equal(l->fmt->compress(l, w, 65536, blob, &ol), 0);
                assert_true(ol < 65536);
                assert_int_equal(l->fmt->write_compressed_raw(l, (uint64_t)i * 65536, blob, ol), 0);
            }
            pthread_mutex_unlock(&l->lock);
        }
        for (int i = 0; i < 16; i++) {
            memset(w, 'a' + i, 65536);
            snprintf(w, 64, "cluster %d", i);
            if (i == 5)
                fill(w, 65536, 9);
            assert_int_equal(vd_disk_pread(d, r, 65536, (uint64_t)i * 65536), 0);
            assert_memory_equal(w, r, 65536);
        }
        /* overwrite part of a compressed cluster: copy-on-write from it */
        memset(w, 'z', 100);
        assert_int_equal(vd_disk_pwrite(d, w, 100, 3 * 65536 + 10, 0), 0);
        assert_int_equal(vd_disk_pread(d, r, 200, 3 * 65536), 0);
        assert_int_equal(r[0], 'c');          /* "cluster 3" */
        assert_int_equal(r[10], 'z');
        assert_int_equal(r[110], 'a' + 3);
        assert_int_equal(vd_disk_flush(d), 0);
        check_clean(d);
        vd_disk_close(d);
        free(w);
        free(r);
        free(blob);
    }
}

static void test_check_finds_and_fixes_leak(void **st)
{
    (void)st;
    struct vd_disk *d = mk("leak.qcow2", 4 << 20, NULL);
    struct vd_layer *l = vd_disk_top(d);
    struct q2 *s = l->priv;
    char buf[4096] = {1};
    assert_int_equal(vd_disk_pwrite(d, buf, sizeof(buf), 0, 0), 0);
    pthread_mutex_lock(&l->lock);
    uint64_t host, got;
    /* a cluster with a refcount that nothing uses: a leak */
    assert_int_equal(vd_q2_alloc(s, 1, true, &host, &got), 0);
    assert_int_equal(vd_q2_flush_all(s), 0);
    struct vd_check c = {0};
    assert_int_equal(l->fmt->check(l, 0, &c), 0);
    assert_int_equal(c.leaks, 1);
    assert_int_equal(c.corruptions, 0);
    memset(&c, 0, sizeof(c));
    assert_int_equal(l->fmt->check(l, VD_CHECK_FIX_LEAKS, &c), 0);
    assert_int_equal(c.leaks_fixed, 1);
    memset(&c, 0, sizeof(c));
    assert_int_equal(l->fmt->check(l, 0, &c), 0);
    assert_int_equal(c.leaks, 0);
    /* a used cluster whose refcount is too low: a corruption, fixed */
    assert_int_equal(vd_q2_rc_update(s, host / s->cs - 1, -1), 0);
    assert_int_equal(vd_q2_flush_all(s), 0);
    memset(&c, 0, sizeof(c));
    assert_int_equal(l->fmt->check(l, 0, &c), 0);
    assert_true(c.corruptions >= 1);
    memset(&c, 0, sizeof(c));
    assert_int_equal(l->fmt->check(l, VD_CHECK_FIX_LEAKS | VD_CHECK_FIX_ERRORS, &c), 0);
    assert_true(c.corruptions_fixed >= 1);
    pthread_mutex_unlock(&l->lock);
    check_clean(d);
    vd_disk_close(d);
}

static void test_resize(void **st)
{
    (void)st;
    struct vd_disk *d = mk("rs.qcow2", 1 << 20, "cluster_size=4096");
    char buf[8192];
    memset(buf, 0x5a, sizeof(buf));
    assert_int_equal(vd_disk_pwrite(d, buf, sizeof(buf), 0, 0), 0);
    /* grow far enough that the L1 table has to move */
    assert_int_equal(vd_disk_resize(d, 3ull << 30, VD_PREALLOC_OFF), 0);
    assert_int_equal(vd_disk_size(d), 3ull << 30);
    assert_int_equal(vd_disk_pwrite(d, buf, sizeof(buf), (3ull << 30) - 8192, 0), 0);
    char r[8192];
    assert_int_equal(vd_disk_pread(d, r, sizeof(r), 0), 0);
    assert_memory_equal(buf, r, sizeof(r));
    check_clean(d);
    /* shrinking over data fails, over nothing works */
    assert_int_not_equal(vd_disk_resize(d, 1 << 20, VD_PREALLOC_OFF), 0);
    assert_int_equal(vd_disk_resize(d, (3ull << 30) - 8192, VD_PREALLOC_OFF), -ENOTSUP);
    assert_int_equal(vd_disk_resize(d, 8192 + 4096, VD_PREALLOC_OFF), -ENOTSUP);
    vd_disk_close(d);
    d = mk("rs2.qcow2", 1 << 20, NULL);
    assert_int_equal(vd_disk_pwrite(d, buf, sizeof(buf), 0, 0), 0);
    assert_int_equal(vd_disk_resize(d, 65536, VD_PREALLOC_OFF), 0);
    assert_int_equal(vd_disk_resize(d, 2 << 20, VD_PREALLOC_METADATA), 0);
    check_clean(d);
    vd_disk_close(d);
}

static int setup(void **st)
{
    (void)st;
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **st)
{
    (void)st;
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_compressed_descriptor),
        cmocka_unit_test(test_standard_entries),
        cmocka_unit_test(test_extended_entries),
        cmocka_unit_test(test_refcounts_every_width),
        cmocka_unit_test(test_cache),
        cmocka_unit_test(test_driver_configs),
        cmocka_unit_test(test_compressed_write),
        cmocka_unit_test(test_check_finds_and_fixes_leak),
        cmocka_unit_test(test_resize),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

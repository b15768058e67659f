/* Cache modes: which syncs reach the kernel. fdatasync, fsync and pwritev2
 * are defined here, so the library's calls land in these counters (then
 * go to the kernel); the thread-pool engine is used so that the engine's
 * syncs are fdatasync calls too. cache=unsafe must issue none, for raw and
 * for every format's metadata ordering, except through the explicit
 * "sync now" calls; writeback and writethrough must issue theirs. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <cmocka.h>
#include "vdisk/block.h"
#include "vdisk/error.h"

static _Atomic int n_sync, n_dsync_write, n_kick;

int sync_file_range(int fd, off_t off, off_t len, unsigned int flags)
{
    if (flags & (SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WAIT_AFTER))
        n_sync++;
    else
        n_kick++;
    return (int)syscall(SYS_sync_file_range, fd, off, len, flags);
}

int fdatasync(int fd)
{
    n_sync++;
    return (int)syscall(SYS_fdatasync, fd);
}

int fsync(int fd)
{
    n_sync++;
    return (int)syscall(SYS_fsync, fd);
}

ssize_t pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags)
{
    if (flags & (RWF_DSYNC | RWF_SYNC))
        n_dsync_write++;
    return syscall(SYS_pwritev2, fd, iov, cnt, (unsigned long)off, (unsigned long)((uint64_t)off >> 32), flags);
}

static int syncs(void)
{
    return n_sync + n_dsync_write;
}

static void reset(void)
{
    n_sync = n_dsync_write = n_kick = 0;
}

static char dir[] = "/var/tmp/vdisk-test-cache.XXXXXX";

static void path(char *buf, const char *name)
{
    snprintf(buf, 256, "%s/%s", dir, name);
}

static struct vd_disk *mk(const char *fmt, const char *name, uint64_t size, enum vd_cache cache)
{
    char p[256];
    path(p, name);
    struct vd_opts opts = { 0 };
    struct vd_create_opts co = { .size = size, .opts = &opts };
    int r = vd_image_create(p, fmt, &co);
    if (r < 0)
        fail_msg("create %s: %s", p, vd_errmsg(r));
    struct vd_open_opts o = { .format = fmt, .cache = cache };
    struct vd_disk *d = NULL;
    r = vd_disk_open(p, &o, &d);
    if (r < 0)
        fail_msg("open %s: %s", p, vd_errmsg(r));
    return d;
}

/* Writes that allocate all over the image (new L2 tables, refcount blocks,
 * grain tables, BAT entries), flushes and FUA writes. */
static void workload(struct vd_disk *d)
{
    size_t n = 64 * 1024;
    char *buf = vd_alloc_aligned(n);
    memset(buf, 0x5a, n);
    uint64_t size = vd_disk_size(d);
    for (uint64_t off = 0; off + n <= size; off += size / 16) {
        assert_int_equal(vd_disk_pwrite(d, buf, n, off, 0), 0);
        assert_int_equal(vd_disk_flush(d), 0);
    }
    assert_int_equal(vd_disk_pwrite(d, buf, n, 4096, VD_REQ_FUA), 0);
    assert_int_equal(vd_disk_write_zeroes(d, size / 2, 65536, 0), 0);
    assert_int_equal(vd_disk_flush(d), 0);
    free(buf);
}

/* Read back what workload wrote, through a fresh open. */
static void verify(const char *fmt, const char *name)
{
    char p[256];
    path(p, name);
    struct vd_open_opts o = { .format = fmt, .readonly = true };
    struct vd_disk *d = NULL;
    assert_int_equal(vd_disk_open(p, &o, &d), 0);
    size_t n = 64 * 1024;
    char *buf = vd_alloc_aligned(n), *want = malloc(n);
    memset(want, 0x5a, n);
    uint64_t size = vd_disk_size(d);
    for (uint64_t off = size / 16; off + n <= size; off += size / 16) {
        if (off == size / 2)
            continue;
        assert_int_equal(vd_disk_pread(d, buf, n, off), 0);
        assert_memory_equal(buf, want, n);
    }
    assert_int_equal(vd_disk_pread(d, buf, n, size / 2), 0);
    memset(want, 0, n);
    assert_memory_equal(buf, want, n);
    vd_disk_close(d);
    free(buf);
    free(want);
}

static void unsafe_no_syncs(const char *fmt)
{
    char name[64];
    snprintf(name, sizeof(name), "unsafe.%s", fmt);
    struct vd_disk *d = mk(fmt, name, 64 << 20, VD_CACHE_UNSAFE);
    reset();
    workload(d);
    assert_int_equal(vd_disk_close(d), 0);
    if (syncs())
        fail_msg("%s, cache=unsafe: %d syncs, %d durable writes", fmt, n_sync, n_dsync_write);
    verify(fmt, name);
}

static void unsafe_raw(void **s) { unsafe_no_syncs("raw"); }
static void unsafe_qcow2(void **s) { unsafe_no_syncs("qcow2"); }
static void unsafe_vmdk(void **s) { unsafe_no_syncs("vmdk"); }
static void unsafe_vhd(void **s) { unsafe_no_syncs("vhd"); }

/* The counters see the syncs of the other modes (so a zero above means
 * something). */
static void writeback_syncs(void **s)
{
    const char *fmts[] = { "raw", "qcow2", "vmdk", "vhd" };
    for (size_t i = 0; i < 4; i++) {
        char name[64];
        snprintf(name, sizeof(name), "wb.%s", fmts[i]);
        struct vd_disk *d = mk(fmts[i], name, 64 << 20, VD_CACHE_WRITEBACK);
        reset();
        workload(d);
        int during = syncs();
        assert_int_equal(vd_disk_close(d), 0);
        /* 17 flushes and a FUA write, each at least one sync */
        if (during < 18)
            fail_msg("%s, cache=writeback: only %d syncs", fmts[i], during);
        verify(fmts[i], name);
    }
}

/* sync_now and close_durable: exactly the syncs a writeback flush does. */
static void unsafe_sync_now(void **s)
{
    struct vd_disk *d = mk("raw", "now.raw", 1 << 20, VD_CACHE_UNSAFE);
    char buf[4096];
    memset(buf, 1, sizeof(buf));
    reset();
    assert_int_equal(vd_disk_pwrite(d, buf, sizeof(buf), 0, 0), 0);
    assert_int_equal(vd_disk_flush(d), 0);
    assert_int_equal(syncs(), 0);
    assert_int_equal(vd_disk_sync_now(d), 0);
    assert_int_equal(n_sync, 1);
    assert_int_equal(vd_disk_flush(d), 0);      /* still unsafe afterwards */
    assert_int_equal(n_sync, 1);
    assert_int_equal(vd_disk_close_durable(d), 0);
    assert_int_equal(n_sync, 2);

    /* qcow2: the same calls reach the file (metadata written, then synced) */
    d = mk("qcow2", "now.qcow2", 8 << 20, VD_CACHE_UNSAFE);
    reset();
    assert_int_equal(vd_disk_pwrite(d, buf, sizeof(buf), 1 << 20, 0), 0);
    assert_int_equal(syncs(), 0);
    assert_int_equal(vd_disk_close_durable(d), 0);
    assert_true(n_sync >= 1);
    char p[256];
    path(p, "now.qcow2");
    struct vd_open_opts o = { .format = "qcow2", .readonly = true };
    assert_int_equal(vd_disk_open(p, &o, &d), 0);
    char rd[4096];
    assert_int_equal(vd_disk_pread(d, rd, sizeof(rd), 1 << 20), 0);
    assert_memory_equal(rd, buf, sizeof(buf));
    vd_disk_close(d);
}

/* A durable write: RWF_DSYNC on a writeback file, a plain write on unsafe. */
static void durable_write(void **s)
{
    char p[256];
    path(p, "dw.raw");
    struct vd_file *f;
    char buf[512] = { 7 };
    assert_int_equal(vd_file_open(p, VD_FILE_CREATE | VD_FILE_TRUNC, VD_CACHE_WRITEBACK, &f), 0);
    reset();
    assert_int_equal(vd_file_pwrite_durable(f, buf, sizeof(buf), 0), 0);
    assert_int_equal(syncs(), 1);
    assert_false(vd_file_sync_skipped(f));
    vd_file_close(f);
    assert_int_equal(vd_file_open(p, 0, VD_CACHE_UNSAFE, &f), 0);
    reset();
    assert_true(vd_file_sync_skipped(f));
    assert_int_equal(vd_file_pwrite_durable(f, buf, sizeof(buf), 512), 0);
    assert_int_equal(vd_file_sync(f), 0);
    assert_int_equal(syncs(), 0);
    assert_int_equal(vd_file_sync_now(f), 0);
    assert_int_equal(n_sync, 1);
    /* starting write-back is a hint, not a sync, and is done in every mode */
    assert_int_equal(vd_file_start_writeback(f, 0, 0), 0);
    assert_int_equal(n_kick, 1);
    assert_int_equal(n_sync, 1);
    char rd[512];
    assert_int_equal(vd_file_pread(f, rd, sizeof(rd), 512), 0);
    assert_memory_equal(rd, buf, sizeof(buf));
    vd_file_close(f);
}

/* writethrough / directsync: every write is followed by a sync. */
static void writethrough(void **s)
{
    enum vd_cache modes[] = { VD_CACHE_WRITETHROUGH, VD_CACHE_DIRECTSYNC };
    for (int m = 0; m < 2; m++) {
        struct vd_disk *d = mk("raw", m ? "ds.raw" : "wt.raw", 1 << 20, modes[m]);
        char *buf = vd_alloc_aligned(4096);
        memset(buf, 3, 4096);
        reset();
        for (int i = 0; i < 5; i++)
            assert_int_equal(vd_disk_pwrite(d, buf, 4096, (uint64_t)i * 4096, 0), 0);
        assert_int_equal(vd_disk_write_zeroes(d, 65536, 4096, 0), 0);
        if (n_sync < 6)
            fail_msg("%s: %d syncs for 6 writes", vd_cache_name(modes[m]), n_sync);
        reset();
        assert_int_equal(vd_disk_pread(d, buf, 4096, 0), 0);
        assert_int_equal(syncs(), 0);               /* reads do not sync */
        assert_int_equal(vd_disk_close(d), 0);
        free(buf);
    }
}

static int setup(void **s)
{
    /* the thread-pool engine syncs with fdatasync, which is counted here */
    setenv("VDISK_AIO", "threads", 1);
    struct vd_loop *loop;
    if (!mkdtemp(dir) || vd_loop_new(VD_AIO_THREADS, &loop) < 0)
        return -1;
    return 0;
}

static int teardown(void **s)
{
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(unsafe_raw),
        cmocka_unit_test(unsafe_qcow2),
        cmocka_unit_test(unsafe_vmdk),
        cmocka_unit_test(unsafe_vhd),
        cmocka_unit_test(writeback_syncs),
        cmocka_unit_test(unsafe_sync_now),
        cmocka_unit_test(durable_write),
        cmocka_unit_test(writethrough),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

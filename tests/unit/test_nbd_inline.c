/* Inline reads, the loop mode the NBD server turns on (block/loop.c):
 * reads of a buffered file are tried with preadv2(RWF_NOWAIT) at the
 * loop's flush point and fall back to the engine when the page cache does
 * not hold them. Every case compares with the file's own bytes: cached,
 * cold (dropped with POSIX_FADV_DONTNEED), half cached, at and past the
 * end of the file, and a descriptor the kernel refuses to read. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include "vdisk/engine.h"
#include "vdisk/loop.h"
#include "loop_req.h"

#define FILE_SIZE (8u * 1024 * 1024 + 100)   /* not a multiple of the page size */
#define BS 4096u

struct ctx {
    char path[64];
    int fd;
    uint8_t *data;          /* what the file holds */
    struct vd_file file;
    struct vd_loop *loop;
};

static void drop_cache(struct ctx *c, off_t off, off_t len)
{
    assert_int_equal(fdatasync(c->fd), 0);
    assert_int_equal(posix_fadvise(c->fd, off, len, POSIX_FADV_DONTNEED), 0);
}

static void warm(struct ctx *c, off_t off, size_t len)
{
    uint8_t *b = malloc(len);
    assert_non_null(b);
    assert_int_equal(pread(c->fd, b, len, off), (ssize_t)len);
    free(b);
}

/* Pages of [off, off+len) resident in the page cache. */
static size_t resident(struct ctx *c, off_t off, size_t len)
{
    long ps = sysconf(_SC_PAGESIZE);
    void *m = mmap(NULL, len, PROT_READ, MAP_SHARED, c->fd, off);
    assert_true(m != MAP_FAILED);
    size_t np = (len + (size_t)ps - 1) / (size_t)ps, n = 0;
    unsigned char *v = malloc(np);
    assert_non_null(v);
    assert_int_equal(mincore(m, len, v), 0);
    for (size_t i = 0; i < np; i++)
        n += v[i] & 1;
    free(v);
    munmap(m, len);
    return n;
}

static int setup(void **state)
{
    struct ctx *c = calloc(1, sizeof *c);
    assert_non_null(c);
    snprintf(c->path, sizeof c->path, "/var/tmp/vdisk-inline-XXXXXX");
    c->fd = mkstemp(c->path);
    assert_true(c->fd >= 0);
    c->data = malloc(FILE_SIZE);
    assert_non_null(c->data);
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < FILE_SIZE; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c->data[i] = (uint8_t)x;
    }
    assert_int_equal(pwrite(c->fd, c->data, FILE_SIZE, 0), (ssize_t)FILE_SIZE);
    c->file.fd = c->fd;
    c->file.name = c->path;
    c->file.align = 1;
    unsetenv("VDISK_INLINE_READS");
    assert_int_equal(vd_loop_new(VD_AIO_DEFAULT, &c->loop), 0);
    vd_loop_enable_inline_reads(c->loop);
    *state = c;
    return 0;
}

static int teardown(void **state)
{
    struct ctx *c = *state;
    vd_loop_free(c->loop);
    close(c->fd);
    unlink(c->path);
    free(c->data);
    free(c);
    return 0;
}

/* Submit n reads of len at offs[i] (two iovecs each, split at len / 3)
 * and check that none completes inside the submit call, that all succeed,
 * and that the buffers hold the file's bytes (zeros past its end). */
static void read_and_compare(struct ctx *c, const uint64_t *offs, int n, size_t len)
{
    struct req *r = calloc((size_t)n, sizeof *r);
    uint8_t *buf = malloc((size_t)n * len);
    assert_non_null(r);
    assert_non_null(buf);
    memset(buf, 0xa5, (size_t)n * len);
    int pending = n;
    for (int i = 0; i < n; i++) {
        uint8_t *b = buf + (size_t)i * len;
        size_t first = len / 3;
        r[i].iov[0] = (struct iovec){ b, first };
        r[i].iov[1] = (struct iovec){ b + first, len - first };
        r[i].io = (struct vd_io){ .op = VD_IO_READ, .file = &c->file, .off = offs[i],
                                  .iov = r[i].iov, .iovcnt = 2, .done = req_done };
        r[i].pending = &pending;
        vd_loop_submit_io(c->loop, &r[i].io);
        assert_false(r[i].done);     /* never completed inside submit */
    }
    run_until(c->loop, &pending);
    for (int i = 0; i < n; i++) {
        assert_int_equal(r[i].res, 0);
        const uint8_t *b = buf + (size_t)i * len;
        for (size_t k = 0; k < len; k++) {
            uint64_t o = offs[i] + k;
            uint8_t want = o < FILE_SIZE ? c->data[o] : 0;
            if (b[k] != want)
                fail_msg("read %d at %llu: byte %zu is %#x, the file has %#x", i,
                         (unsigned long long)offs[i], k, b[k], want);
        }
    }
    free(buf);
    free(r);
}

static void test_cached(void **state)
{
    struct ctx *c = *state;
    warm(c, 0, 1 << 20);
    uint64_t offs[32];
    for (int i = 0; i < 32; i++)
        offs[i] = (uint64_t)((i * 7) % 256) * BS;
    read_and_compare(c, offs, 32, BS);
}

static void test_cold(void **state)
{
    struct ctx *c = *state;
    drop_cache(c, 0, 0);
    if (resident(c, 0, 1 << 20) > 16)
        print_message("# the page cache kept the file: the cold case is not really cold\n");
    uint64_t offs[32];
    for (int i = 0; i < 32; i++)
        offs[i] = (uint64_t)((i * 37) % 2048) * BS;
    read_and_compare(c, offs, 32, BS);
    /* and again, now that those pages are cached */
    read_and_compare(c, offs, 32, BS);
}

static void test_half_cached(void **state)
{
    struct ctx *c = *state;
    /* [0, 64K) cached, the rest cold: each read starts in the cached part
     * and ends in the cold one, so preadv2 returns a short count. */
    drop_cache(c, 0, 0);
    warm(c, 0, 64 * 1024);
    uint64_t offs[4] = { 32 * 1024, 16 * 1024, 60 * 1024, 48 * 1024 };
    read_and_compare(c, offs, 4, 256 * 1024);
}

static void test_unaligned(void **state)
{
    struct ctx *c = *state;
    uint64_t offs[6] = { 1, 4095, 12345, 1 << 20, 3 * 1024 * 1024 + 17, 511 };
    read_and_compare(c, offs, 6, 10000);
    drop_cache(c, 0, 0);
    read_and_compare(c, offs, 6, 10000);
}

static void test_end_of_file(void **state)
{
    struct ctx *c = *state;
    /* across the end, wholly past it, starting exactly at it */
    uint64_t offs[3] = { FILE_SIZE - 1000, FILE_SIZE + 3 * BS, FILE_SIZE };
    read_and_compare(c, offs, 3, BS);
    drop_cache(c, 0, 0);
    read_and_compare(c, offs, 3, BS);
}

/* Many cold reads in a row (the back-off path), then cached ones again. */
static void test_backoff(void **state)
{
    struct ctx *c = *state;
    drop_cache(c, 0, 0);
    enum { N = 120 };
    uint64_t offs[N];
    for (int i = 0; i < N; i++)
        offs[i] = (uint64_t)((i * 13) % 2000) * BS;
    read_and_compare(c, offs, N, BS);
    read_and_compare(c, offs, N, BS);
}

/* A descriptor open for writing only: preadv2 fails with EBADF, and the
 * engine, which does the read again, reports the error. */
static void test_error(void **state)
{
    struct ctx *c = *state;
    int wfd = open(c->path, O_WRONLY);
    assert_true(wfd >= 0);
    struct vd_file f = { .fd = wfd, .name = c->path, .align = 1 };
    uint8_t b[BS];
    struct req r = { .iov = { { b, BS } } };
    int pending = 1;
    r.pending = &pending;
    r.io = (struct vd_io){ .op = VD_IO_READ, .file = &f, .off = 0, .iov = r.iov, .iovcnt = 1,
                           .done = req_done };
    vd_loop_submit_io(c->loop, &r.io);
    run_until(c->loop, &pending);
    assert_int_equal(r.res, -EBADF);
    close(wfd);
}

/* Writes are not affected, and a read submitted right after a write to
 * the same place sees what was written (both on the loop). */
static void test_write_then_read(void **state)
{
    struct ctx *c = *state;
    uint8_t w[BS], rd[BS];
    memset(w, 0x5c, sizeof w);
    struct req wr = { .iov = { { w, BS } } }, rr = { .iov = { { rd, BS } } };
    int pending = 1;
    wr.pending = rr.pending = &pending;
    wr.io = (struct vd_io){ .op = VD_IO_WRITE, .file = &c->file, .off = 5 * BS, .iov = wr.iov,
                            .iovcnt = 1, .done = req_done };
    vd_loop_submit_io(c->loop, &wr.io);
    run_until(c->loop, &pending);
    assert_int_equal(wr.res, 0);
    pending = 1;
    rr.io = (struct vd_io){ .op = VD_IO_READ, .file = &c->file, .off = 5 * BS, .iov = rr.iov,
                            .iovcnt = 1, .done = req_done };
    vd_loop_submit_io(c->loop, &rr.io);
    run_until(c->loop, &pending);
    assert_int_equal(rr.res, 0);
    assert_memory_equal(rd, w, BS);
    memcpy(c->data + 5 * BS, w, BS);
}

/* Proof that cached reads do not go through the engine: in a child whose
 * seccomp filter makes io_uring_enter fail, reads of cached data still
 * complete (and match the file), while a read of dropped data, which
 * needs the engine, does not (the control: the filter works). */
static int inline_child(struct ctx *c)
{
    struct vd_loop *l;
    if (vd_loop_new(VD_AIO_IO_URING, &l) < 0)
        return 10;
    vd_loop_enable_inline_reads(l);
    warm(c, 0, 1 << 20);
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_enter, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = { .len = sizeof(f) / sizeof(f[0]), .filter = f };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0)
        return 11;
    enum { N = 32 };
    static uint8_t buf[N][BS];
    static struct req r[N];
    int pending = N;
    for (int i = 0; i < N; i++) {
        r[i].iov[0] = (struct iovec){ buf[i], BS };
        r[i].pending = &pending;
        r[i].io = (struct vd_io){ .op = VD_IO_READ, .file = &c->file, .off = (uint64_t)(i * 5 % 256) * BS,
                                  .iov = r[i].iov, .iovcnt = 1, .done = req_done };
        vd_loop_submit_io(l, &r[i].io);
    }
    for (int k = 0; k < 10 && pending; k++)
        vd_loop_run_once(l, 50);
    if (pending)
        return 12;                      /* a cached read waited for the engine */
    for (int i = 0; i < N; i++)
        if (r[i].res != 0 || memcmp(buf[i], c->data + r[i].io.off, BS))
            return 13;
    /* control: dropped pages need the engine, which cannot run here */
    if (fdatasync(c->fd) < 0 || posix_fadvise(c->fd, 0, 0, POSIX_FADV_DONTNEED) != 0)
        return 14;
    if (resident(c, 4 << 20, 1 << 20) != 0)
        return 0;                       /* the cache kept it: no control possible */
    pending = 1;
    r[0].io.off = 4 << 20;
    vd_loop_submit_io(l, &r[0].io);
    for (int k = 0; k < 5 && pending; k++)
        vd_loop_run_once(l, 20);
    return pending ? 0 : 15;
}

static void test_cached_reads_skip_the_engine(void **state)
{
    struct ctx *c = *state;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0)
        _exit(inline_child(c));
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_cached, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cold, setup, teardown),
        cmocka_unit_test_setup_teardown(test_half_cached, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unaligned, setup, teardown),
        cmocka_unit_test_setup_teardown(test_end_of_file, setup, teardown),
        cmocka_unit_test_setup_teardown(test_backoff, setup, teardown),
        cmocka_unit_test_setup_teardown(test_error, setup, teardown),
        cmocka_unit_test_setup_teardown(test_write_then_read, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cached_reads_skip_the_engine, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

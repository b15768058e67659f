/* The I/O engines (io_uring, native AIO, threads), each driven through a
 * loop on real temporary files, buffered and O_DIRECT. */
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
#include <poll.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include "vdisk/engine.h"
#include "vdisk/loop.h"
#include "block/engine_int.h"
#include "loop_req.h"

#define NIO 600
#define BS 4096

struct ctx {
    enum vd_aio aio;
    bool direct;
    char path[64];
    int fd;
    struct vd_file file;
    struct vd_loop *loop;
};

static void *abuf(size_t len, int fill)
{
    void *p = NULL;
    assert_int_equal(posix_memalign(&p, 4096, len ? len : 1), 0);
    memset(p, fill, len);
    return p;
}

static int open_ctx(struct ctx *c, enum vd_aio aio, bool direct)
{
    memset(c, 0, sizeof(*c));
    c->aio = aio;
    c->direct = direct;
    snprintf(c->path, sizeof(c->path), "/var/tmp/vdisk-engine-XXXXXX");
    c->fd = mkstemp(c->path);
    if (c->fd < 0)
        return -errno;
    if (direct) {
        int fd = open(c->path, O_RDWR | O_DIRECT);
        close(c->fd);
        c->fd = fd;
        if (fd < 0)
            return -errno;
    }
    c->file = (struct vd_file){ .fd = c->fd, .name = c->path, .direct = direct,
                                .align = direct ? 4096 : 1 };
    return vd_loop_new(aio, &c->loop);
}

static void close_ctx(struct ctx *c)
{
    vd_loop_free(c->loop);
    close(c->fd);
    unlink(c->path);
}

static void submit_on(struct ctx *c, struct vd_file *f, struct req *r, enum vd_io_op op,
                      uint64_t off, void *buf, size_t len, int *pending)
{
    memset(r, 0, sizeof(*r));
    r->iov[0] = (struct iovec){ buf, len };
    r->io = (struct vd_io){ .op = op, .file = f, .off = off,
                            .iov = r->iov, .iovcnt = op == VD_IO_SYNC ? 0 : 1,
                            .done = req_done };
    r->pending = pending;
    (*pending)++;
    vd_loop_submit_io(c->loop, &r->io);
}

static void submit(struct ctx *c, struct req *r, enum vd_io_op op, uint64_t off,
                   void *buf, size_t len, int *pending)
{
    submit_on(c, &c->file, r, op, off, buf, len, pending);
}

static const char *aio_name(enum vd_aio a)
{
    return a == VD_AIO_IO_URING ? "io_uring" : a == VD_AIO_NATIVE ? "native" : "threads";
}

/* Many writes in flight, a sync, then many reads: same bytes back. */
static void rw_many(enum vd_aio aio, bool direct)
{
    struct ctx c;
    assert_int_equal(open_ctx(&c, aio, direct), 0);
    assert_string_equal(vd_loop_engine_name(c.loop), aio_name(aio));
    struct req *r = calloc(NIO, sizeof(*r));
    uint8_t *wbuf = abuf((size_t)NIO * BS, 0), *rbuf = abuf((size_t)NIO * BS, 0xee);
    for (size_t i = 0; i < (size_t)NIO * BS; i++)
        wbuf[i] = (uint8_t)(i * 7 + i / 4096);
    int pending = 0;
    /* issue in reverse order so the file grows out of order too */
    for (int i = NIO - 1; i >= 0; i--)
        submit(&c, &r[i], VD_IO_WRITE, (uint64_t)i * BS, wbuf + (size_t)i * BS, BS, &pending);
    run_until(c.loop, &pending);
    for (int i = 0; i < NIO; i++)
        assert_int_equal(r[i].res, 0);
    submit(&c, &r[0], VD_IO_SYNC, 0, NULL, 0, &pending);
    run_until(c.loop, &pending);
    assert_int_equal(r[0].res, 0);
    for (int i = 0; i < NIO; i++)
        submit(&c, &r[i], VD_IO_READ, (uint64_t)i * BS, rbuf + (size_t)i * BS, BS, &pending);
    run_until(c.loop, &pending);
    for (int i = 0; i < NIO; i++)
        assert_int_equal(r[i].res, 0);
    assert_memory_equal(wbuf, rbuf, (size_t)NIO * BS);
    /* and what the kernel says is in the file */
    uint8_t *check = abuf((size_t)NIO * BS, 0);
    assert_int_equal(pread(c.fd, check, (size_t)NIO * BS, 0), NIO * BS);
    assert_memory_equal(wbuf, check, (size_t)NIO * BS);
    free(check);
    free(wbuf);
    free(rbuf);
    free(r);
    close_ctx(&c);
}

/* busy: true from submit until the completion is reaped, for every engine
 * (the loop polls only while it is true). Driven on the ops directly. */
static void busy_one(const struct vd_engine_ops *ops)
{
    char path[] = "/var/tmp/vdisk-busy-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    struct vd_file f = { .fd = fd, .name = path, .align = 1 };
    struct vd_engine *e = NULL;
    assert_int_equal(ops->init(&e, 8), 0);
    assert_non_null(ops->busy);
    assert_false(ops->busy(e));
    uint8_t *buf = abuf(BS, 0x5a);
    int pending = 1;
    struct req r = { .pending = &pending };
    r.iov[0] = (struct iovec){ buf, BS };
    r.io = (struct vd_io){ .op = VD_IO_WRITE, .file = &f, .off = 0, .iov = r.iov, .iovcnt = 1,
                           .done = req_done };
    ops->submit(e, &r.io);
    assert_true(ops->busy(e));
    ops->flush(e);
    for (int i = 0; i < 1000 && pending; i++) {
        struct pollfd p = { .fd = ops->event_fd(e), .events = POLLIN };
        assert_true(poll(&p, 1, 1000) >= 0);
        assert_true(ops->reap(e) >= 0);
        if (pending)
            assert_true(ops->busy(e));
    }
    assert_int_equal(pending, 0);
    assert_int_equal(r.res, 0);
    assert_false(ops->busy(e));
    ops->fini(e);
    free(buf);
    close(fd);
    unlink(path);
}

static void busy(void **s)
{
    busy_one(&vd_engine_io_uring);
    busy_one(&vd_engine_aio);
    busy_one(&vd_engine_threads);
}

/* A vectored read across the end of the file: data, then zeros. */
static void eof_zero(enum vd_aio aio, bool direct)
{
    struct ctx c;
    assert_int_equal(open_ctx(&c, aio, direct), 0);
    size_t fsize = direct ? 5000 : 6001;   /* not a multiple of the block size */
    uint8_t *data = malloc(fsize);
    for (size_t i = 0; i < fsize; i++)
        data[i] = (uint8_t)(i % 251 + 1);
    int bfd = open(c.path, O_WRONLY);
    assert_int_equal(pwrite(bfd, data, fsize, 0), (ssize_t)fsize);
    close(bfd);

    uint8_t *buf = abuf(4 * BS, 0xff);
    struct req r;
    int pending = 0;
    memset(&r, 0, sizeof(r));
    r.iov[0] = (struct iovec){ buf, BS };
    r.iov[1] = (struct iovec){ buf + BS, BS };
    r.iov[2] = (struct iovec){ buf + 2 * BS, 2 * BS };
    r.io = (struct vd_io){ .op = VD_IO_READ, .file = &c.file, .off = 0, .iov = r.iov,
                           .iovcnt = 3, .done = req_done };
    r.pending = &pending;
    pending = 1;
    vd_loop_submit_io(c.loop, &r.io);
    run_until(c.loop, &pending);
    assert_int_equal(r.res, 0);
    assert_memory_equal(buf, data, fsize);
    for (size_t i = fsize; i < 4 * BS; i++)
        assert_int_equal(buf[i], 0);

    /* wholly past the end */
    memset(buf, 0xff, 4 * BS);
    submit(&c, &r, VD_IO_READ, 1 << 20, buf, 2 * BS, &pending);
    run_until(c.loop, &pending);
    assert_int_equal(r.res, 0);
    for (size_t i = 0; i < 2 * BS; i++)
        assert_int_equal(buf[i], 0);
    assert_int_equal(buf[2 * BS], 0xff);
    free(buf);
    free(data);
    close_ctx(&c);
}

/* Errors come back as -errno through done, never as a crash or a hang. */
static void errors(enum vd_aio aio)
{
    struct ctx c;
    assert_int_equal(open_ctx(&c, aio, false), 0);
    uint8_t *buf = abuf(BS, 0);
    struct req r[3];
    int pending = 0;
    struct vd_file bad = c.file;
    bad.fd = 1000000;                       /* never open */
    for (int i = 0; i < 3; i++)
        submit_on(&c, &bad, &r[i], (enum vd_io_op)i, 0, buf, i == VD_IO_SYNC ? 0 : BS, &pending);
    run_until(c.loop, &pending);
    for (int i = 0; i < 3; i++)
        assert_int_equal(r[i].res, -EBADF);

    /* a write to a read-only descriptor */
    struct vd_file rof = c.file;
    rof.fd = open(c.path, O_RDONLY);
    submit_on(&c, &rof, &r[0], VD_IO_WRITE, 0, buf, BS, &pending);
    run_until(c.loop, &pending);
    assert_int_equal(r[0].res, -EBADF);
    close(rof.fd);

    /* misaligned O_DIRECT I/O is refused with EINVAL */
    struct ctx d;
    assert_int_equal(open_ctx(&d, aio, true), 0);
    submit(&d, &r[1], VD_IO_WRITE, 512 + 1, buf, 100, &pending);
    run_until(d.loop, &pending);
    assert_int_equal(r[1].res, -EINVAL);
    close_ctx(&d);
    free(buf);
    close_ctx(&c);
}

/* A completion callback that submits the next request (a chain). */
struct chain {
    struct ctx *c;
    struct req r;
    uint8_t *buf;
    int left, pending;
};

static void chain_done(struct vd_io *io, int res)
{
    struct chain *ch = (struct chain *)((char *)io - offsetof(struct chain, r));
    assert_int_equal(res, 0);
    if (--ch->left == 0) {
        ch->pending = 0;
        return;
    }
    ch->r.io.off += BS;
    vd_loop_submit_io(ch->c->loop, &ch->r.io);
}

static void chained(enum vd_aio aio)
{
    struct ctx c;
    assert_int_equal(open_ctx(&c, aio, false), 0);
    struct chain ch = { .c = &c, .left = 64, .pending = 1 };
    ch.buf = abuf(BS, 0x5a);
    ch.r.iov[0] = (struct iovec){ ch.buf, BS };
    ch.r.io = (struct vd_io){ .op = VD_IO_WRITE, .file = &c.file, .iov = ch.r.iov,
                              .iovcnt = 1, .done = chain_done };
    vd_loop_submit_io(c.loop, &ch.r.io);
    run_until(c.loop, &ch.pending);
    struct stat st;
    assert_int_equal(fstat(c.fd, &st), 0);
    assert_int_equal(st.st_size, 64 * BS);
    free(ch.buf);
    close_ctx(&c);
}

#define ENGINE_TESTS(name, aio) \
    static void name##_rw(void **s) { rw_many(aio, false); } \
    static void name##_rw_direct(void **s) { rw_many(aio, true); } \
    static void name##_eof(void **s) { eof_zero(aio, false); } \
    static void name##_eof_direct(void **s) { eof_zero(aio, true); } \
    static void name##_errors(void **s) { errors(aio); } \
    static void name##_chain(void **s) { chained(aio); }

ENGINE_TESTS(uring, VD_AIO_IO_URING)
ENGINE_TESTS(native, VD_AIO_NATIVE)
ENGINE_TESTS(threads, VD_AIO_THREADS)

/* Progress bookkeeping: resume points inside and between iovecs. */
static void advance(void **s)
{
    char a[10], b[20], cbuf[5];
    struct iovec iov[3] = { { a, 10 }, { b, 20 }, { cbuf, 5 } };
    struct vd_io io = { .op = VD_IO_WRITE, .iov = iov, .iovcnt = 3 };
    int res = 1;
    vd_io_begin(&io);
    assert_ptr_equal(io.cur_iov, iov);
    assert_int_equal(io.cur_iovcnt, 3);
    assert_false(vd_io_advance(&io, 4, &res));          /* inside the first */
    assert_ptr_equal(io.cur_iov, &io.cur_first);
    assert_int_equal(io.cur_iovcnt, 1);
    assert_ptr_equal(io.cur_first.iov_base, a + 4);
    assert_int_equal(io.cur_first.iov_len, 6);
    assert_false(vd_io_advance(&io, 6, &res));          /* exactly to the second */
    assert_ptr_equal(io.cur_iov, &iov[1]);
    assert_int_equal(io.cur_iovcnt, 2);
    assert_false(vd_io_advance(&io, 22, &res));         /* into the third */
    assert_ptr_equal(io.cur_iov, &io.cur_first);
    assert_ptr_equal(io.cur_first.iov_base, cbuf + 2);
    assert_int_equal(io.cur_first.iov_len, 3);
    assert_true(vd_io_advance(&io, 0, &res));           /* a write with no progress */
    assert_int_equal(res, -EIO);

    vd_io_begin(&io);
    assert_true(vd_io_advance(&io, 35, &res));
    assert_int_equal(res, 0);
    vd_io_begin(&io);
    assert_true(vd_io_advance(&io, -ENOSPC, &res));
    assert_int_equal(res, -ENOSPC);

    io.op = VD_IO_READ;
    memset(a, 1, 10); memset(b, 1, 20); memset(cbuf, 1, 5);
    vd_io_begin(&io);
    assert_false(vd_io_advance(&io, 12, &res));
    assert_true(vd_io_advance(&io, 0, &res));            /* EOF: zeros */
    assert_int_equal(res, 0);
    assert_int_equal(a[9], 1);
    assert_int_equal(b[1], 1);
    assert_int_equal(b[2], 0);
    assert_int_equal(b[19], 0);
    assert_int_equal(cbuf[4], 0);
}

static void parse(void **s)
{
    enum vd_aio a;
    enum vd_cache c;
    assert_int_equal(vd_aio_parse("io_uring", &a), 0);
    assert_int_equal(a, VD_AIO_IO_URING);
    assert_int_equal(vd_aio_parse("native", &a), 0);
    assert_int_equal(a, VD_AIO_NATIVE);
    assert_int_equal(vd_aio_parse("threads", &a), 0);
    assert_int_equal(a, VD_AIO_THREADS);
    assert_int_equal(vd_aio_parse("uring", &a), -EINVAL);
    assert_int_equal(vd_aio_parse(NULL, &a), -EINVAL);
    assert_int_equal(vd_cache_parse("none", &c), 0);
    assert_int_equal(c, VD_CACHE_NONE);
    assert_int_equal(vd_cache_parse("directsync", &c), 0);
    assert_int_equal(c, VD_CACHE_DIRECTSYNC);
    assert_true(vd_cache_direct(c));
    assert_int_equal(vd_cache_parse("writeback", &c), 0);
    assert_int_equal(c, VD_CACHE_WRITEBACK);
    assert_false(vd_cache_direct(c));
    assert_int_equal(vd_cache_parse("unsafe", &c), 0);
    assert_int_equal(c, VD_CACHE_UNSAFE);
    assert_false(vd_cache_direct(c));
    assert_int_equal(vd_cache_parse("writethrough", &c), 0);
    assert_int_equal(c, VD_CACHE_WRITETHROUGH);
    for (int i = 0; i <= VD_CACHE_DIRECTSYNC; i++) {
        assert_int_equal(vd_cache_parse(vd_cache_name((enum vd_cache)i), &c), 0);
        assert_int_equal(c, i);
    }
    assert_int_equal(vd_cache_parse("None", &c), -EINVAL);
    assert_int_equal(vd_cache_parse("", &c), -EINVAL);
    /* the default engine on this host is a real one */
    const struct vd_engine_ops *d = vd_engine_pick(VD_AIO_DEFAULT);
    assert_non_null(d);
    assert_ptr_equal(vd_engine_pick(VD_AIO_THREADS), &vd_engine_threads);
}

/* In a child whose seccomp filter refuses io_uring_setup (and with
 * block_aio also io_setup), the default engine falls back in order. */
static int child_with_filter(bool block_aio, const char *want)
{
    pid_t pid = fork();
    if (pid == 0) {
        struct sock_filter f[] = {
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 2, 0),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, block_aio ? __NR_io_setup : 0xffffff, 1, 0),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA)),
        };
        struct sock_fprog prog = { .len = sizeof(f) / sizeof(f[0]), .filter = f };
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
            prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0)
            _exit(10);
        if (strcmp(vd_engine_pick(VD_AIO_DEFAULT)->name, want) != 0)
            _exit(11);
        struct vd_loop *l;
        if (vd_loop_new(VD_AIO_DEFAULT, &l) < 0 || strcmp(vd_loop_engine_name(l), want) != 0)
            _exit(12);
        vd_loop_free(l);
        /* asking for io_uring by name fails rather than falling back */
        if (vd_loop_new(VD_AIO_IO_URING, &l) != -ENOSYS)
            _exit(13);
        _exit(0);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 100 + WTERMSIG(st);
}

static void fallback(void **s)
{
    assert_int_equal(child_with_filter(false, "native"), 0);
    assert_int_equal(child_with_filter(true, "threads"), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(fallback),     /* first: before the default is cached */
        cmocka_unit_test(parse),
        cmocka_unit_test(busy),
        cmocka_unit_test(advance),
        cmocka_unit_test(uring_rw), cmocka_unit_test(uring_rw_direct),
        cmocka_unit_test(uring_eof), cmocka_unit_test(uring_eof_direct),
        cmocka_unit_test(uring_errors), cmocka_unit_test(uring_chain),
        cmocka_unit_test(native_rw), cmocka_unit_test(native_rw_direct),
        cmocka_unit_test(native_eof), cmocka_unit_test(native_eof_direct),
        cmocka_unit_test(native_errors), cmocka_unit_test(native_chain),
        cmocka_unit_test(threads_rw), cmocka_unit_test(threads_rw_direct),
        cmocka_unit_test(threads_eof), cmocka_unit_test(threads_eof_direct),
        cmocka_unit_test(threads_errors), cmocka_unit_test(threads_chain),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

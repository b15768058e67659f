/* vd_disk_block_status_async and vd_disk_resize_async: on a local disk the
 * answer comes inside the call and equals the synchronous one; on a disk
 * whose layer is remote (a qcow2 served by nbdkit's file plugin) it comes
 * later, on the caller's loop, with the same extents, errors carried with
 * their message. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include "vdisk/block.h"
#include "vdisk/error.h"
#include "vdisk/loop.h"
#include "nbdkit.h"

#define MiB (1ull << 20)
#define SIZE (32 * MiB)

static char dir[64], img[128], uri[256];
static pid_t server = -1;

static void make_image(void)
{
    struct vd_create_opts co = { .size = SIZE };
    assert_int_equal(vd_image_create(img, "qcow2", &co), 0);
    struct vd_disk *d;
    struct vd_open_opts o = { .format = "qcow2" };
    assert_int_equal(vd_disk_open(img, &o, &d), 0);
    static char buf[192 << 10];
    memset(buf, 0x5a, sizeof(buf));
    assert_int_equal(vd_disk_pwrite(d, buf, sizeof(buf), 1 * MiB, 0), 0);
    assert_int_equal(vd_disk_pwrite(d, buf, 64 << 10, 9 * MiB, 0), 0);
    assert_int_equal(vd_disk_write_zeroes(d, 20 * MiB, 128 << 10, 0), 0);
    assert_int_equal(vd_disk_pwrite(d, buf, 4096, 30 * MiB, 0), 0);
    assert_int_equal(vd_disk_close(d), 0);
}

static int setup(void **s)
{
    snprintf(dir, sizeof(dir), "/tmp/vdisk-dasync-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    snprintf(img, sizeof(img), "%s/a.qcow2", dir);
    return 0;
}

static int teardown(void **s)
{
    if (server > 0) {
        kill(server, SIGTERM);
        waitpid(server, NULL, 0);
    }
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

struct answer {
    bool done;
    int res;
};

static void on_answer(void *opaque, int res)
{
    struct answer *a = opaque;
    a->res = res;
    a->done = true;
}

static void wait_answer(struct answer *a)
{
    struct vd_loop *loop = vd_loop_current();
    for (int i = 0; i < 3000 && !a->done; i++)
        vd_loop_run_once(loop, 10);
    assert_true(a->done);
}

/* The extents of the whole disk, one synchronous call each. */
static int sync_map(struct vd_disk *d, struct vd_extent *e, int max)
{
    uint64_t off = 0, size = vd_disk_size(d);
    int n = 0;
    while (off < size && n < max) {
        assert_int_equal(vd_disk_block_status(d, off, size - off, &e[n]), 0);
        off += e[n++].len;
    }
    return n;
}

static void same_extents(const struct vd_extent *a, const struct vd_extent *b, int n)
{
    for (int i = 0; i < n; i++) {
        assert_int_equal(a[i].off, b[i].off);
        assert_int_equal(a[i].len, b[i].len);
        assert_int_equal(a[i].flags, b[i].flags);
        assert_int_equal(a[i].depth, b[i].depth);
    }
}

static void local_inline(void **s)
{
    make_image();
    struct vd_disk *d;
    struct vd_open_opts o = { .format = "qcow2" };
    assert_int_equal(vd_disk_open(img, &o, &d), 0);
    struct vd_extent want[64], got[64];
    int n = sync_map(d, want, 64);
    assert_true(n >= 6);            /* hole, data, hole, data, hole, zero, hole, data, hole */

    struct answer a = {0};
    vd_disk_block_status_async(d, 0, SIZE, got, 64, on_answer, &a);
    assert_true(a.done);            /* answered inside the call: no hop */
    assert_int_equal(a.res, n);
    same_extents(got, want, n);

    /* a batch stops at max; the next one goes on from there */
    a = (struct answer){0};
    vd_disk_block_status_async(d, 0, SIZE, got, 2, on_answer, &a);
    assert_true(a.done);
    assert_int_equal(a.res, 2);
    same_extents(got, want, 2);
    a = (struct answer){0};
    vd_disk_block_status_async(d, got[1].off + got[1].len, SIZE, got, 64, on_answer, &a);
    assert_true(a.done);
    assert_int_equal(a.res, n - 2);
    same_extents(got, want + 2, n - 2);

    /* past the end: -EINVAL, at once */
    a = (struct answer){0};
    vd_disk_block_status_async(d, SIZE, 4096, got, 64, on_answer, &a);
    assert_true(a.done);
    assert_int_equal(a.res, -EINVAL);

    /* resize: at once too */
    a = (struct answer){0};
    vd_disk_resize_async(d, SIZE + 16 * MiB, VD_PREALLOC_OFF, on_answer, &a);
    assert_true(a.done);
    assert_int_equal(a.res, 0);
    assert_int_equal(vd_disk_size(d), SIZE + 16 * MiB);
    a = (struct answer){0};
    vd_disk_resize_async(d, SIZE, VD_PREALLOC_OFF, on_answer, &a);
    assert_true(a.done);
    assert_int_equal(a.res, 0);
    assert_int_equal(vd_disk_close(d), 0);
}

static void remote_later(void **s)
{
    char sock[128], arg[160];
    snprintf(sock, sizeof(sock), "%s/s.sock", dir);
    snprintf(arg, sizeof(arg), "file=%s", img);
    server = start_nbdkit(sock, "file", arg, (char *)NULL);
    assert_true(server > 0);
    snprintf(uri, sizeof(uri), "nbd+unix:///?socket=%s", sock);
    struct vd_disk *d;
    struct vd_open_opts o = { .format = "qcow2" };
    assert_int_equal(vd_disk_open(uri, &o, &d), 0);
    struct vd_extent want[64], got[64];
    int n = sync_map(d, want, 64);
    assert_true(n >= 6);

    struct answer a = {0};
    vd_disk_block_status_async(d, 0, SIZE, got, 64, on_answer, &a);
    assert_false(a.done);           /* the look-ups went to a worker */
    wait_answer(&a);
    assert_int_equal(a.res, n);
    same_extents(got, want, n);

    /* several at once, and a write between them: all answered, in order */
    struct answer b[4] = {{0}};
    struct vd_extent e4[4][8];
    for (int i = 0; i < 4; i++)
        vd_disk_block_status_async(d, (uint64_t)i * 8 * MiB, 8 * MiB, e4[i], 8, on_answer, &b[i]);
    for (int i = 0; i < 4; i++) {
        wait_answer(&b[i]);
        assert_true(b[i].res >= 1);
        assert_int_equal(e4[i][0].off, (uint64_t)i * 8 * MiB);
    }

    /* grow through the gate (the qcow2 header and L1 fit the file) */
    a = (struct answer){0};
    vd_disk_resize_async(d, SIZE + 32 * MiB, VD_PREALLOC_OFF, on_answer, &a);
    assert_false(a.done);
    wait_answer(&a);
    assert_int_equal(a.res, 0);
    assert_int_equal(vd_disk_size(d), SIZE + 32 * MiB);
    a = (struct answer){0};
    vd_disk_block_status_async(d, SIZE, 32 * MiB, got, 64, on_answer, &a);
    wait_answer(&a);
    assert_int_equal(a.res, 1);
    assert_int_equal(got[0].len, 32 * MiB);
    assert_true(got[0].flags & VD_EXT_ZERO);
    assert_false(got[0].flags & VD_EXT_DATA);
    /* the synchronous wrapper takes the same road */
    assert_int_equal(vd_disk_resize(d, SIZE, VD_PREALLOC_OFF), 0);
    assert_int_equal(vd_disk_size(d), SIZE);

    /* errors arrive through the callback, with their message */
    a = (struct answer){0};
    vd_disk_block_status_async(d, SIZE + 4096, 4096, got, 64, on_answer, &a);
    assert_true(a.done);
    assert_int_equal(a.res, -EINVAL);
    assert_int_equal(vd_disk_close(d), 0);

    o.readonly = true;
    assert_int_equal(vd_disk_open(uri, &o, &d), 0);
    a = (struct answer){0};
    vd_disk_resize_async(d, 2 * SIZE, VD_PREALLOC_OFF, on_answer, &a);
    assert_true(a.done);
    assert_int_equal(a.res, -EROFS);
    assert_non_null(strstr(vd_errmsg(a.res), "read-only"));
    assert_int_equal(vd_disk_close(d), 0);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(local_inline),
        cmocka_unit_test(remote_later),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

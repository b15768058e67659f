/* vhost-user-blk back-end restarts, driven by the front-end library
 * against the back-end in this process, with the back-end's state at the
 * moment of the "crash" set up exactly rather than hoped for by timing.
 *
 * A back-end can die after it has put a request in the used ring (and
 * cleared it in the inflight region) but before it has signalled the call
 * eventfd. The driver then waits for an interrupt that never comes; the
 * new back-end finds nothing in flight and nothing new in the avail ring,
 * so unless it signals when the ring starts, the queue stalls for good. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdbool.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include "vdisk/block.h"
#include "vdisk/error.h"
#include "vmm-glue/vhost_blk.h"
#include "vmm-glue/vhost_front.h"
#include "vmm-glue/vhost_proto.h"
#include "vmm-glue/virtq.h"

#define DISK_BYTES (1u << 20)

struct env {
    char dir[64], img[96], sock[96];
    struct vd_disk *d;
    struct vd_vhost_blk *b;
    struct vd_vhu *f;
};

static int setup(void **state)
{
    struct env *e = calloc(1, sizeof(*e));
    snprintf(e->dir, sizeof(e->dir), "/tmp/vd-vhost-restart.XXXXXX");
    assert_non_null(mkdtemp(e->dir));
    snprintf(e->img, sizeof(e->img), "%s/d.raw", e->dir);
    snprintf(e->sock, sizeof(e->sock), "%s/s.sock", e->dir);
    int fd = open(e->img, O_CREAT | O_RDWR, 0600);
    assert_true(fd >= 0);
    assert_int_equal(ftruncate(fd, DISK_BYTES), 0);
    close(fd);
    struct vd_open_opts oo = { .format = "raw" };
    assert_int_equal(vd_disk_open(e->img, &oo, &e->d), 0);
    *state = e;
    return 0;
}

static int teardown(void **state)
{
    struct env *e = *state;
    if (e->f) vd_vhu_close(e->f);
    if (e->b) vd_vhost_blk_free(e->b);
    vd_disk_close(e->d);
    unlink(e->img);
    unlink(e->sock);
    rmdir(e->dir);
    free(e);
    return 0;
}

static void serve(struct env *e)
{
    struct vd_vhost_blk_opts o = { .num_queues = 1, .nthreads = 1 };
    assert_int_equal(vd_vhost_blk_new(e->d, e->sock, &o, &e->b), 0);
}

/* Nothing pending on the call eventfd (it is non-blocking). */
static void drain_call(struct env *e)
{
    eventfd_t v;
    eventfd_read(vd_vhu_call_fd(e->f, 0), &v);
}

static bool call_signalled(struct env *e, int timeout_ms)
{
    struct pollfd p = { vd_vhu_call_fd(e->f, 0), POLLIN, 0 };
    return poll(&p, 1, timeout_ms) == 1;
}

/* Write one block and wait until the back-end has returned it in the used
 * ring, without taking it from there: the driver has not seen it yet. With
 * EVENT_IDX, used_event stays at the index before that completion. */
static void complete_unseen(struct env *e, uint8_t fill)
{
    size_t size;
    uint8_t *buf = vd_vhu_buf(e->f, &size);
    memset(buf, fill, 4096);
    struct vd_vhu_io io = { .op = VD_VHU_WRITE, .off = 8192, .len = 4096, .buf = buf };
    assert_int_equal(vd_vhu_submit(e->f, 0, &io), 0);
    vd_vhu_kick(e->f, 0);
    /* (a signal alone proves nothing: one may come when the ring starts) */
    bool there = false;
    for (int i = 0; i < 100 && !(there = vd_vhu_arm(e->f, 0)); i++) vd_vhu_wait(e->f, 0, 100);
    assert_true(there);
}

static void restart_with_unsignalled_completion(void **state, bool event_idx)
{
    struct env *e = *state;
    struct vd_vhu_opts fo = { .num_queues = 1, .queue_size = 16, .buf_size = 1 << 20,
                              .no_event_idx = !event_idx };
    serve(e);
    assert_int_equal(vd_vhu_connect(e->sock, &fo, &e->f), 0);
    assert_int_equal(!!(vd_vhu_features(e->f) & VHU_BIT(VIRTIO_RING_F_EVENT_IDX)), event_idx);
    complete_unseen(e, 0x5a);
    /* The back-end goes away; the signal it sent is dropped, as if it had
     * died between the used-ring update and eventfd_write. */
    vd_vhost_blk_free(e->b);
    e->b = NULL;
    drain_call(e);
    serve(e);
    assert_int_equal(vd_vhu_reconnect(e->f, 5000), 0);
    /* Generous: the signal is due when the ring starts, not after a delay. */
    assert_true(call_signalled(e, 10000));
    struct vd_vhu_done done[4];
    assert_int_equal(vd_vhu_reap(e->f, 0, done, 4), 1);
    assert_int_equal(done[0].status, 0);
    assert_int_equal(vd_vhu_pending(e->f, 0), 0);
}

static void restart_signals_unseen_completion_event_idx(void **state)
{
    restart_with_unsignalled_completion(state, true);
}

static void restart_signals_unseen_completion_no_event_idx(void **state)
{
    restart_with_unsignalled_completion(state, false);
}

/* After the restart the queue goes on working: a request made afterwards
 * completes and is signalled. */
static void restart_then_more_io(void **state)
{
    struct env *e = *state;
    struct vd_vhu_opts fo = { .num_queues = 1, .queue_size = 16, .buf_size = 1 << 20 };
    serve(e);
    assert_int_equal(vd_vhu_connect(e->sock, &fo, &e->f), 0);
    complete_unseen(e, 0x11);
    vd_vhost_blk_free(e->b);
    e->b = NULL;
    drain_call(e);
    serve(e);
    assert_int_equal(vd_vhu_reconnect(e->f, 5000), 0);
    struct vd_vhu_done done[4];
    int got = 0;
    for (int i = 0; i < 100 && got < 1; i++) {
        if (vd_vhu_wait(e->f, 0, 100) == 1) got += vd_vhu_reap(e->f, 0, done, 4);
    }
    assert_int_equal(got, 1);
    drain_call(e);
    complete_unseen(e, 0x22);
    assert_int_equal(vd_vhu_reap(e->f, 0, done, 4), 1);
    assert_int_equal(done[0].status, 0);
    uint8_t back[4096];
    assert_int_equal(vd_disk_pread(e->d, back, sizeof(back), 8192), 0);
    for (size_t i = 0; i < sizeof(back); i++) assert_int_equal(back[i], 0x22);
}

/* A vring-state message of our own on the front-end's socket, waiting for
 * the back-end's acknowledgement (REPLY_ACK is negotiated). */
static void vring_state_acked(struct env *e, uint32_t req, unsigned idx, unsigned num)
{
    struct vhu_msg m = { .hdr = { req, VHU_VERSION | VHU_FLAG_NEED_REPLY, sizeof(m.state) } };
    m.state.index = idx;
    m.state.num = num;
    assert_int_equal(vhu_msg_send(vd_vhu_sock_fd(e->f), &m), 0);
    assert_int_equal(vhu_msg_recv(vd_vhu_sock_fd(e->f), &m), 0);
    assert_int_equal(m.hdr.request, req);
    assert_int_equal(m.u64, 0);
}

/* A kick that comes while the ring is disabled is taken off the eventfd
 * and dropped; enabling the ring must look at the avail ring itself, or
 * the request made meanwhile waits for a kick the driver will not repeat. */
static void kick_while_disabled_is_not_lost(void **state)
{
    struct env *e = *state;
    struct vd_vhu_opts fo = { .num_queues = 1, .queue_size = 16, .buf_size = 1 << 20 };
    serve(e);
    assert_int_equal(vd_vhu_connect(e->sock, &fo, &e->f), 0);
    vring_state_acked(e, VHU_SET_VRING_ENABLE, 0, 0);
    size_t size;
    uint8_t *buf = vd_vhu_buf(e->f, &size);
    memset(buf, 0x77, 4096);
    struct vd_vhu_io io = { .op = VD_VHU_WRITE, .off = 0, .len = 4096, .buf = buf };
    assert_int_equal(vd_vhu_submit(e->f, 0, &io), 0);
    vd_vhu_kick(e->f, 0);
    usleep(200 * 1000);     /* let the back-end take the kick (not needed to pass) */
    struct vd_vhu_done done[2];
    assert_int_equal(vd_vhu_reap(e->f, 0, done, 2), 0);    /* disabled: not served */
    vring_state_acked(e, VHU_SET_VRING_ENABLE, 0, 1);
    int got = 0;
    for (int i = 0; i < 100 && !got; i++)
        if (vd_vhu_wait(e->f, 0, 100) == 1) got = vd_vhu_reap(e->f, 0, done, 2);
    assert_int_equal(got, 1);
    assert_int_equal(done[0].status, 0);
}

/* The rule itself, on a hand-built ring: with EVENT_IDX a signal is due
 * when the entry the driver asked about (used_event) is already in the
 * used ring, not when it lies ahead; without, unless the driver set
 * VIRTQ_AVAIL_F_NO_INTERRUPT. */
static void restart_notify_rule(void **state)
{
    enum { N = 8 };
    static _Alignas(4096) uint8_t mem[3 * 4096];
    struct virtq_avail *avail = (void *)(mem + 4096);
    struct virtq_used *used = (void *)(mem + 2 * 4096);
    uint16_t *used_event = &avail->ring[N];
    struct virtq q;
    struct { uint16_t used, ev; bool due; } c[] = {
        { 0, 0, false },         /* a fresh ring */
        { 1, 0, true },          /* one returned, the driver waits for it */
        { 5, 2, true },
        { 5, 5, false },         /* the driver has seen everything */
        { 5, 7, false },         /* it asked to be told later */
        { 2, 65534, true },      /* across the wrap */
        { 65535, 65535, false },
        { 20, 3, false },        /* more than a ring behind: not a request */
    };
    for (size_t i = 0; i < sizeof(c) / sizeof(c[0]); i++) {
        memset(mem, 0, sizeof(mem));
        used->idx = c[i].used;
        *used_event = c[i].ev;
        assert_int_equal(virtq_init(&q, N, mem, avail, used, NULL, true, c[i].used), 0);
        assert_int_equal(virtq_restart_should_notify(&q), c[i].due);
    }
    memset(mem, 0, sizeof(mem));
    assert_int_equal(virtq_init(&q, N, mem, avail, used, NULL, false, 0), 0);
    assert_true(virtq_restart_should_notify(&q));
    avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
    assert_false(virtq_restart_should_notify(&q));
}

int main(void)
{
    const struct CMUnitTest t[] = {
        cmocka_unit_test(restart_notify_rule),
        cmocka_unit_test_setup_teardown(restart_signals_unseen_completion_event_idx, setup, teardown),
        cmocka_unit_test_setup_teardown(restart_signals_unseen_completion_no_event_idx, setup, teardown),
        cmocka_unit_test_setup_teardown(restart_then_more_io, setup, teardown),
        cmocka_unit_test_setup_teardown(kick_while_disabled_is_not_lost, setup, teardown),
    };
    return cmocka_run_group_tests(t, NULL, NULL);
}

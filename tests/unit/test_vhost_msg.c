/* vhost-user message framing: round trips with file descriptors, replies,
 * and what a hostile peer can send (oversized payloads, truncated
 * messages, too many fds, EOF). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include "vmm-glue/vhost_proto.h"

static int sv[2];

static int setup(void **state)
{
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    return 0;
}

static int teardown(void **state)
{
    close(sv[0]);
    close(sv[1]);
    return 0;
}

static void test_round_trip_with_fds(void **state)
{
    struct vhu_msg m = { .hdr = { VHU_SET_MEM_TABLE, VHU_VERSION, 8 + 2 * sizeof(struct vhu_region) } }, r;
    m.mem.nregions = 2;
    m.mem.r[1].gpa = 0x1234;
    m.fds[0] = eventfd(0, 0);
    m.fds[1] = eventfd(0, 0);
    m.nfds = 2;
    assert_int_equal(vhu_msg_send(sv[0], &m), 0);
    assert_int_equal(vhu_msg_recv(sv[1], &r), 0);
    assert_int_equal(r.hdr.request, VHU_SET_MEM_TABLE);
    assert_int_equal(r.hdr.size, m.hdr.size);
    assert_int_equal(r.mem.nregions, 2);
    assert_int_equal(r.mem.r[1].gpa, 0x1234);
    assert_int_equal(r.nfds, 2);
    /* the received fds are live and distinct from ours */
    assert_int_equal(eventfd_write(r.fds[0], 5), 0);
    eventfd_t v;
    assert_int_equal(eventfd_read(m.fds[0], &v), 0);
    assert_int_equal(v, 5);
    vhu_msg_close_fds(&r);
    assert_int_equal(r.nfds, 0);
    close(m.fds[0]);
    close(m.fds[1]);
}

static void test_empty_payload(void **state)
{
    struct vhu_msg m = { .hdr = { VHU_SET_OWNER, VHU_VERSION, 0 } }, r;
    assert_int_equal(vhu_msg_send(sv[0], &m), 0);
    assert_int_equal(vhu_msg_recv(sv[1], &r), 0);
    assert_int_equal(r.hdr.request, VHU_SET_OWNER);
    assert_int_equal(r.hdr.size, 0);
    assert_int_equal(r.nfds, 0);
}

static void test_oversized_payload(void **state)
{
    struct vhu_hdr h = { VHU_SET_CONFIG, VHU_VERSION, VHU_MAX_PAYLOAD + 1 };
    struct vhu_msg r;
    assert_int_equal(write(sv[0], &h, sizeof(h)), sizeof(h));
    assert_int_equal(vhu_msg_recv(sv[1], &r), -EMSGSIZE);
    /* and a sender refuses to build one */
    struct vhu_msg m = { .hdr = { VHU_SET_CONFIG, VHU_VERSION, VHU_MAX_PAYLOAD + 1 } };
    assert_int_equal(vhu_msg_send(sv[0], &m), -EINVAL);
}

static void test_truncated(void **state)
{
    struct vhu_hdr h = { VHU_SET_FEATURES, VHU_VERSION, 8 };
    struct vhu_msg r;
    assert_int_equal(write(sv[0], &h, sizeof(h)), sizeof(h));
    assert_int_equal(write(sv[0], "abc", 3), 3);
    close(sv[0]);
    sv[0] = open("/dev/null", O_RDONLY);
    assert_int_equal(vhu_msg_recv(sv[1], &r), -EPIPE);
    close(sv[1]);
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
}

static void test_eof(void **state)
{
    struct vhu_msg r;
    close(sv[0]);
    sv[0] = open("/dev/null", O_RDONLY);
    assert_int_equal(vhu_msg_recv(sv[1], &r), -EPIPE);
}

/* More fds than a message can carry: refused (the connection is dropped),
 * and none of them is kept open. */
static void test_too_many_fds(void **state)
{
    int fds[VHU_MAX_FDS + 4];
    char cbuf[CMSG_SPACE(sizeof(fds))];
    struct vhu_hdr h = { VHU_SET_MEM_TABLE, VHU_VERSION, 0 };
    struct iovec iov = { &h, sizeof(h) };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
    for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++) fds[i] = eventfd(0, 0);
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(fds));
    memcpy(CMSG_DATA(c), fds, sizeof(fds));
    assert_int_equal(sendmsg(sv[0], &mh, 0), sizeof(h));
    struct vhu_msg r;
    assert_int_equal(vhu_msg_recv(sv[1], &r), -EMSGSIZE);
    assert_int_equal(r.nfds, 0);
    for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++) close(fds[i]);
}

static void test_inflight_layout(void **state)
{
    /* the region layout vhost-user.rst gives for split rings */
    assert_int_equal(sizeof(struct vhu_inflight_desc), 16);
    assert_int_equal(offsetof(struct vhu_inflight_queue, desc), 16);
    assert_int_equal(vhu_inflight_queue_size(128), (16 + 128 * 16 + 63) / 64 * 64);
    assert_int_equal(vhu_inflight_queue_size(1) % 64, 0);
    assert_int_equal(sizeof(struct vhu_inflight), 24);
    assert_int_equal(sizeof(struct vhu_vring_addr), 40);
    assert_int_equal(sizeof(struct vhu_mem_single), 40);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)
        T(test_round_trip_with_fds), T(test_empty_payload), T(test_oversized_payload),
        T(test_truncated), T(test_eof), T(test_too_many_fds), T(test_inflight_layout),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

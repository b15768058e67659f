/* For the unit tests that drive vd_io requests through a vd_loop: a
 * request that marks itself done and counts down its test's pending
 * counter, and a runner that turns the loop until nothing is pending.
 * Include after <cmocka.h>. */
#ifndef VDISK_TEST_LOOP_REQ_H
#define VDISK_TEST_LOOP_REQ_H
#include <stdbool.h>
#include <sys/uio.h>
#include "vdisk/engine.h"
#include "vdisk/loop.h"

struct req {
    struct vd_io io;
    struct iovec iov[4];
    int res;
    bool done;
    int *pending;
};

static inline void req_done(struct vd_io *io, int res)
{
    struct req *r = (struct req *)io;
    r->res = res;
    r->done = true;
    (*r->pending)--;
}

static inline void run_until(struct vd_loop *l, int *pending)
{
    for (int i = 0; *pending > 0 && i < 100000; i++)
        assert_true(vd_loop_run_once(l, 1000) >= 0);
    assert_int_equal(*pending, 0);
}

#endif

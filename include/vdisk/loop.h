/* The event loop: one per thread, each with its own I/O engine. Watches
 * file descriptors (sockets, eventfds), runs posted work and timers, and
 * reaps I/O completions. No locks are needed for anything owned by a loop. */
#ifndef VDISK_LOOP_H
#define VDISK_LOOP_H

#include <stdint.h>
#include "engine.h"

struct vd_loop;
typedef void (*vd_fd_cb)(struct vd_loop *loop, int fd, uint32_t events, void *opaque);
typedef void (*vd_fn)(void *opaque);

/* Create a loop for the calling thread (it becomes vd_loop_current()). */
int  vd_loop_new(enum vd_aio aio, struct vd_loop **out);
void vd_loop_free(struct vd_loop *loop);
/* The calling thread's loop; creates one (aio=default) on first use. */
struct vd_loop *vd_loop_current(void);
const char *vd_loop_engine_name(struct vd_loop *loop);

/* events: EPOLLIN / EPOLLOUT (level-triggered). */
int  vd_loop_add_fd(struct vd_loop *loop, int fd, uint32_t events, vd_fd_cb cb, void *opaque);
int  vd_loop_mod_fd(struct vd_loop *loop, int fd, uint32_t events);
void vd_loop_del_fd(struct vd_loop *loop, int fd);

/* Thread-safe: run fn(opaque) on the loop's thread soon. */
void vd_loop_post(struct vd_loop *loop, vd_fn fn, void *opaque);
/* A posted call that needs no allocation and no lock, for completions
 * handed over from other threads (librbd's callbacks, worker threads): the
 * caller owns the node (embedded in the object it concerns) until fn runs. */
struct vd_post_node {
    vd_fn fn;
    void *opaque;
    struct vd_post_node *next;      /* loop-private */
};
/* Thread-safe: run node->fn(node->opaque) on the loop's thread soon. Nodes
 * pushed by one thread run in the order pushed. Only a push that finds the
 * queue empty while the loop sleeps wakes it (one eventfd write): a burst of
 * completions costs one wake-up, and none while the loop is busy anyway. */
void vd_loop_post_node(struct vd_loop *loop, struct vd_post_node *node);
/* One-shot timer on the loop's thread; returns an id for vd_loop_cancel_timer. */
uint64_t vd_loop_timer(struct vd_loop *loop, uint64_t ms, vd_fn fn, void *opaque);
void vd_loop_cancel_timer(struct vd_loop *loop, uint64_t id);

/* Submit host I/O on this loop (must be called on the loop's thread). */
void vd_loop_submit_io(struct vd_loop *loop, struct vd_io *io);
/* Push the I/O submitted so far to the kernel now instead of at the end of
 * this loop iteration (loop thread only). */
void vd_loop_flush(struct vd_loop *loop);

/* Wait up to timeout_ms (-1 = forever) and process what is ready. */
int  vd_loop_run_once(struct vd_loop *loop, int timeout_ms);
/* Run until vd_loop_stop() (thread-safe). */
void vd_loop_run(struct vd_loop *loop);
void vd_loop_stop(struct vd_loop *loop);

/* Polling: while the loop's engine has I/O in flight, look for events
 * without sleeping for up to max_ns before blocking; the window adapts to
 * how soon events come (see loop.c). 0 turns it off. Loops start with it
 * off, or with VDISK_POLL_NS (nanoseconds) from the environment.
 * vd_loop_enable_poll: VD_LOOP_POLL_NS_DEFAULT, unless VDISK_POLL_NS is set
 * (servers call it for the loops their connections run on). */
#define VD_LOOP_POLL_NS_DEFAULT 500000u
#define VD_LOOP_POLL_MAX_NS     10000000u
void vd_loop_set_poll(struct vd_loop *loop, uint64_t max_ns);
void vd_loop_enable_poll(struct vd_loop *loop);
uint64_t vd_loop_get_poll(struct vd_loop *loop);     /* the max_ns in force */
/* Inline reads: reads of buffered (not O_DIRECT) local files submitted on
 * this loop are first tried with preadv2(RWF_NOWAIT) at the loop's next
 * flush point and completed there when the page cache holds them; the
 * others go to the engine as before (see loop.c). Off unless enabled;
 * VDISK_INLINE_READS=0 in the environment keeps it off. */
void vd_loop_enable_inline_reads(struct vd_loop *loop);
/* VDISK_POLL_NS: 0 when unset, 1 with *ns set, -EINVAL (vd_err message)
 * when it is not a number of nanoseconds up to VD_LOOP_POLL_MAX_NS. */
int vd_loop_poll_env(uint64_t *ns);

/* Run fn(opaque) on a worker thread (shared pool), then done(opaque) on this
 * loop's thread: for slow, synchronous work (compression, metadata I/O). */
void vd_loop_offload(struct vd_loop *loop, vd_fn fn, vd_fn done, void *opaque);

#endif

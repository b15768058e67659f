/* Shared between block/disk.c (opening, chains, status) and block/request.c
 * (the asynchronous data path). Not a public header. */
#ifndef VDISK_DISK_INTERNAL_H
#define VDISK_DISK_INTERNAL_H

#include "vdisk/block.h"

struct gate_wait;
struct plan;

struct vd_disk {
    struct vd_layer *top;
    int depth;
    bool readonly;
    struct vd_open_opts opts;
    /* When a layer's file is remote (rbd:, nbd://), every call into the
     * formats runs on the worker pool (request.c, "planning on a worker"
     * and "the gate"), so that no loop thread waits on metadata I/O over
     * the network or on a layer lock held across it. The format's discard,
     * zero and flush wait for the requests in flight, run alone, and
     * requests that arrive meanwhile queue here. */
    bool gated;
    bool remote;                /* some layer's file is remote (gated or not) */
    pthread_mutex_t gate_lock;
    int gate_active;            /* requests admitted and not finished */
    bool gate_meta;             /* a metadata op owns the disk */
    struct gate_wait *gate_head, **gate_tail;
    struct plan *plan_head, **plan_tail;    /* planning queue, under gate_lock */
    bool planning;              /* a worker job is draining it */
};

/* Set up and tear down the gate (vd_disk_open / vd_disk_close). */
void vd_disk_gate_init(struct vd_disk *d);
void vd_disk_gate_fini(struct vd_disk *d);

/* One allocation in flight in a layer: allocating writes that touch
 * [start, end) wait until it is committed. */
struct vd_inflight {
    uint64_t start, end;
    struct waiter *waiters;
    struct vd_inflight *next;
};

/* Flush one layer's metadata and sync its file (synchronously). */
int vd_layer_flush_sync(struct vd_layer *l);
/* vd_disk_resize's work, on the calling thread (a worker for remote disks). */
int vd_disk_resize_now(struct vd_disk *d, uint64_t size, enum vd_prealloc prealloc);

/* Core-private request ops, just past the public enum vd_op (kept small,
 * within the values the enum can hold): block status and resize of disks
 * with remote layers travel as requests, so that the gate orders them with
 * the rest (request.c). A new public op goes before these. */
#define VD_OP_STATUS_ ((enum vd_op)(VD_OP_WRITE_ZEROES + 1))
#define VD_OP_RESIZE_ ((enum vd_op)(VD_OP_WRITE_ZEROES + 2))

#endif

/* Shared between block/disk.c (opening, chains, status) and block/request.c
 * (the asynchronous data path). Not a public header. */
#ifndef VDISK_DISK_INTERNAL_H
#define VDISK_DISK_INTERNAL_H

#include "vdisk/block.h"

struct vd_disk {
    struct vd_layer *top;
    int depth;
    bool readonly;
    struct vd_open_opts opts;
};

/* One allocation in flight in a layer: allocating writes that touch
 * [start, end) wait until it is committed. */
struct vd_inflight {
    uint64_t start, end;
    struct waiter *waiters;
    struct vd_inflight *next;
};

/* Flush one layer's metadata and sync its file (synchronously). */
int vd_layer_flush_sync(struct vd_layer *l);

#endif

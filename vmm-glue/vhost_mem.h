/* The guest memory table of one vhost-user connection: regions mapped from
 * the front-end's fds, and the address translation every guest pointer goes
 * through. A table is immutable once built and reference-counted: a queue
 * and each request in flight hold the table they translated with, so a
 * SET_MEM_TABLE / REM_MEM_REG never unmaps memory an I/O still targets. */
#ifndef VMM_GLUE_VHOST_MEM_H
#define VMM_GLUE_VHOST_MEM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "vmm-glue/vhost_proto.h"

#define VHU_MAX_MEM_SLOTS 32

struct vhu_mapping;     /* one mmap of a front-end fd, shared by tables */

struct vhu_mreg {
    uint64_t gpa, size, uaddr;
    uint8_t *host;                 /* host address of gpa */
    struct vhu_mapping *map;
};

struct vhu_mtab {
    int refs;                      /* atomic */
    int n;
    struct vhu_mreg r[VHU_MAX_MEM_SLOTS];
};

struct vhu_mtab *vhu_mtab_new(void);
struct vhu_mtab *vhu_mtab_ref(struct vhu_mtab *t);
void vhu_mtab_unref(struct vhu_mtab *t);
/* Map region r from fd (the fd is not kept) and add it to t (not yet
 * shared). Rejects empty, overflowing, overlapping regions and regions past
 * the end of the file. */
int  vhu_mtab_add(struct vhu_mtab *t, int fd, const struct vhu_region *r);
/* A new table holding t's regions (mappings shared), except the one
 * matching r's guest address and size when drop is given. */
struct vhu_mtab *vhu_mtab_copy(const struct vhu_mtab *t, const struct vhu_region *drop, bool *found);

/* Host address of guest-physical [gpa, gpa+len) when it lies in one region
 * (NULL otherwise). */
void *vhu_gpa(const struct vhu_mtab *t, uint64_t gpa, uint64_t len);
/* Host address of gpa and how many bytes (<= len) follow it in the same
 * region, for buffers that span regions. NULL when gpa is unmapped. */
void *vhu_gpa_part(const struct vhu_mtab *t, uint64_t gpa, uint64_t len, uint64_t *avail);
/* Same for front-end user addresses (ring addresses in SET_VRING_ADDR). */
void *vhu_uva(const struct vhu_mtab *t, uint64_t uaddr, uint64_t len);

#endif

/* The dirty-page log of live migration (vhost-user.rst, "Migration"): a
 * bitmap the front-end shares (SET_LOG_BASE with LOG_SHMFD), one bit per
 * 4 KiB page of guest physical memory, bit n in byte n / 8 at position
 * n % 8. While the front-end has VHOST_F_LOG_ALL on, every write the
 * back-end makes to guest memory sets the bits of the pages it touched,
 * with atomic OR because the front-end (and other queues) change the same
 * bytes at the same time. */
#ifndef VMM_GLUE_VHOST_LOG_H
#define VMM_GLUE_VHOST_LOG_H

#include <stdint.h>
#include <sys/uio.h>
#include "vmm-glue/vhost_mem.h"

#define VHU_LOG_PAGE 4096u
/* the VHOST_VRING_F_LOG flag of SET_VRING_ADDR: log used-ring writes */
#define VHU_VRING_F_LOG 0x1u
/* the largest bitmap accepted: enough for 16 TiB of guest memory */
#define VHU_LOG_MAX_BYTES (1ull << 29)

struct vhu_log {
    uint8_t *bits;
    uint64_t size;         /* bytes of bitmap: pages [0, 8 * size) */
    void *map;
    size_t map_len;
    uint64_t dropped;      /* marks past the bitmap's end (atomic) */
};

/* Map size bytes at offset of fd (checked against the file's size). */
int  vhu_log_map(int fd, uint64_t size, uint64_t offset, struct vhu_log **out);
void vhu_log_free(struct vhu_log *l);
/* Set the bits of the pages of guest-physical [gpa, gpa + len). Pages past
 * the bitmap are counted in l->dropped, never written. */
void vhu_log_mark(struct vhu_log *l, uint64_t gpa, uint64_t len);
/* The same for host memory inside table t's regions (a buffer the back-end
 * wrote through a translated pointer); memory outside them is ignored. */
void vhu_log_host(struct vhu_log *l, const struct vhu_mtab *t, const void *p, uint64_t len);
void vhu_log_iov(struct vhu_log *l, const struct vhu_mtab *t, const struct iovec *iov, unsigned n);

#endif

/* Dirty-page log: mapping the front-end's bitmap and marking pages. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include "vdisk/error.h"
#include "vmm-glue/vhost_log.h"

int vhu_log_map(int fd, uint64_t size, uint64_t offset, struct vhu_log **out)
{
    struct stat st;
    uint64_t end;
    if (!size || size > VHU_LOG_MAX_BYTES || __builtin_add_overflow(size, offset, &end))
        return vd_err(-EINVAL, "SET_LOG_BASE: bad log size %llu at offset %llu",
                      (unsigned long long)size, (unsigned long long)offset);
    if (fstat(fd, &st) < 0) return vd_err(-errno, "SET_LOG_BASE: log fd: %m");
    if ((uint64_t)st.st_size < end)
        return vd_err(-EINVAL, "SET_LOG_BASE: log of %llu bytes at offset %llu ends past its file (%llu bytes)",
                      (unsigned long long)size, (unsigned long long)offset,
                      (unsigned long long)st.st_size);
    struct vhu_log *l = calloc(1, sizeof(*l));
    if (!l) return -ENOMEM;
    /* map from the page the offset falls in */
    uint64_t start = offset & ~(uint64_t)(VHU_LOG_PAGE - 1);
    l->map_len = end - start;
    l->map = mmap(NULL, l->map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)start);
    if (l->map == MAP_FAILED) {
        int e = -errno;
        free(l);
        return vd_err(e, "SET_LOG_BASE: mmap of the log: %s", strerror(-e));
    }
    l->bits = (uint8_t *)l->map + (offset - start);
    l->size = size;
    *out = l;
    return 0;
}

void vhu_log_free(struct vhu_log *l)
{
    if (!l) return;
    munmap(l->map, l->map_len);
    free(l);
}

void vhu_log_mark(struct vhu_log *l, uint64_t gpa, uint64_t len)
{
    if (!len) return;
    uint64_t first = gpa / VHU_LOG_PAGE, last;
    if (gpa + (len - 1) < gpa) last = UINT64_MAX / VHU_LOG_PAGE;   /* wraps: to the end */
    else last = (gpa + (len - 1)) / VHU_LOG_PAGE;
    uint64_t limit = l->size * 8;            /* pages the bitmap covers */
    if (last >= limit) {
        __atomic_add_fetch(&l->dropped, 1, __ATOMIC_RELAXED);
        if (first >= limit) return;
        last = limit - 1;
    }
    /* byte by byte: one atomic OR for up to 8 pages */
    for (uint64_t byte = first / 8; byte <= last / 8; byte++) {
        unsigned lo = byte == first / 8 ? first % 8 : 0;
        unsigned hi = byte == last / 8 ? last % 8 : 7;
        uint8_t mask = (uint8_t)((0xffu >> (7 - hi)) & (0xffu << lo));
        __atomic_fetch_or(&l->bits[byte], mask, __ATOMIC_RELAXED);
    }
}

void vhu_log_host(struct vhu_log *l, const struct vhu_mtab *t, const void *p, uint64_t len)
{
    const uint8_t *h = p;
    for (int i = 0; i < t->n && len; i++) {
        const struct vhu_mreg *g = &t->r[i];
        if (h < g->host || (uint64_t)(h - g->host) >= g->size) continue;
        uint64_t off = (uint64_t)(h - g->host), n = g->size - off;
        if (n > len) n = len;
        vhu_log_mark(l, g->gpa + off, n);
        /* a buffer never spans regions (each segment is mapped from one),
         * but go on with the rest should one ever do so */
        h += n;
        len -= n;
        i = -1;
    }
}

void vhu_log_iov(struct vhu_log *l, const struct vhu_mtab *t, const struct iovec *iov, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        vhu_log_host(l, t, iov[i].iov_base, iov[i].iov_len);
}

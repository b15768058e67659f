/* Guest memory table: mapping and bounds-checked translation. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include "vdisk/error.h"
#include "vmm-glue/vhost_mem.h"

struct vhu_mapping {
    int refs;
    void *addr;
    size_t len;
};

static void mapping_unref(struct vhu_mapping *m)
{
    if (m && __atomic_sub_fetch(&m->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        munmap(m->addr, m->len);
        free(m);
    }
}

struct vhu_mtab *vhu_mtab_new(void)
{
    struct vhu_mtab *t = calloc(1, sizeof(*t));
    if (t) t->refs = 1;
    return t;
}

struct vhu_mtab *vhu_mtab_ref(struct vhu_mtab *t)
{
    if (t) __atomic_add_fetch(&t->refs, 1, __ATOMIC_RELAXED);
    return t;
}

void vhu_mtab_unref(struct vhu_mtab *t)
{
    if (!t || __atomic_sub_fetch(&t->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
    for (int i = 0; i < t->n; i++) mapping_unref(t->r[i].map);
    free(t);
}

static bool overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

int vhu_mtab_add(struct vhu_mtab *t, int fd, const struct vhu_region *r)
{
    uint64_t end;
    struct stat st;

    if (t->n >= VHU_MAX_MEM_SLOTS)
        return vd_err(-ENOSPC, "vhost-user: more than %d memory regions", VHU_MAX_MEM_SLOTS);
    if (!r->size || __builtin_add_overflow(r->gpa, r->size, &end) ||
        __builtin_add_overflow(r->uaddr, r->size, &end) ||
        __builtin_add_overflow(r->mmap_offset, r->size, &end) || end > (uint64_t)SIZE_MAX / 2)
        return vd_err(-EINVAL, "vhost-user: bad memory region gpa 0x%llx size 0x%llx",
                      (unsigned long long)r->gpa, (unsigned long long)r->size);
    for (int i = 0; i < t->n; i++)
        if (overlaps(r->gpa, r->size, t->r[i].gpa, t->r[i].size) ||
            overlaps(r->uaddr, r->size, t->r[i].uaddr, t->r[i].size))
            return vd_err(-EINVAL, "vhost-user: memory region at gpa 0x%llx overlaps another",
                          (unsigned long long)r->gpa);
    /* Touching a shared mapping past the end of its file raises SIGBUS. */
    if (fstat(fd, &st) < 0) return vd_err(-errno, "vhost-user: memory fd: %m");
    if ((uint64_t)st.st_size < end)
        return vd_err(-EINVAL, "vhost-user: memory region at gpa 0x%llx ends past its file (%llu < %llu)",
                      (unsigned long long)r->gpa, (unsigned long long)st.st_size,
                      (unsigned long long)end);
    struct vhu_mapping *m = calloc(1, sizeof(*m));
    if (!m) return -ENOMEM;
    m->len = end;
    m->addr = mmap(NULL, m->len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m->addr == MAP_FAILED) {
        int e = -errno;
        free(m);
        return vd_err(e, "vhost-user: mmap of memory region at gpa 0x%llx: %s",
                      (unsigned long long)r->gpa, strerror(-e));
    }
    m->refs = 1;
    struct vhu_mreg *g = &t->r[t->n++];
    g->gpa = r->gpa; g->size = r->size; g->uaddr = r->uaddr;
    g->host = (uint8_t *)m->addr + r->mmap_offset;
    g->map = m;
    return 0;
}

struct vhu_mtab *vhu_mtab_copy(const struct vhu_mtab *t, const struct vhu_region *drop, bool *found)
{
    struct vhu_mtab *n = vhu_mtab_new();
    if (!n) return NULL;
    if (found) *found = false;
    for (int i = 0; t && i < t->n; i++) {
        if (drop && t->r[i].gpa == drop->gpa && t->r[i].size == drop->size) {
            if (found) *found = true;
            continue;
        }
        n->r[n->n] = t->r[i];
        __atomic_add_fetch(&n->r[n->n].map->refs, 1, __ATOMIC_RELAXED);
        n->n++;
    }
    return n;
}

void *vhu_gpa_part(const struct vhu_mtab *t, uint64_t gpa, uint64_t len, uint64_t *avail)
{
    for (int i = 0; i < t->n; i++) {
        const struct vhu_mreg *g = &t->r[i];
        if (gpa >= g->gpa && gpa - g->gpa < g->size) {
            uint64_t left = g->size - (gpa - g->gpa);
            *avail = len < left ? len : left;
            return g->host + (gpa - g->gpa);
        }
    }
    return NULL;
}

void *vhu_gpa(const struct vhu_mtab *t, uint64_t gpa, uint64_t len)
{
    uint64_t avail;
    void *p = vhu_gpa_part(t, gpa, len, &avail);
    return p && avail == len ? p : NULL;
}

void *vhu_uva(const struct vhu_mtab *t, uint64_t uaddr, uint64_t len)
{
    for (int i = 0; i < t->n; i++) {
        const struct vhu_mreg *g = &t->r[i];
        if (uaddr >= g->uaddr && uaddr - g->uaddr < g->size &&
            len <= g->size - (uaddr - g->uaddr))
            return g->host + (uaddr - g->uaddr);
    }
    return NULL;
}

/* The raw format: virtual offset = host offset. Block status comes from the
 * file system (SEEK_DATA / SEEK_HOLE); discard punches holes; write-zeroes
 * punches or zero-ranges without writing where the file system can. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "vdisk/error.h"
#include "vdisk/format.h"

static int raw_open(struct vd_layer *l)
{
    uint64_t size;
    int r = vd_file_size(l->file, &size);
    if (r < 0)
        return r;
    l->size = size;
    l->alloc_unit = 0;
    return 0;
}

static void raw_close(struct vd_layer *l)
{
}

static int raw_map(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags, struct vd_map *m)
{
    m->file = l->file;
    m->host_off = off;
    m->len = len;
    m->kind = VD_MAP_DATA;
    if (flags & VD_MAP_F_STATUS)
        vd_map_file_status(m);
    /* otherwise: holes read as zeros anyway, and one read is cheaper */
    return 0;
}

static int raw_discard(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags)
{
    return vd_file_punch(l->file, off, len);
}

static int raw_zero(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags)
{
    int r = -ENOTSUP;
    if (flags & VD_REQ_MAY_UNMAP)
        r = vd_file_punch(l->file, off, len);
    if (r == -ENOTSUP)
        r = vd_file_zero(l->file, off, len);
    return r;
}

static int write_zeros(struct vd_file *f, uint64_t off, uint64_t len)
{
    size_t chunk = 1 << 20;
    void *z = vd_alloc_aligned(chunk);
    if (!z)
        return -ENOMEM;
    memset(z, 0, chunk);
    int r = 0;
    while (len && r == 0) {
        size_t n = len < chunk ? (size_t)len : chunk;
        r = vd_file_pwrite(f, z, n, off);
        off += n;
        len -= n;
    }
    free(z);
    return r;
}

/* Provision [from, to) of f as asked: reserve, or reserve and write zeros. */
static int provision(struct vd_file *f, uint64_t from, uint64_t to, enum vd_prealloc p)
{
    if (to <= from)
        return 0;
    switch (p) {
    case VD_PREALLOC_OFF:
        return 0;
    case VD_PREALLOC_METADATA:
        return vd_err(-EINVAL, "%s: preallocation=metadata is not supported for raw images "
                      "(use falloc or full)", f->name);
    case VD_PREALLOC_FALLOC: {
        int r = vd_file_allocate(f, from, to - from);
        if (r == -ENOTSUP)
            return vd_err(r, "%s: the file system cannot reserve space (preallocation=falloc); "
                          "use preallocation=full", f->name);
        return r;
    }
    case VD_PREALLOC_FULL: {
        int r = vd_file_allocate(f, from, to - from);   /* contiguous where possible */
        if (r < 0 && r != -ENOTSUP)
            return r;
        return write_zeros(f, from, to - from);
    }
    }
    return -EINVAL;
}

static int raw_create(const char *filename, const struct vd_create_opts *o)
{
    struct vd_file *f;
    int r = vd_file_open(filename, VD_FILE_CREATE | VD_FILE_TRUNC | VD_FILE_NOLOCK,
                         VD_CACHE_WRITEBACK, &f);
    if (r < 0)
        return r;
    if (o->backing) {
        vd_file_close(f);
        return vd_err(-EINVAL, "%s: raw images cannot have a backing file", filename);
    }
    r = vd_file_truncate(f, o->size);
    if (r == 0)
        r = provision(f, 0, o->size, o->prealloc);
    if (r == 0 && o->prealloc != VD_PREALLOC_OFF)
        r = vd_file_sync(f);
    vd_file_close(f);
    return r;
}

static int raw_resize(struct vd_layer *l, uint64_t size, enum vd_prealloc p)
{
    uint64_t old = l->size;
    if (size > old && p == VD_PREALLOC_METADATA)
        return provision(l->file, old, size, p);
    int r = vd_file_truncate(l->file, size);
    if (r == 0 && size > old)
        r = provision(l->file, old, size, p);
    if (r == 0)
        l->size = size;
    return r;
}

static int raw_info(struct vd_layer *l, json_t *info)
{
    return 0;
}

static const struct vd_create_opt_desc raw_create_opts[] = {
    {"preallocation", "off, falloc or full (also provisioning=thin|lazy-zeroed|eager-zeroed)"},
    {"provisioning", "thin, lazy-zeroed or eager-zeroed"},
    {NULL, NULL},
};

const struct vd_format vd_format_raw = {
    .name = "raw",
    .identity_map = true,
    .open = raw_open,
    .close = raw_close,
    .create = raw_create,
    .map = raw_map,
    .discard = raw_discard,
    .zero = raw_zero,
    .resize = raw_resize,
    .info = raw_info,
    .create_opts = raw_create_opts,
};

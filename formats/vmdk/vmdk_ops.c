/* VMDK operations beyond read and write: write-zeroes, discard, resize.
 *
 * Write-zeroes: a whole grain of a sparse extent whose header has the
 * zeroed-grain flag (version 2 and later) gets the zeroed-grain entry
 * (GTE 1), in both grain tables, and reads as zeros without a grain (an
 * allocated grain it replaces is punched out when unmapping is allowed).
 * Parts of grains that hold data are zeroed in place; parts that hold
 * nothing read as zeros already, unless the disk is a delta disk (they
 * read the parent then). Flat extents are zeroed in their file, ZERO
 * extents need nothing. What cannot be done so (compressed extents, parts
 * of grains of a delta disk that its parent supplies, grains being
 * written) is refused as a whole with -ENOTSUP before anything changes,
 * and the core writes zeros instead.
 *
 * Resize: a single-extent disk. A flat extent's file grows or shrinks; a
 * hosted sparse extent changes its capacity within what its grain
 * directory covers (the directory and its tables are laid out at create
 * time and cannot grow in place), and shrinks only over grains that hold
 * nothing. qemu-img 7.2 resizes no VMDK at all. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "vdisk/error.h"
#include "vdisk/format.h"
#include "formats/vmdk/vmdk.h"

static const char *lname(struct vd_layer *l) { return l->filename ? l->filename : "?"; }

/* Zeros in [off, off+len) of f: punched (unmap) or zeroed in place, else
 * written. */
static int file_zero(struct vd_layer *l, struct vd_file *f, uint64_t off, uint64_t len, bool unmap,
                     bool fast)
{
    int r = vd_file_zero_range(f, off, len, unmap, fast);
    if (r < 0 && !(fast && r == -ENOTSUP))
        return vd_err(r, "%s: cannot zero %llu bytes at offset %llu of %s", lname(l),
                      (unsigned long long)len, (unsigned long long)off, f->name);
    return r;
}

static bool is_delta(struct vd_layer *l)
{
    struct vmdk *s = l->priv;
    return s->desc.parent_cid != 0xFFFFFFFFu || l->backing_name;
}

enum zmode { Z_CHECK, Z_ZERO, Z_DISCARD };

/* [rel, rel+n) of sparse extent e (bytes from the extent's start). */
static int sparse_piece(struct vd_layer *l, struct vmdk_extent *e, uint64_t rel, uint64_t n,
                        unsigned flags, enum zmode mode)
{
    struct vmdk *s = l->priv;
    struct vmdk_sparse *sp = e->sp;
    const char *en = e->path ? e->path : lname(l);
    size_t ei = (size_t)(e - s->ext);
    uint64_t gb = sp->grain * VMDK_SECTOR, ebytes = e->sectors * VMDK_SECTOR;
    bool unmap = flags & VD_REQ_MAY_UNMAP, fast = flags & VD_REQ_FAST_ZERO;
    if (mode == Z_CHECK && (e->access != VMDK_RW || sp->compressed || sp->cowd))
        return -ENOTSUP;
    if (mode == Z_DISCARD && (e->access != VMDK_RW || sp->compressed || sp->cowd))
        return 0;
    while (n) {
        uint64_t g = rel / gb, in = rel % gb;
        uint64_t gend = (g + 1) * gb < ebytes ? (g + 1) * gb : ebytes;
        uint64_t k = gend - rel < n ? gend - rel : n;
        bool whole = in == 0 && rel + k == gend;
        uint32_t gte;
        int r = vd_vmdk_sparse_gte(en, e->file, sp, g, &gte);
        if (r < 0)
            return r;
        bool data = gte > 1 || (gte == 1 && !sp->zero_gte);
        bool zeroed = gte == 1 && sp->zero_gte;
        switch (mode) {
        case Z_CHECK:
            if (vd_vmdk_pending(s, ei, g))
                return -ENOTSUP;
            if (!data && !zeroed && is_delta(l) && !(whole && sp->zero_gte))
                return -ENOTSUP;     /* the parent shows through: needs a grain */
            break;
        case Z_ZERO:
            if (whole && sp->zero_gte) {
                if (zeroed || (!data && !is_delta(l)))
                    break;      /* reads as zeros already */
                r = vd_vmdk_sparse_link(en, e->file, sp, g, 1);
                /* The grain it replaces is no longer referenced: give its
                 * space back to the file system. */
                if (r >= 0 && data && unmap)
                    r = vd_file_punch(e->file, (uint64_t)gte * VMDK_SECTOR, gend - g * gb);
                if (r == -ENOTSUP || r == -EOPNOTSUPP)
                    r = 0;
            } else if (data) {
                r = file_zero(l, e->file, (uint64_t)gte * VMDK_SECTOR + in, k, unmap, fast);
            }
            break;
        case Z_DISCARD:
            /* Allocated grains of a non-delta disk read as zeros with their
             * data punched out; nothing else changes. */
            if (data && !is_delta(l) && !vd_vmdk_pending(s, ei, g)) {
                r = vd_file_punch(e->file, (uint64_t)gte * VMDK_SECTOR + in, k);
                if (r == -ENOTSUP || r == -EOPNOTSUPP)
                    r = 0;
            }
            break;
        }
        if (r < 0)
            return r;
        rel += k;
        n -= k;
    }
    return 0;
}

static int each_extent(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags, enum zmode mode)
{
    struct vmdk *s = l->priv;
    bool unmap = flags & VD_REQ_MAY_UNMAP, fast = flags & VD_REQ_FAST_ZERO;
    while (len) {
        struct vmdk_extent *e = vd_vmdk_find_extent(s, off / VMDK_SECTOR);
        if (!e)
            return vd_err(-EIO, "%s: offset %llu is beyond the extents", lname(l),
                          (unsigned long long)off);
        uint64_t estart = e->start * VMDK_SECTOR, eend = (e->start + e->sectors) * VMDK_SECTOR;
        uint64_t n = eend - off < len ? eend - off : len;
        uint64_t rel = off - estart;
        int r = 0;
        switch (e->type) {
        case VMDK_ZERO:
            break;
        case VMDK_FLAT:
        case VMDK_VMFS:
            if (e->access != VMDK_RW) {
                if (mode == Z_CHECK)
                    return -ENOTSUP;     /* the write path reports it */
                break;
            }
            if (mode == Z_ZERO)
                r = file_zero(l, e->file, e->flat_off + rel, n, unmap, fast);
            else if (mode == Z_DISCARD) {
                r = vd_file_punch(e->file, e->flat_off + rel, n);
                if (r == -ENOTSUP || r == -EOPNOTSUPP)
                    r = 0;
            }
            break;
        default:
            r = sparse_piece(l, e, rel, n, flags, mode);
            break;
        }
        if (r < 0)
            return r;
        off += n;
        len -= n;
    }
    return 0;
}

int vd_vmdk_zero(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags)
{
    if (l->readonly)
        return -EROFS;
    int r = each_extent(l, off, len, flags, Z_CHECK);
    if (r < 0)
        return r;
    r = vd_vmdk_touch_cid(l);
    if (r < 0)
        return r;
    return each_extent(l, off, len, flags, Z_ZERO);
}

int vd_vmdk_discard(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags)
{
    if (l->readonly)
        return -EROFS;
    int r = vd_vmdk_touch_cid(l);
    if (r < 0)
        return r;
    return each_extent(l, off, len, flags, Z_DISCARD);
}

/* ---- resize ---- */

/* ddb.geometry.cylinders for the new size, when the descriptor has a geometry. */
static int set_cylinders(struct vmdk *s, uint64_t sectors)
{
    const char *h = vd_vmdk_desc_get(&s->desc, "ddb.geometry.heads");
    const char *sp = vd_vmdk_desc_get(&s->desc, "ddb.geometry.sectors");
    if (!h || !sp || !vd_vmdk_desc_get(&s->desc, "ddb.geometry.cylinders"))
        return 0;
    unsigned long heads = strtoul(h, NULL, 10), spt = strtoul(sp, NULL, 10);
    if (!heads || !spt || heads > 255 || spt > 255)
        return 0;
    uint64_t cyl = sectors / (heads * spt);
    if (cyl > 65535)
        cyl = 65535;
    char v[24];
    snprintf(v, sizeof(v), "%llu", (unsigned long long)cyl);
    return vd_vmdk_desc_set(&s->desc, "ddb.geometry.cylinders", v, true);
}

static int set_capacity(struct vd_layer *l, struct vmdk_extent *e, uint64_t sectors);

static int resize_sparse(struct vd_layer *l, struct vmdk_extent *e, uint64_t sectors)
{
    struct vmdk *s = l->priv;
    struct vmdk_sparse *sp = e->sp;
    const char *en = e->path ? e->path : lname(l);
    if (sp->compressed || sp->stream)
        return vd_err(-ENOTSUP, "%s: a streamOptimized VMDK cannot be resized (it is append-only); "
                      "convert it", lname(l));
    if (sp->cowd)
        return vd_err(-ENOTSUP, "%s: an ESX COWD (VMFSSPARSE) extent cannot be resized", lname(l));
    uint64_t covers = (uint64_t)sp->gd_n * sp->gtes * sp->grain;
    if (sectors > covers)
        return vd_err(-ENOSPC, "%s: cannot grow to %llu bytes: the grain directory of %s covers "
                      "%llu bytes and cannot grow in place (qemu-img cannot resize a VMDK either); "
                      "convert the image to a larger one instead", lname(l),
                      (unsigned long long)sectors * VMDK_SECTOR, en,
                      (unsigned long long)covers * VMDK_SECTOR);
    int r;
    if (sectors < e->sectors) {
        uint64_t first = (sectors + sp->grain - 1) / sp->grain;
        uint64_t last = (e->sectors + sp->grain - 1) / sp->grain;
        for (uint64_t g = first; g < last; g++) {
            uint32_t gte;
            r = vd_vmdk_sparse_gte(en, e->file, sp, g, &gte);
            if (r < 0)
                return r;
            if (gte > 1 || (gte == 1 && !sp->zero_gte) || vd_vmdk_pending(s, 0, g))
                return vd_err(-ENOTSUP, "%s: cannot shrink to %llu bytes: grain %llu (virtual "
                              "offset %llu) holds data; a sparse VMDK shrinks only over grains "
                              "that hold nothing", lname(l),
                              (unsigned long long)sectors * VMDK_SECTOR, (unsigned long long)g,
                              (unsigned long long)g * sp->grain * VMDK_SECTOR);
        }
        /* The cut-off part of the last grain reads as zeros if the disk grows again. */
        uint64_t in = sectors % sp->grain;
        if (in) {
            uint32_t gte;
            r = vd_vmdk_sparse_gte(en, e->file, sp, first - 1, &gte);
            if (r < 0)
                return r;
            if (vd_vmdk_pending(s, 0, first - 1))
                return vd_err(-EBUSY, "%s: grain %llu is being written", lname(l),
                              (unsigned long long)(first - 1));
            if (gte > 1 || (gte == 1 && !sp->zero_gte)) {
                r = file_zero(l, e->file, (uint64_t)gte * VMDK_SECTOR + in * VMDK_SECTOR,
                              (sp->grain - in) * VMDK_SECTOR, true, false);
                if (r < 0)
                    return r;
            }
        }
    }
    /* A growing disk's header capacity goes first, then the descriptor:
     * a capacity larger than the descriptor's extent is valid, the other
     * way round is not. A shrinking one's goes after the descriptor. */
    return sectors > e->sectors ? set_capacity(l, e, sectors) : 0;
}

static int set_capacity(struct vd_layer *l, struct vmdk_extent *e, uint64_t sectors)
{
    uint8_t cap[8];
    put_le64(cap, sectors);
    int r = vd_file_pwrite(e->file, cap, 8, VH_CAPACITY);
    if (r < 0)
        return vd_err(r, "%s: cannot write the capacity of %s", lname(l), e->path ? e->path : lname(l));
    put_le64(e->sp->header + VH_CAPACITY, sectors);
    e->sp->capacity = sectors;
    return 0;
}

int vd_vmdk_resize(struct vd_layer *l, uint64_t size, enum vd_prealloc p)
{
    struct vmdk *s = l->priv;
    if (l->readonly)
        return vd_err(-EROFS, "%s: image is read-only", lname(l));
    if (size == 0 || size % VMDK_SECTOR)
        return vd_err(-EINVAL, "%s: a VMDK's size is a whole number of 512-byte sectors, not %llu",
                      lname(l), (unsigned long long)size);
    if (s->next != 1)
        return vd_err(-ENOTSUP, "%s: cannot resize a VMDK of %zu extents (createType %s); only "
                      "single-extent disks can be resized", lname(l), s->next, s->desc.create_type);
    if (!strncmp(s->desc.create_type, "twoGbMaxExtent", 14) && size > VMDK_TWO_GB)
        return vd_err(-ENOTSUP, "%s: a %s VMDK keeps each extent under 2 GiB: growing its only "
                      "extent to %llu bytes would break that; convert the image instead", lname(l),
                      s->desc.create_type, (unsigned long long)size);
    if (is_delta(l))
        return vd_err(-ENOTSUP, "%s: a VMDK delta disk has its parent's size and cannot be resized",
                      lname(l));
    if (size == l->size)
        return 0;
    struct vmdk_extent *e = &s->ext[0];
    uint64_t sectors = size / VMDK_SECTOR, old = e->sectors;
    int r = vd_vmdk_touch_cid(l);
    if (r < 0)
        return r;
    switch (e->type) {
    case VMDK_SPARSE:
    case VMDK_VMFSSPARSE:
        if (p == VD_PREALLOC_FALLOC || p == VD_PREALLOC_FULL)
            return vd_err(-ENOTSUP, "%s: a sparse VMDK is thin: preallocation=%s needs flat extents",
                          lname(l), p == VD_PREALLOC_FULL ? "full" : "falloc");
        r = resize_sparse(l, e, sectors);
        break;
    case VMDK_FLAT:
    case VMDK_VMFS: {
        if (e->access != VMDK_RW)
            return vd_err(-EPERM, "%s: the extent is not writable", lname(l));
        uint64_t end = e->flat_off + size, old_end = e->flat_off + old * VMDK_SECTOR;
        uint64_t fs;
        r = vd_file_size(e->file, &fs);
        if (r < 0)
            return r;
        if (size > l->size) {
            if (fs < end)
                r = vd_file_truncate(e->file, end);
            if (r >= 0 && p == VD_PREALLOC_FALLOC)
                r = vd_file_allocate(e->file, old_end, end - old_end);
            if (r >= 0 && p == VD_PREALLOC_FULL)
                r = file_zero(l, e->file, old_end, end - old_end, false, false);
        } else if (fs == old_end) {
            r = vd_file_truncate(e->file, end);   /* the extent ends the file */
        } else {
            r = file_zero(l, e->file, end, old_end - end, true, false);
        }
        if (r < 0)
            return vd_err(r, "%s: cannot resize the flat extent %s: %s", lname(l),
                          e->path ? e->path : lname(l), vd_errmsg(r));
        break;
    }
    case VMDK_ZERO:
        break;
    }
    if (r < 0)
        return r;
    /* A bare sparse extent (no descriptor) has only its header. */
    bool bare = e->sp && e->file == l->file && !s->embedded;
    r = vd_vmdk_desc_set_extent_sectors(&s->desc, 0, sectors);
    if (r >= 0)
        r = set_cylinders(s, sectors);
    if (r >= 0 && !bare)
        r = vd_vmdk_write_desc(l);
    if (r >= 0 && e->sp && sectors < old)
        r = set_capacity(l, e, sectors);
    if (r < 0)
        return r;
    e->sectors = sectors;
    l->size = size;
    return 0;
}

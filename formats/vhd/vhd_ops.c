/* VHD operations beyond read and write: write-zeroes, discard, resize and
 * rebase -u (set_backing).
 *
 * VHD has no "reads as zero" marker for a block. A dynamic disk's
 * unallocated block already reads as zeros, so zeroing it is free; an
 * allocated block gets zeros in its data area (a hole punched, or the range
 * zeroed in the file). A differencing disk reads sectors whose bitmap bit is
 * clear from its parent, so zeroing sets the bits (allocating a block when
 * needed) over data that reads as zeros.
 *
 * Resize rewrites the footer (both copies on a dynamic disk). A dynamic disk
 * grows up to what its BAT can hold: max_table_entries, or the rest of the
 * BAT's last sector, which no block can use; it shrinks only over blocks
 * that are not allocated. A fixed disk grows or shrinks by moving its
 * footer. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "vdisk/error.h"
#include "vdisk/format.h"
#include "formats/vhd/vhd.h"

#define fname vd_vhd_name

/* Zeros in [off, off+len) of the host file: a hole when unmap is allowed,
 * else zeroed in place; written zeros where the file can do neither
 * (unless fast was asked: then -ENOTSUP). */
static int host_zero(struct vd_layer *l, uint64_t off, uint64_t len, bool unmap, bool fast)
{
    int r = vd_file_zero_range(l->file, off, len, unmap, fast);
    if (r < 0 && !(fast && r == -ENOTSUP))
        return vd_err(r, "%s: cannot zero %llu bytes at offset %llu", fname(l),
                      (unsigned long long)len, (unsigned long long)off);
    return r;
}

static void set_bits(uint8_t *bm, uint64_t s0, uint64_t s1, bool on)
{
    for (uint64_t i = s0; i < s1; i++) {
        if (on)
            bm[i / 8] |= (uint8_t)(0x80 >> (i % 8));
        else
            bm[i / 8] &= (uint8_t)~(0x80 >> (i % 8));
    }
}

/* Write back the bitmap sectors holding bits [s0, s1) of block blk. */
static int write_bits(struct vd_layer *l, uint32_t blk, const uint8_t *bm, uint64_t s0, uint64_t s1)
{
    struct vhd *s = l->priv;
    uint64_t block_off = (uint64_t)s->bat[blk] * VHD_SECTOR;
    uint64_t b0 = s0 / 8 / VHD_SECTOR * VHD_SECTOR;
    uint64_t b1 = ((s1 - 1) / 8 / VHD_SECTOR + 1) * VHD_SECTOR;
    int r = vd_file_pwrite(l->file, bm + b0, b1 - b0, block_off + b0);
    return r < 0 ? vd_err(r, "%s: cannot write the bitmap of block %u at offset %llu", fname(l), blk,
                          (unsigned long long)(block_off + b0)) : 0;
}

/* The pieces of [off, off+len) block by block: fn(l, blk, in, n) where in is
 * the offset inside the block. */
typedef int (*piece_fn)(struct vd_layer *l, uint32_t blk, uint64_t in, uint64_t n, unsigned flags);

static int each_block(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags, piece_fn fn)
{
    struct vhd *s = l->priv;
    while (len) {
        uint32_t blk = (uint32_t)(off / s->block_size);
        uint64_t in = off % s->block_size;
        uint64_t n = s->block_size - in < len ? s->block_size - in : len;
        int r = fn(l, blk, in, n, flags);
        if (r < 0)
            return r;
        off += n;
        len -= n;
    }
    return 0;
}

/* ---- write-zeroes ---- */

/* Pass 1: refuse (the core then writes zeros) what zero_piece cannot do. */
static int zero_check(struct vd_layer *l, uint32_t blk, uint64_t in, uint64_t n, unsigned flags)
{
    struct vhd *s = l->priv;
    if (s->pending[blk])
        return -ENOTSUP;     /* a write is allocating this block: let it finish first */
    if (s->type == VHD_TYPE_DIFF && (in % VHD_SECTOR || n % VHD_SECTOR))
        return -ENOTSUP;     /* a partial sector of a differencing disk needs copy-on-write */
    return 0;
}

static int zero_piece(struct vd_layer *l, uint32_t blk, uint64_t in, uint64_t n, unsigned flags)
{
    struct vhd *s = l->priv;
    bool unmap = flags & VD_REQ_MAY_UNMAP, fast = flags & VD_REQ_FAST_ZERO;
    uint64_t s0 = in / VHD_SECTOR, s1 = (in + n + VHD_SECTOR - 1) / VHD_SECTOR;
    int r;
    if (s->bat[blk] == VHD_BAT_UNUSED) {
        if (s->type != VHD_TYPE_DIFF)
            return 0;        /* reads as zeros already */
        /* A new block whose bits say "here" over the zeroed sectors: its
         * data area is fresh file space, which reads as zeros. */
        uint8_t *bm = calloc(1, s->bitmap_size);
        if (!bm)
            return -ENOMEM;
        set_bits(bm, s0, s1, true);
        uint64_t block_off;
        r = vd_vhd_append_block(l, bm, &block_off);
        if (r < 0) {
            free(bm);
            return r;
        }
        r = vd_vhd_set_bat(l, blk, (uint32_t)(block_off / VHD_SECTOR));
        if (r < 0) {
            free(bm);
            return r;
        }
        free(s->bitmaps[blk]);
        s->bitmaps[blk] = bm;
        return 0;
    }
    uint64_t data = (uint64_t)s->bat[blk] * VHD_SECTOR + s->bitmap_size;
    /* Zeros in the data area first, then the bits that expose them. */
    r = host_zero(l, data + in, n, unmap, fast);
    if (r < 0 || s->type != VHD_TYPE_DIFF)
        return r;
    uint8_t *bm;
    r = vd_vhd_bitmap(l, blk, &bm);
    if (r < 0)
        return r;
    bool all = true;
    for (uint64_t i = s0; i < s1 && all; i++)
        all = vhd_bit(bm, i);
    if (all)
        return 0;
    set_bits(bm, s0, s1, true);
    return write_bits(l, blk, bm, s0, s1);
}

int vd_vhd_zero(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags)
{
    struct vhd *s = l->priv;
    if (l->readonly)
        return -EROFS;
    if (s->type == VHD_TYPE_FIXED)
        return host_zero(l, off, len, flags & VD_REQ_MAY_UNMAP, flags & VD_REQ_FAST_ZERO);
    int r = each_block(l, off, len, flags, zero_check);
    if (r < 0)
        return r;
    return each_block(l, off, len, flags, zero_piece);
}

/* ---- discard ---- */

/* Afterwards a dynamic disk reads zeros there (the data is punched out); a
 * differencing disk reads its parent (bits cleared over whole sectors, their
 * data punched). Unallocated blocks and blocks being allocated are left. */
static int discard_piece(struct vd_layer *l, uint32_t blk, uint64_t in, uint64_t n, unsigned flags)
{
    struct vhd *s = l->priv;
    if (s->bat[blk] == VHD_BAT_UNUSED || s->pending[blk])
        return 0;
    uint64_t data = (uint64_t)s->bat[blk] * VHD_SECTOR + s->bitmap_size;
    if (s->type != VHD_TYPE_DIFF)
        return host_zero(l, data + in, n, true, false);
    uint64_t s0 = (in + VHD_SECTOR - 1) / VHD_SECTOR, s1 = (in + n) / VHD_SECTOR;
    if (s1 <= s0)
        return 0;
    uint8_t *bm;
    int r = vd_vhd_bitmap(l, blk, &bm);
    if (r < 0)
        return r;
    /* The bits first: after a crash the sectors read from the parent
     * rather than as a half-punched mix. */
    set_bits(bm, s0, s1, false);
    r = write_bits(l, blk, bm, s0, s1);
    if (r < 0)
        return r;
    r = vd_file_punch(l->file, data + s0 * VHD_SECTOR, (s1 - s0) * VHD_SECTOR);
    return r == -ENOTSUP || r == -EOPNOTSUPP ? 0 : r;
}

int vd_vhd_discard(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags)
{
    struct vhd *s = l->priv;
    if (l->readonly)
        return -EROFS;
    if (s->type == VHD_TYPE_FIXED) {
        int r = vd_file_punch(l->file, off, len);
        return r == -ENOTSUP || r == -EOPNOTSUPP ? 0 : r;
    }
    return each_block(l, off, len, flags, discard_piece);
}

/* ---- resize ---- */

/* Set the footer's sizes (and geometry) to size. Both size fields: some
 * readers (libvhdi) take the disk's size from the original-size field.
 * Creators that size a disk by its geometry read the CHS product; when
 * that is not exactly size, the footer is marked "qem2" (sized by current
 * size), as create does with force_size. */
static void footer_set_size(uint8_t *f, uint64_t size)
{
    unsigned c, h, sp;
    vd_vhd_geometry(size / VHD_SECTOR, &c, &h, &sp);
    vhd_put64(f + VF_ORIG_SIZE, size);
    vhd_put64(f + VF_CUR_SIZE, size);
    vhd_put32(f + VF_GEOMETRY, c << 16 | h << 8 | sp);
    vhd_put32(f + VF_CHECKSUM, vd_vhd_checksum(f, VHD_FOOTER_SIZE, VF_CHECKSUM));
    if (vd_vhd_footer_size(f) != size) {
        memcpy(f + VF_CREATOR_APP, "qem2", 4);
        vhd_put32(f + VF_CHECKSUM, vd_vhd_checksum(f, VHD_FOOTER_SIZE, VF_CHECKSUM));
    }
}

static int write_dynhdr(struct vd_layer *l)
{
    struct vhd *s = l->priv;
    vhd_put32(s->dynhdr + VH_CHECKSUM, vd_vhd_checksum(s->dynhdr, VHD_DYNHDR_SIZE, VH_CHECKSUM));
    uint64_t hoff = vhd_be64(s->footer + VF_DATA_OFF);
    int r = vd_file_pwrite(l->file, s->dynhdr, VHD_DYNHDR_SIZE, hoff);
    return r < 0 ? vd_err(r, "%s: cannot write the dynamic header at offset %llu", fname(l),
                          (unsigned long long)hoff) : 0;
}

/* Both footer copies of a dynamic disk: the end one (which readers use)
 * first, then the copy at offset 0. */
static int write_footers(struct vd_layer *l)
{
    struct vhd *s = l->priv;
    int r = vd_vhd_write_footer(l, s->next);
    if (r >= 0)
        r = vd_vhd_write_footer(l, 0);
    return r;
}

static int resize_fixed(struct vd_layer *l, uint64_t size, enum vd_prealloc p)
{
    struct vhd *s = l->priv;
    uint64_t old = l->size;
    uint8_t save[VHD_FOOTER_SIZE];
    memcpy(save, s->footer, sizeof(save));
    footer_set_size(s->footer, size);
    int r;
    if (size > old) {
        /* The new footer at the new end first (the file grows); the old
         * one becomes data and is zeroed. A crash between the two leaves
         * a valid, larger disk. */
        r = vd_vhd_write_footer(l, size);
        if (r >= 0)
            r = host_zero(l, old, VHD_FOOTER_SIZE, false, false);
        if (r >= 0 && p == VD_PREALLOC_FALLOC)
            r = vd_file_allocate(l->file, old, size - old);
        if (r >= 0 && p == VD_PREALLOC_FULL)
            r = host_zero(l, old, size - old, false, false);
        if (r < 0) {
            memcpy(s->footer, save, sizeof(save));
            return r;
        }
        return 0;
    }
    /* Shrink: the footer over data that is going away, then cut the file. */
    r = vd_vhd_write_footer(l, size);
    if (r >= 0)
        r = vd_file_truncate(l->file, size + VHD_FOOTER_SIZE);
    if (r < 0) {
        memcpy(s->footer, save, sizeof(save));
        return vd_err(r, "%s: cannot shrink to %llu bytes", fname(l), (unsigned long long)size);
    }
    return 0;
}

/* How many BAT entries fit without moving anything: the table's sectors. */
static uint32_t bat_room(const struct vhd *s)
{
    uint64_t bytes = ((uint64_t)s->max_entries * 4 + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
    return (uint32_t)(bytes / 4);
}

static int grow_bat(struct vd_layer *l, uint32_t entries)
{
    struct vhd *s = l->priv;
    uint32_t old = s->max_entries;
    uint32_t *bat = realloc(s->bat, (size_t)entries * 4);
    if (!bat)
        return -ENOMEM;
    s->bat = bat;
    uint8_t **bms = realloc(s->bitmaps, (size_t)entries * sizeof(*bms));
    if (!bms)
        return -ENOMEM;
    s->bitmaps = bms;
    uint8_t *pend = realloc(s->pending, entries);
    if (!pend)
        return -ENOMEM;
    s->pending = pend;
    for (uint32_t i = old; i < entries; i++) {
        s->bat[i] = VHD_BAT_UNUSED;
        s->bitmaps[i] = NULL;
        s->pending[i] = 0;
    }
    /* The new entries read "unused" before the header counts them. */
    size_t n = (size_t)(entries - old) * 4;
    uint8_t *ff = malloc(n);
    if (!ff)
        return -ENOMEM;
    memset(ff, 0xFF, n);
    int r = vd_file_pwrite(l->file, ff, n, s->bat_off + (uint64_t)old * 4);
    free(ff);
    if (r < 0)
        return vd_err(r, "%s: cannot extend the BAT at offset %llu", fname(l),
                      (unsigned long long)(s->bat_off + (uint64_t)old * 4));
    uint8_t save[4];
    memcpy(save, s->dynhdr + VH_MAX_ENTRIES, 4);
    vhd_put32(s->dynhdr + VH_MAX_ENTRIES, entries);
    r = write_dynhdr(l);
    if (r < 0) {
        memcpy(s->dynhdr + VH_MAX_ENTRIES, save, 4);
        return r;
    }
    s->max_entries = entries;
    return 0;
}

static int resize_dynamic(struct vd_layer *l, uint64_t size, enum vd_prealloc p)
{
    struct vhd *s = l->priv;
    if (p == VD_PREALLOC_FALLOC || p == VD_PREALLOC_FULL)
        return vd_err(-ENOTSUP, "%s: a dynamic VHD is thin: preallocation=%s needs a fixed disk",
                      fname(l), p == VD_PREALLOC_FULL ? "full" : "falloc");
    uint64_t need64 = (size + s->block_size - 1) / s->block_size;
    uint32_t have = (uint32_t)((l->size + s->block_size - 1) / s->block_size);
    int r;
    if (size > l->size) {
        if (need64 > s->max_entries) {
            uint32_t room = bat_room(s);
            if (need64 > room)
                return vd_err(-ENOSPC, "%s: cannot grow this dynamic VHD to %llu bytes: its block "
                              "allocation table holds %u entries of %u bytes (%llu bytes), and "
                              "growing it would move the blocks; convert the image to a larger "
                              "one instead", fname(l), (unsigned long long)size, room,
                              s->block_size, (unsigned long long)room * s->block_size);
            r = grow_bat(l, (uint32_t)need64);
            if (r < 0)
                return r;
        }
    } else {
        uint32_t need = (uint32_t)need64;
        for (uint32_t i = need; i < have; i++)
            if (s->bat[i] != VHD_BAT_UNUSED || s->pending[i])
                return vd_err(-ENOTSUP, "%s: cannot shrink to %llu bytes: block %u (virtual offset "
                              "%llu) is allocated; a dynamic VHD shrinks only over unallocated "
                              "blocks", fname(l), (unsigned long long)size, i,
                              (unsigned long long)i * s->block_size);
        /* The cut-off tail of the last block reads as zeros if the disk
         * grows again. */
        uint64_t in = size % s->block_size;
        if (in && need > 0 && s->bat[need - 1] != VHD_BAT_UNUSED) {
            if (s->pending[need - 1])
                return vd_err(-EBUSY, "%s: block %u is being written", fname(l), need - 1);
            uint64_t data = (uint64_t)s->bat[need - 1] * VHD_SECTOR + s->bitmap_size;
            r = host_zero(l, data + in, s->block_size - in, true, false);
            if (r < 0)
                return r;
        }
    }
    uint8_t save[VHD_FOOTER_SIZE];
    memcpy(save, s->footer, sizeof(save));
    footer_set_size(s->footer, size);
    r = write_footers(l);
    if (r < 0)
        memcpy(s->footer, save, sizeof(save));
    return r;
}

int vd_vhd_resize(struct vd_layer *l, uint64_t size, enum vd_prealloc p)
{
    struct vhd *s = l->priv;
    if (l->readonly)
        return vd_err(-EROFS, "%s: image is read-only", fname(l));
    if (size == 0 || size % VHD_SECTOR)
        return vd_err(-EINVAL, "%s: a VHD's size is a whole number of 512-byte sectors, not %llu",
                      fname(l), (unsigned long long)size);
    if (size > (2040ull << 30))
        return vd_err(-EFBIG, "%s: %llu bytes exceeds the VHD limit of 2040 GiB", fname(l),
                      (unsigned long long)size);
    if (size == l->size)
        return 0;
    int r = s->type == VHD_TYPE_FIXED ? resize_fixed(l, size, p) : resize_dynamic(l, size, p);
    if (r == 0)
        l->size = size;
    return r;
}

/* ---- rebase -u ---- */

/* Every allocated block's bitmap made all ones, with the sectors whose bit
 * was clear zeroed first: a differencing disk becoming a dynamic one (which
 * reads whole blocks) keeps reading zeros, not stale bytes, where it read
 * nothing of its own; and a dynamic disk becoming a differencing one keeps
 * every sector of its allocated blocks as its own. */
static int fill_bitmaps(struct vd_layer *l)
{
    struct vhd *s = l->priv;
    uint64_t secs = s->block_size / VHD_SECTOR;
    for (uint32_t blk = 0; blk < s->max_entries; blk++) {
        if (s->bat[blk] == VHD_BAT_UNUSED)
            continue;
        uint8_t *bm;
        int r = vd_vhd_bitmap(l, blk, &bm);
        if (r < 0)
            return r;
        uint64_t data = (uint64_t)s->bat[blk] * VHD_SECTOR + s->bitmap_size;
        bool changed = false;
        for (uint64_t i = 0; i < secs;) {
            if (vhd_bit(bm, i)) {
                i++;
                continue;
            }
            uint64_t e = i;
            while (e < secs && !vhd_bit(bm, e))
                e++;
            if (s->type == VHD_TYPE_DIFF) {
                r = host_zero(l, data + i * VHD_SECTOR, (e - i) * VHD_SECTOR, false, false);
                if (r < 0)
                    return r;
            }
            set_bits(bm, i, e, true);
            changed = true;
            i = e;
        }
        if (changed) {
            r = write_bits(l, blk, bm, 0, secs);
            if (r < 0)
                return r;
        }
    }
    return 0;
}

static int set_type(struct vd_layer *l, uint32_t type)
{
    struct vhd *s = l->priv;
    vhd_put32(s->footer + VF_DISK_TYPE, type);
    vhd_put32(s->footer + VF_CHECKSUM, vd_vhd_checksum(s->footer, VHD_FOOTER_SIZE, VF_CHECKSUM));
    s->type = type;
    return 0;
}

int vd_vhd_set_backing(struct vd_layer *l, const char *name, const char *fmt)
{
    struct vhd *s = l->priv;
    int r;
    if (l->readonly)
        return vd_err(-EROFS, "%s: image is read-only", fname(l));
    if (s->type == VHD_TYPE_FIXED)
        return vd_err(-ENOTSUP, "%s: a fixed VHD cannot have a parent; convert it to a "
                      "dynamic or differencing one first", fname(l));
    if (!name) {
        if (s->type != VHD_TYPE_DIFF)
            return 0;
        /* No parent: a dynamic disk reading what the child held, zeros elsewhere. */
        r = fill_bitmaps(l);
        if (r < 0)
            return r;
        memset(s->dynhdr + VH_PARENT_UUID, 0, 16);
        vhd_put32(s->dynhdr + VH_PARENT_TIME, 0);
        memset(s->dynhdr + VH_PARENT_NAME, 0, 512);
        memset(s->dynhdr + VH_LOCATORS, 0, 8 * 24);
        r = write_dynhdr(l);
        if (r < 0)
            return r;
        set_type(l, VHD_TYPE_DYNAMIC);
        r = write_footers(l);
        if (r < 0)
            return r;
        free(l->backing_name);
        free(l->backing_fmt);
        l->backing_name = l->backing_fmt = NULL;
        return 0;
    }
    if (fmt && strcmp(fmt, "vhd") && strcmp(fmt, "vpc"))
        return vd_err(-ENOTSUP, "%s: a differencing VHD needs a VHD parent, not %s", fname(l), fmt);
    struct vd_vhd_parent pi = { 0 };
    r = vd_vhd_read_parent(fname(l), name, &pi);
    if (r < 0)
        return r;
    uint8_t hdr[VHD_DYNHDR_SIZE];
    memcpy(hdr, s->dynhdr, sizeof(hdr));
    uint8_t *loc[2] = { NULL, NULL };
    size_t space[2], len[2];
    r = vd_vhd_parent_locators(&pi, hdr, loc, space, len);
    free(pi.abs);
    if (r < 0)
        return r;
    /* The locators' text goes at the end, where blocks would go; the
     * footer moves behind it. The old locator space is left unused. */
    uint64_t at = (s->next + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
    uint64_t end = at + space[0] + space[1];
    uint64_t old_next = s->next;
    s->next = end;
    r = vd_vhd_write_footer(l, end);
    for (int i = 0; i < 2 && r >= 0; i++) {
        uint64_t o = i ? at + space[0] : at;
        vhd_put64(hdr + VH_LOCATORS + i * 24 + 16, o);
        r = vd_file_pwrite(l->file, loc[i], space[i], o);
        if (r < 0)
            r = vd_err(r, "%s: cannot write a parent locator at offset %llu", fname(l),
                       (unsigned long long)o);
    }
    free(loc[0]);
    free(loc[1]);
    if (r < 0) {
        s->next = old_next;
        return r;
    }
    if (s->type == VHD_TYPE_DYNAMIC) {
        r = fill_bitmaps(l);
        if (r < 0)
            return r;
    }
    memcpy(s->dynhdr, hdr, sizeof(hdr));
    r = write_dynhdr(l);
    if (r < 0)
        return r;
    set_type(l, VHD_TYPE_DIFF);
    r = write_footers(l);
    if (r < 0)
        return r;
    char *bn = strdup(name), *bf = strdup("vhd");
    if (!bn || !bf) {
        free(bn);
        free(bf);
        return -ENOMEM;
    }
    free(l->backing_name);
    free(l->backing_fmt);
    l->backing_name = bn;
    l->backing_fmt = bf;
    return 0;
}

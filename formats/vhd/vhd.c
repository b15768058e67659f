/* VHD driver: fixed, dynamic and differencing disks.
 *
 * A fixed disk is the data followed by a 512-byte footer. A dynamic disk is
 * a footer copy, a dynamic header, the block allocation table (BAT) and
 * blocks, each a sector bitmap (MSB first, one bit per sector) followed by
 * the block's data, with the footer last. A differencing disk is a dynamic
 * disk whose sectors with a clear bitmap bit come from the parent.
 *
 * Allocation order (crash safety): alloc() appends the block (bitmap, room
 * for the data, the footer moved behind it), the core writes the data,
 * commit() sets the bitmap bits and then the BAT entry. A crash before the
 * BAT entry leaks the block; it never exposes stale data. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "vdisk/error.h"
#include "vdisk/format.h"
#include "formats/vhd/vhd.h"

#define fname vd_vhd_name

const char *vd_vhd_name(struct vd_layer *l) { return l->filename ? l->filename : "?"; }

static int vhd_read_footer(struct vd_layer *l, uint64_t fsize, uint8_t *foot)
{
    int r;
    if (fsize < VHD_FOOTER_SIZE)
        return vd_err(-EINVAL, "%s: file too small for a VHD footer (%llu bytes)", fname(l),
                      (unsigned long long)fsize);
    /* The footer is the last 512 bytes (older tools wrote 511). */
    r = vd_file_pread(l->file, foot, VHD_FOOTER_SIZE, fsize - VHD_FOOTER_SIZE);
    if (r < 0)
        return vd_err(r, "%s: cannot read the footer at offset %llu", fname(l),
                      (unsigned long long)(fsize - VHD_FOOTER_SIZE));
    if (vd_vhd_footer_valid(foot))
        return 0;
    bool cookie_end = memcmp(foot, "conectix", 8) == 0;
    /* A dynamic disk keeps a copy at offset 0: use it when the end is damaged. */
    uint8_t copy[VHD_FOOTER_SIZE];
    r = vd_file_pread(l->file, copy, sizeof(copy), 0);
    if (r < 0)
        return vd_err(r, "%s: cannot read offset 0", fname(l));
    if (vd_vhd_footer_valid(copy) && vhd_be32(copy + VF_DISK_TYPE) != VHD_TYPE_FIXED) {
        memcpy(foot, copy, VHD_FOOTER_SIZE);
        return 0;
    }
    if (cookie_end || memcmp(copy, "conectix", 8) == 0)
        return vd_err(-EINVAL, "%s: VHD footer checksum mismatch at offset %llu", fname(l),
                      (unsigned long long)(cookie_end ? fsize - VHD_FOOTER_SIZE : 0));
    return vd_err(-EINVAL, "%s: no VHD footer (cookie \"conectix\") at offset %llu", fname(l),
                  (unsigned long long)(fsize - VHD_FOOTER_SIZE));
}

/* Convert a UTF-16 path (le or be) to UTF-8 with '/' separators. */
static char *utf16_to_path(const uint8_t *p, size_t bytes, bool le)
{
    char *out = malloc(bytes * 2 + 1), *o = out;
    if (!out)
        return NULL;
    for (size_t i = 0; i + 1 < bytes; i += 2) {
        uint32_t c = le ? (uint32_t)(p[i] | p[i + 1] << 8) : (uint32_t)(p[i] << 8 | p[i + 1]);
        if (c == 0)
            break;
        if (c >= 0xD800 && c <= 0xDFFF)
            c = '?';     /* surrogates: not in any path we create; keep it simple */
        if (c == '\\')
            c = '/';
        if (c < 0x80) {
            *o++ = (char)c;
        } else if (c < 0x800) {
            *o++ = (char)(0xC0 | c >> 6); *o++ = (char)(0x80 | (c & 0x3F));
        } else {
            *o++ = (char)(0xE0 | c >> 12); *o++ = (char)(0x80 | ((c >> 6) & 0x3F));
            *o++ = (char)(0x80 | (c & 0x3F));
        }
    }
    *o = 0;
    return out;
}

/* The parent's file name: the relative locator, else the absolute one, else
 * the parent's name from the header (taken as in the same folder). */
static int vhd_parent_name(struct vd_layer *l, struct vhd *s, uint64_t fsize)
{
    char *best = NULL;
    int best_rank = 0;
    for (int i = 0; i < 8; i++) {
        const uint8_t *e = s->dynhdr + VH_LOCATORS + i * 24;
        uint32_t code = vhd_be32(e), len = vhd_be32(e + 8);
        uint64_t off = vhd_be64(e + 16);
        int rank = code == VHD_PLAT_W2RU ? 3 : code == VHD_PLAT_W2KU ? 2 : 0;
        if (!rank || rank <= best_rank || len == 0)
            continue;
        if (len > 65536 || off > fsize || len > fsize - off) {
            free(best);
            return vd_err(-EINVAL, "%s: parent locator %d (offset %llu, %u bytes) lies outside the file",
                          fname(l), i, (unsigned long long)off, len);
        }
        uint8_t *buf = malloc(len);
        if (!buf) {
            free(best);
            return -ENOMEM;
        }
        int r = vd_file_pread(l->file, buf, len, off);
        if (r < 0) {
            free(buf);
            free(best);
            return vd_err(r, "%s: cannot read parent locator at offset %llu", fname(l),
                          (unsigned long long)off);
        }
        char *p = utf16_to_path(buf, len, true);
        free(buf);
        if (!p) {
            free(best);
            return -ENOMEM;
        }
        char *q = p;
        if (rank == 3 && q[0] == '.' && q[1] == '/')
            q += 2;
        if (rank == 2 && q[0] && q[1] == ':') {      /* "C:/dir/x.vhd": keep the base name */
            char *slash = strrchr(q, '/');
            q = slash ? slash + 1 : q + 2;
        }
        free(best);
        best = strdup(q);
        free(p);
        if (!best)
            return -ENOMEM;
        best_rank = rank;
    }
    if (!best) {
        best = utf16_to_path(s->dynhdr + VH_PARENT_NAME, 512, false);
        if (!best)
            return -ENOMEM;
    }
    if (!best[0]) {
        free(best);
        return vd_err(-EINVAL, "%s: differencing disk names no parent (no locator, no parent name)",
                      fname(l));
    }
    l->backing_name = best;
    l->backing_fmt = strdup("vhd");
    return l->backing_fmt ? 0 : -ENOMEM;
}

static int vhd_open_dynamic(struct vd_layer *l, struct vhd *s, uint64_t fsize)
{
    uint64_t hoff = vhd_be64(s->footer + VF_DATA_OFF);
    int r;
    if (hoff % VHD_SECTOR || hoff > fsize || fsize - hoff < VHD_DYNHDR_SIZE)
        return vd_err(-EINVAL, "%s: dynamic header offset %llu is outside the file", fname(l),
                      (unsigned long long)hoff);
    r = vd_file_pread(l->file, s->dynhdr, VHD_DYNHDR_SIZE, hoff);
    if (r < 0)
        return vd_err(r, "%s: cannot read the dynamic header at offset %llu", fname(l),
                      (unsigned long long)hoff);
    if (memcmp(s->dynhdr, "cxsparse", 8) != 0)
        return vd_err(-EINVAL, "%s: no dynamic header (cookie \"cxsparse\") at offset %llu",
                      fname(l), (unsigned long long)hoff);
    if (vhd_be32(s->dynhdr + VH_CHECKSUM) != vd_vhd_checksum(s->dynhdr, VHD_DYNHDR_SIZE, VH_CHECKSUM))
        return vd_err(-EINVAL, "%s: dynamic header checksum mismatch at offset %llu", fname(l),
                      (unsigned long long)hoff);
    s->bat_off = vhd_be64(s->dynhdr + VH_TABLE_OFF);
    s->max_entries = vhd_be32(s->dynhdr + VH_MAX_ENTRIES);
    s->block_size = vhd_be32(s->dynhdr + VH_BLOCK_SIZE);
    uint32_t bs = s->block_size;
    if (bs < 4096 || bs > (256u << 20) || (bs & (bs - 1)))
        return vd_err(-EINVAL, "%s: unsupported block size %u at offset %llu (a power of two "
                      "from 4 KiB to 256 MiB expected)", fname(l), bs,
                      (unsigned long long)(hoff + VH_BLOCK_SIZE));
    s->bitmap_size = ((bs / VHD_SECTOR / 8) + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
    uint64_t need = (l->size + bs - 1) / bs;
    if (s->max_entries < need)
        return vd_err(-EINVAL, "%s: BAT has %u entries, the disk size %llu needs %llu", fname(l),
                      s->max_entries, (unsigned long long)l->size, (unsigned long long)need);
    if (s->max_entries > (1u << 28))
        return vd_err(-EINVAL, "%s: BAT entry count %u is implausible", fname(l), s->max_entries);
    uint64_t bat_bytes = (uint64_t)s->max_entries * 4;
    if (s->bat_off % VHD_SECTOR || s->bat_off > fsize || fsize - s->bat_off < bat_bytes)
        return vd_err(-EINVAL, "%s: BAT at offset %llu (%llu bytes) is outside the file", fname(l),
                      (unsigned long long)s->bat_off, (unsigned long long)bat_bytes);
    s->bat = malloc(bat_bytes);
    s->bitmaps = calloc(s->max_entries, sizeof(*s->bitmaps));
    s->pending = calloc(s->max_entries, 1);
    if (!s->bat || !s->bitmaps || !s->pending)
        return -ENOMEM;
    r = vd_file_pread(l->file, s->bat, bat_bytes, s->bat_off);
    if (r < 0)
        return vd_err(r, "%s: cannot read the BAT at offset %llu", fname(l),
                      (unsigned long long)s->bat_off);
    uint64_t meta_end = s->bat_off + (bat_bytes + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
    uint64_t next = meta_end;
    uint64_t block_bytes = (uint64_t)s->bitmap_size + bs;
    for (uint32_t i = 0; i < s->max_entries; i++) {
        uint32_t e = vhd_be32((uint8_t *)&s->bat[i]);
        s->bat[i] = e;
        if (e == VHD_BAT_UNUSED)
            continue;
        uint64_t off = (uint64_t)e * VHD_SECTOR;
        if (i >= need)
            return vd_err(-EINVAL, "%s: BAT entry %u is set but lies beyond the disk size", fname(l), i);
        if (off < VHD_DYNHDR_SIZE + VHD_SECTOR || (off < meta_end && off + block_bytes > s->bat_off))
            return vd_err(-EINVAL, "%s: BAT entry %u points at offset %llu, inside the metadata",
                          fname(l), i, (unsigned long long)off);
        if (off + block_bytes > fsize)
            return vd_err(-EINVAL, "%s: BAT entry %u points at offset %llu, past the end of the "
                          "file (%llu bytes)", fname(l), i, (unsigned long long)off,
                          (unsigned long long)fsize);
        if (off + block_bytes > next)
            next = off + block_bytes;
    }
    /* Blocks go where the footer is now; never over anything in use. */
    uint64_t foot_at = (fsize - VHD_FOOTER_SIZE + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
    s->next = next > foot_at ? next : foot_at;
    l->alloc_unit = bs;
    l->cluster_size = bs;
    if (s->type == VHD_TYPE_DIFF)
        return vhd_parent_name(l, s, fsize);
    return 0;
}

static void vhd_close(struct vd_layer *l);

static int vhd_open_inner(struct vd_layer *l)
{
    struct vhd *s = calloc(1, sizeof(*s));
    uint64_t fsize;
    int r;
    if (!s)
        return -ENOMEM;
    l->priv = s;
    r = vd_file_size(l->file, &fsize);
    if (r < 0)
        return vd_err(r, "%s: cannot get the file size", fname(l));
    r = vhd_read_footer(l, fsize, s->footer);
    if (r < 0)
        return r;
    s->type = vhd_be32(s->footer + VF_DISK_TYPE);
    l->size = vd_vhd_footer_size(s->footer);
    if (l->size % VHD_SECTOR)
        l->size = (l->size + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
    if (l->size > (2040ull << 30))
        return vd_err(-EFBIG, "%s: virtual size %llu exceeds the VHD limit of 2040 GiB", fname(l),
                      (unsigned long long)l->size);
    switch (s->type) {
    case VHD_TYPE_FIXED:
        if (fsize - VHD_FOOTER_SIZE < l->size) {
            /* Hand-truncated or oddly sized: the data is what is there. */
            if (vhd_be64(s->footer + VF_CUR_SIZE) > fsize - VHD_FOOTER_SIZE)
                return vd_err(-EINVAL, "%s: fixed disk of %llu bytes but only %llu bytes of data",
                              fname(l), (unsigned long long)l->size,
                              (unsigned long long)(fsize - VHD_FOOTER_SIZE));
        }
        return 0;
    case VHD_TYPE_DYNAMIC:
    case VHD_TYPE_DIFF:
        return vhd_open_dynamic(l, s, fsize);
    default:
        return vd_err(-ENOTSUP, "%s: unsupported VHD disk type %u at offset %d", fname(l), s->type,
                      VF_DISK_TYPE);
    }
}

static void vhd_close(struct vd_layer *l)
{
    struct vhd *s = l->priv;
    if (!s)
        return;
    if (s->bitmaps)
        for (uint32_t i = 0; i < s->max_entries; i++)
            free(s->bitmaps[i]);
    free(s->bitmaps);
    free(s->pending);
    free(s->bat);
    free(s);
    l->priv = NULL;
}

/* A failed open cleans up after itself (the core does not call close). */
static int vhd_open(struct vd_layer *l)
{
    int r = vhd_open_inner(l);
    if (r < 0)
        vhd_close(l);
    return r;
}

int vd_vhd_bitmap(struct vd_layer *l, uint32_t blk, uint8_t **out)
{
    struct vhd *s = l->priv;
    if (!s->bitmaps[blk]) {
        uint8_t *b = malloc(s->bitmap_size);
        if (!b)
            return -ENOMEM;
        uint64_t off = (uint64_t)s->bat[blk] * VHD_SECTOR;
        int r = vd_file_pread(l->file, b, s->bitmap_size, off);
        if (r < 0) {
            free(b);
            return vd_err(r, "%s: cannot read the sector bitmap of block %u at offset %llu",
                          fname(l), blk, (unsigned long long)off);
        }
        s->bitmaps[blk] = b;
    }
    *out = s->bitmaps[blk];
    return 0;
}

static int vhd_map(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags, struct vd_map *m)
{
    struct vhd *s = l->priv;
    memset(m, 0, sizeof(*m));
    m->file = l->file;
    if (s->type == VHD_TYPE_FIXED) {
        m->kind = VD_MAP_DATA;
        m->host_off = off;
        m->len = len;
        if (flags & VD_MAP_F_STATUS)
            vd_map_file_status(m);
        return 0;
    }
    uint32_t blk = (uint32_t)(off / s->block_size);
    uint64_t in = off % s->block_size;
    uint64_t n = s->block_size - in;
    if (n > len)
        n = len;
    if (s->bat[blk] == VHD_BAT_UNUSED) {
        m->kind = VD_MAP_UNALLOC;
        m->len = n;
        return 0;
    }
    uint64_t base = (uint64_t)s->bat[blk] * VHD_SECTOR + s->bitmap_size;
    if (s->type == VHD_TYPE_DIFF) {
        uint8_t *bm;
        int r = vd_vhd_bitmap(l, blk, &bm);
        if (r < 0)
            return r;
        uint64_t sec = in / VHD_SECTOR, end_sec = (in + n + VHD_SECTOR - 1) / VHD_SECTOR;
        bool set = vhd_bit(bm, sec);
        uint64_t e = sec + 1;
        while (e < end_sec && vhd_bit(bm, e) == set)
            e++;
        uint64_t run = e * VHD_SECTOR - in;
        if (run < n)
            n = run;
        if (!set) {
            m->kind = VD_MAP_UNALLOC;
            m->len = n;
            return 0;
        }
    }
    m->kind = VD_MAP_DATA;
    m->host_off = base + in;
    m->len = n;
    return 0;
}

int vd_vhd_write_footer(struct vd_layer *l, uint64_t off)
{
    struct vhd *s = l->priv;
    int r = vd_file_pwrite(l->file, s->footer, VHD_FOOTER_SIZE, off);
    return r < 0 ? vd_err(r, "%s: cannot write the footer at offset %llu", fname(l),
                          (unsigned long long)off) : 0;
}

int vd_vhd_append_block(struct vd_layer *l, const uint8_t *bm, uint64_t *block_off)
{
    struct vhd *s = l->priv;
    /* Place the block so that its data starts on a 4 KiB boundary: a
     * page-aligned guest write then maps to whole host pages and a
     * killed writer cannot leave it half-written across two pages. */
    uint64_t at = (s->next + s->bitmap_size + 4095) / 4096 * 4096 - s->bitmap_size;
    if (at < s->next)
        at += 4096;
    uint64_t block_bytes = (uint64_t)s->bitmap_size + s->block_size;
    if ((at + block_bytes) / VHD_SECTOR > 0xFFFFFFFFull)
        return vd_err(-EFBIG, "%s: the file cannot grow past 2 TiB of sectors", fname(l));
    /* The footer first, at the new end: the file grows and every byte up
     * to it reads as zeros; then the block's bitmap over the old footer. */
    int r = vd_vhd_write_footer(l, at + block_bytes);
    if (r < 0)
        return r;
    r = vd_file_pwrite(l->file, bm, s->bitmap_size, at);
    if (r < 0)
        return vd_err(r, "%s: cannot write a block bitmap at offset %llu", fname(l),
                      (unsigned long long)at);
    s->next = at + block_bytes;
    *block_off = at;
    return 0;
}

int vd_vhd_set_bat(struct vd_layer *l, uint32_t blk, uint32_t v)
{
    struct vhd *s = l->priv;
    uint8_t e[4];
    vhd_put32(e, v);
    int r = vd_file_pwrite(l->file, e, 4, s->bat_off + (uint64_t)blk * 4);
    if (r < 0)
        return vd_err(r, "%s: cannot write BAT entry %u at offset %llu", fname(l), blk,
                      (unsigned long long)(s->bat_off + (uint64_t)blk * 4));
    s->bat[blk] = v;
    return 0;
}

static int vhd_alloc(struct vd_layer *l, uint64_t off, uint64_t len, struct vd_alloc *a)
{
    struct vhd *s = l->priv;
    if (s->type == VHD_TYPE_FIXED)
        return vd_err(-EIO, "%s: a fixed disk needs no allocation (offset %llu)", fname(l),
                      (unsigned long long)off);
    uint32_t blk = (uint32_t)(off / s->block_size);
    uint64_t bstart = (uint64_t)blk * s->block_size;
    uint64_t bend = bstart + s->block_size;
    if (bend > l->size)
        bend = l->size;
    if (len > bend - off)
        len = bend - off;
    memset(a, 0, sizeof(*a));
    a->off = off;
    a->len = len;
    /* Whole sectors: the core fills the partial ones from what they read as now. */
    a->fill_off = off / VHD_SECTOR * VHD_SECTOR;
    uint64_t fend = (off + len + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
    if (fend > bend)
        fend = bend;
    a->fill_len = fend - a->fill_off;
    a->file = l->file;
    uint64_t block_off;
    if (s->bat[blk] == VHD_BAT_UNUSED) {
        /* All ones for a dynamic disk (its whole block is data), zeros
         * for a differencing one (commit sets the written sectors). */
        uint8_t *bm = malloc(s->bitmap_size);
        if (!bm)
            return -ENOMEM;
        memset(bm, s->type == VHD_TYPE_DIFF ? 0x00 : 0xFF, s->bitmap_size);
        int r = vd_vhd_append_block(l, bm, &block_off);
        free(bm);
        if (r < 0)
            return r;
        s->pending[blk] = 1;
        a->fresh = true;
        a->priv[0] = 1;
    } else {
        block_off = (uint64_t)s->bat[blk] * VHD_SECTOR;
        a->fresh = false;
        a->priv[0] = 0;
    }
    a->priv[1] = blk;
    a->priv[2] = block_off;
    a->host_off = block_off + s->bitmap_size + (a->fill_off - bstart);
    return 0;
}

static int vhd_commit(struct vd_layer *l, struct vd_alloc *a, int err)
{
    struct vhd *s = l->priv;
    uint32_t blk = (uint32_t)a->priv[1];
    uint64_t block_off = a->priv[2];
    int r;
    if (a->priv[0])
        s->pending[blk] = 0;
    if (err < 0)
        return 0;      /* a new block stays unlinked: leaked, never exposed */
    if (s->type == VHD_TYPE_DIFF) {
        uint8_t *bm;
        if (a->priv[0]) {
            /* New block: the bitmap on disk is all zeros. */
            bm = calloc(1, s->bitmap_size);
            if (!bm)
                return -ENOMEM;
            free(s->bitmaps[blk]);
            s->bitmaps[blk] = bm;
        } else {
            r = vd_vhd_bitmap(l, blk, &bm);
            if (r < 0)
                return r;
        }
        uint64_t in = a->fill_off - (uint64_t)blk * s->block_size;
        uint64_t s0 = in / VHD_SECTOR, s1 = (in + a->fill_len + VHD_SECTOR - 1) / VHD_SECTOR;
        for (uint64_t i = s0; i < s1; i++)
            bm[i / 8] |= (uint8_t)(0x80 >> (i % 8));
        /* Write back the sectors of the bitmap that changed. */
        uint64_t b0 = s0 / 8 / VHD_SECTOR * VHD_SECTOR;
        uint64_t b1 = ((s1 - 1) / 8 / VHD_SECTOR + 1) * VHD_SECTOR;
        r = vd_file_pwrite(l->file, bm + b0, b1 - b0, block_off + b0);
        if (r < 0)
            return vd_err(r, "%s: cannot write the bitmap of block %u at offset %llu", fname(l),
                          blk, (unsigned long long)(block_off + b0));
    }
    if (a->priv[0])
        return vd_vhd_set_bat(l, blk, (uint32_t)(block_off / VHD_SECTOR));
    return 0;
}

static int vhd_flush(struct vd_layer *l)
{
    return 0;    /* metadata is written through at commit */
}

static int vhd_backing_opened(struct vd_layer *l)
{
    struct vhd *s = l->priv;
    struct vd_layer *p = l->backing;
    if (s->type != VHD_TYPE_DIFF || !p)
        return 0;
    if (!p->fmt || strcmp(p->fmt->name, "vhd") != 0 || !p->priv)
        return vd_err(-EINVAL, "%s: the parent of a differencing VHD must be a VHD, %s is %s",
                      fname(l), p->filename ? p->filename : "?", p->fmt ? p->fmt->name : "?");
    struct vhd *ps = p->priv;
    if (memcmp(ps->footer + VF_UUID, s->dynhdr + VH_PARENT_UUID, 16) != 0)
        return vd_err(-EINVAL, "%s: parent %s has a different unique id than the one recorded "
                      "in the differencing disk (the parent was replaced or modified)",
                      fname(l), p->filename ? p->filename : "?");
    return 0;
}

static void uuid_str(const uint8_t *u, char *out)
{
    sprintf(out, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
            u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12],
            u[13], u[14], u[15]);
}

static int vhd_info(struct vd_layer *l, json_t *info)
{
    struct vhd *s = l->priv;
    const char *prov = s->type == VHD_TYPE_FIXED ? "fixed" : "thin";
    if (s->type == VHD_TYPE_FIXED)
        prov = vd_provisioning_of(l->file, 0, l->size, l->size);
    char creator[5] = { 0 }, uuid[37];
    for (int i = 0; i < 4; i++) {
        char c = (char)s->footer[VF_CREATOR_APP + i];
        creator[i] = c >= 0x20 && c < 0x7f ? c : ' ';
    }
    uuid_str(s->footer + VF_UUID, uuid);
    json_object_set_new(info, "provisioning", json_string(prov));
    json_object_set_new(info, "vhd", json_pack("{s:s, s:s, s:s, s:I}",
        "disk-type", s->type == VHD_TYPE_FIXED ? "fixed" : s->type == VHD_TYPE_DYNAMIC ? "dynamic"
                     : "differencing",
        "creator", creator, "uuid", uuid,
        "block-size", (json_int_t)(s->type == VHD_TYPE_FIXED ? 0 : s->block_size)));
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int vhd_check(struct vd_layer *l, unsigned fix, struct vd_check *c)
{
    struct vhd *s = l->priv;
    c->image_end_offset = -1;
    if (s->type == VHD_TYPE_FIXED)
        return 0;
    uint64_t bpb = (uint64_t)s->bitmap_size + s->block_size;
    /* Blocks sorted by place: neighbours must not overlap. Each entry keeps
     * its BAT index in the low 32 bits. */
    uint64_t *v = malloc(((size_t)s->max_entries + 1) * sizeof(*v));
    if (!v)
        return -ENOMEM;
    size_t n = 0;
    for (uint32_t i = 0; i < s->max_entries; i++)
        if (s->bat[i] != VHD_BAT_UNUSED)
            v[n++] = (uint64_t)s->bat[i] << 32 | i;
    qsort(v, n, sizeof(*v), cmp_u64);
    for (size_t k = 1; k < n; k++) {
        uint64_t a = (v[k - 1] >> 32) * VHD_SECTOR, b = (v[k] >> 32) * VHD_SECTOR;
        if (b < a + bpb) {
            vd_check_report(c, "ERROR BAT entries %u and %u overlap (offsets %llu, %llu)",
                            (unsigned)v[k - 1], (unsigned)v[k], (unsigned long long)a,
                            (unsigned long long)b);
            c->corruptions++;
        }
    }
    free(v);
    c->total_clusters = (l->size + s->block_size - 1) / s->block_size;
    c->allocated_clusters = (int64_t)n;
    c->image_end_offset = (int64_t)(s->next + VHD_FOOTER_SIZE);
    return 0;
}

static const struct vd_create_opt_desc vhd_create_opts[] = {
    { "subformat", "dynamic (default) or fixed" },
    { "force_size", "on: keep the exact size instead of rounding it to a CHS geometry" },
    { "block_size", "dynamic block size (default 2M)" },
    { "preallocation", "off/metadata (dynamic), falloc or full (fixed)" },
    { "provisioning", "thin (dynamic), lazy-zeroed or eager-zeroed (fixed)" },
    { NULL, NULL },
};

static const char *const vhd_aliases[] = { "vpc", NULL };

const struct vd_format vd_format_vhd = {
    .name = "vhd",
    .aliases = vhd_aliases,
    .probe = vd_vhd_probe,
    .open = vhd_open,
    .close = vhd_close,
    .create = vd_vhd_create,
    .map = vhd_map,
    .alloc = vhd_alloc,
    .commit = vhd_commit,
    .discard = vd_vhd_discard,
    .zero = vd_vhd_zero,
    .flush = vhd_flush,
    .resize = vd_vhd_resize,
    .check = vhd_check,
    .info = vhd_info,
    .backing_opened = vhd_backing_opened,
    .set_backing = vd_vhd_set_backing,
    .create_opts = vhd_create_opts,
};

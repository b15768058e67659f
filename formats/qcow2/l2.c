/* qcow2 guest address translation: L1/L2 lookups (map), allocation of
 * clusters for writes (alloc + commit), discard, write-zeroes, and the
 * ordered flush of metadata.
 *
 * Ordering on disk: refcount blocks, then L2 tables, then the L1 table;
 * frees are applied only after a sync that follows all three (see
 * refcount.c). Nothing here writes an L1 entry before the L2 table it
 * points to is on disk: a new table's first write is durable by itself
 * (RWF_DSYNC), so linking it needs no sync of the whole file, which would
 * wait, under the layer lock, for the write-back of all data written since
 * the last flush. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "vdisk/error.h"
#include "vdisk/file.h"
#include "qcow2.h"

enum { K_FRESH = 1, K_REUSE = 2, K_SUB = 3 };

static int sync_all(struct q2 *s)
{
    int r = vd_file_sync(s->f);
    if (r < 0)
        return vd_err(r, "%s: sync failed", s->fname);
    s->rcc.wrote = s->l2c.wrote = false;
    return 0;
}

int vd_q2_mark_dirty(struct q2 *s)
{
    if (!s->lazy || s->dirty_on_disk || s->version < 3)
        return 0;
    int r = vd_q2_update_incompat(s, s->incompat | Q2_INCOMPAT_DIRTY);
    if (r == 0)
        s->dirty_on_disk = true;
    return r;
}

static void l1_dirty(struct q2 *s, uint64_t i)
{
    if (s->l1_dlo >= s->l1_dhi) {
        s->l1_dlo = (uint32_t)i;
        s->l1_dhi = (uint32_t)i + 1;
    } else {
        if (i < s->l1_dlo) s->l1_dlo = (uint32_t)i;
        if (i + 1 > s->l1_dhi) s->l1_dhi = (uint32_t)i + 1;
    }
}

int vd_q2_l2_table(struct q2 *s, uint64_t l1i, bool create, uint8_t **tbl)
{
    *tbl = NULL;
    if (l1i >= s->l1_size)
        return vd_err(-EIO, "%s: L1 index %llu out of range", s->fname, (unsigned long long)l1i);
    uint64_t e = s->l1[l1i];
    if (e & Q2_L1_RESERVED)
        return vd_err(-EIO, "%s: L1 entry %llu (0x%llx) has reserved bits set", s->fname,
                      (unsigned long long)l1i, (unsigned long long)e);
    uint64_t off = e & Q2_OFF_MASK;
    if (!off) {
        if (!create)
            return 0;
        uint64_t got;
        int r = vd_q2_alloc(s, 1, true, &off, &got);
        if (r < 0)
            return r;
        if ((r = vd_q2_cache_get(&s->l2c, off, false, tbl)) < 0)
            return r;
        vd_q2_cache_dirty(&s->l2c, *tbl);
        vd_q2_cache_fresh(&s->l2c, *tbl);
        s->l1[l1i] = off | Q2_COPIED;
        l1_dirty(s, l1i);
        return 0;
    }
    if (off & (s->cs - 1))
        return vd_err(-EIO, "%s: L2 table offset 0x%llx (L1 entry %llu) is not cluster aligned",
                      s->fname, (unsigned long long)off, (unsigned long long)l1i);
    if (off + s->cs > s->host_end)
        return vd_err(-EIO, "%s: L2 table at 0x%llx (L1 entry %llu) lies past the end of the image",
                      s->fname, (unsigned long long)off, (unsigned long long)l1i);
    return vd_q2_cache_get(&s->l2c, off, true, tbl);
}

/* Entry of guest cluster vc (by cluster number), with its table. */
static int get_entry(struct q2 *s, uint64_t vc, bool create, uint8_t **tbl, uint64_t *idx,
                     uint64_t *e, uint64_t *bm)
{
    int r = vd_q2_l2_table(s, vc >> s->l2_bits, create, tbl);
    if (r < 0)
        return r;
    *idx = vc & (s->l2_entries - 1);
    if (!*tbl) {
        *e = *bm = 0;
        return 0;
    }
    *e = q2_l2_entry(s, *tbl, *idx);
    *bm = q2_l2_bitmap(s, *tbl, *idx);
    return 0;
}

/* QEMU's guess whether data clusters may be holes in the file (images
 * preallocated with metadata only): more clusters in use than the file
 * has allocated. Only then does it look at the file for zeros. */
static int detect_meta_prealloc(struct q2 *s)
{
    uint64_t fsize;
    int r = vd_file_size(s->f, &fsize);
    if (r < 0)
        return r;
    uint64_t real = vd_file_allocated_bytes(s->f) / s->cs;
    uint64_t threshold = real * 10 / 9 > real + 2 ? real * 10 / 9 : real + 2;
    uint64_t end = (fsize + s->cs - 1) / s->cs, count = 0;
    for (uint64_t i = 0; i < end && count < threshold; i++) {
        uint64_t rc;
        if ((r = vd_q2_refcount(s, i, &rc)) < 0)
            return r;
        count += rc != 0;
    }
    s->meta_prealloc = count >= threshold;
    return 0;
}

/* Block status of a data range: as QEMU, holes in the host file read as zeros. */
static int status_from_file(struct q2 *s, struct vd_map *m)
{
    int r;
    if (s->meta_prealloc < 0 && (r = detect_meta_prealloc(s)) < 0)
        return r;
    if (!s->meta_prealloc)
        return 0;
    bool is_data;
    uint64_t end;
    if (vd_file_extent(s->f, m->host_off, &is_data, &end) < 0)
        return 0;   /* extra information only */
    m->reads_zero = !is_data;
    if (end != UINT64_MAX && end > m->host_off && end - m->host_off < m->len)
        m->len = end - m->host_off;
    return 0;
}

int vd_q2_map(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags, struct vd_map *m)
{
    struct q2 *s = l->priv;
    (void)flags;
    uint64_t end = off + len, cur = off;
    if (end > s->size)
        end = s->size;
    if (off >= end)
        return vd_err(-EINVAL, "%s: map of 0x%llx past the virtual size", s->fname, (unsigned long long)off);
    bool first = true;
    enum vd_map_kind kind = VD_MAP_UNALLOC;
    uint64_t next_host = 0;
    memset(m, 0, sizeof(*m));
    m->file = s->f;
    while (cur < end) {
        uint64_t vc = cur >> s->cluster_bits, seg_end, host = 0;
        enum q2_kind k;
        uint8_t *tbl;
        uint64_t idx, e, bm;
        int r = get_entry(s, vc, false, &tbl, &idx, &e, &bm);
        if (r < 0)
            return r;
        if (!tbl) {
            k = Q2_UNALLOC;
            seg_end = (((vc >> s->l2_bits) + 1) << s->l2_bits) << s->cluster_bits;
        } else {
            unsigned sc = s->ext_l2 ? (unsigned)((cur & (s->cs - 1)) / s->sc_size) : 0;
            if ((r = vd_q2_classify(s, e, bm, sc, &k)) < 0)
                return r;
            if (k == Q2_COMPRESSED_K) {
                if (!first)
                    break;
                uint64_t ch, cl;
                vd_q2_comp_decode(s, e, &ch, &cl);
                if (ch + cl > s->host_end + s->cs || cl > 2 * s->cs + 512)
                    return vd_err(-EIO, "%s: compressed cluster at 0x%llx (%llu bytes) lies past the end of the image",
                                  s->fname, (unsigned long long)ch, (unsigned long long)cl);
                /* the caller reads the blob from the file: it must be there */
                if (s->cpend_len && ch < s->cpend_off + s->cpend_len && s->cpend_off < ch + cl &&
                    (r = vd_q2_comp_flush(s)) < 0)
                    return r;
                uint64_t cend = (vc + 1) << s->cluster_bits;
                m->kind = VD_MAP_COMPRESSED;
                m->host_off = ch;
                m->comp_len = (uint32_t)cl;
                m->comp_unit = (uint32_t)s->cs;
                m->comp_voff = vc << s->cluster_bits;
                m->len = (cend < end ? cend : end) - off;
                return 0;
            }
            seg_end = s->ext_l2 ? ((cur / s->sc_size) + 1) * s->sc_size : (vc + 1) << s->cluster_bits;
            uint64_t hc = e & Q2_OFF_MASK;
            if (k == Q2_UNALLOC && hc && (flags & VD_MAP_F_STATUS))
                k = Q2_UNALLOC_ALLOC;
            if (k == Q2_NORMAL || k == Q2_ZERO_ALLOC || k == Q2_UNALLOC_ALLOC) {
                if (hc + s->cs > s->host_end && k == Q2_NORMAL)
                    return vd_err(-EIO, "%s: data cluster at 0x%llx (guest offset 0x%llx) lies past the end of the image",
                                  s->fname, (unsigned long long)hc, (unsigned long long)(vc << s->cluster_bits));
                host = hc + (cur & (s->cs - 1));
            }
        }
        if (seg_end > end)
            seg_end = end;
        enum vd_map_kind mk = k == Q2_NORMAL ? VD_MAP_DATA :
                              (k == Q2_ZERO_PLAIN || k == Q2_ZERO_ALLOC) ? VD_MAP_ZERO : VD_MAP_UNALLOC;
        bool hv = k == Q2_ZERO_ALLOC || k == Q2_UNALLOC_ALLOC;
        if (first) {
            kind = mk;
            m->kind = mk;
            m->host_off = host;
            m->host_valid = hv;
            first = false;
        } else {
            if (mk != kind || hv != m->host_valid)
                break;
            if ((mk == VD_MAP_DATA || hv) && host != next_host)
                break;
        }
        next_host = host + (seg_end - cur);
        cur = seg_end;
    }
    m->len = cur - off;
    if (m->kind == VD_MAP_DATA && (flags & VD_MAP_F_STATUS))
        return status_from_file(s, m);
    return 0;
}

static uint32_t sc_mask(const struct q2 *s, uint64_t cstart, uint64_t a, uint64_t b)
{
    /* subclusters of the cluster at cstart that [a, b) touches */
    uint32_t m = 0;
    for (unsigned i = 0; i < 32; i++) {
        uint64_t s0 = cstart + i * s->sc_size, s1 = s0 + s->sc_size;
        if (s0 < b && a < s1)
            m |= 1u << i;
    }
    return m;
}

/* Reserve the host span a write into fresh clusters past the old end of a
 * buffered local file is about to fill. The page cache then writes into
 * blocks that exist (unwritten extents) instead of reserving delayed
 * allocations block by block under the inode lock, which cost ext4 about
 * a third of the write path's CPU in a convert (ext4_da_get_block_prep),
 * all of it on the one lock every writer of the file waits for. Exactly
 * the span written is reserved, so the file is no larger. Only a hint:
 * failures are ignored (the write reports its own), and a file system
 * that cannot is not asked again. O_DIRECT writes allocate directly.
 * Small writes (a guest's 4 KiB into a new cluster) are left to delayed
 * allocation: for a few blocks the extra system call on the loop thread
 * costs more than it saves. */
#define RESERVE_MIN (64u << 10)
static void reserve_fresh(struct q2 *s, uint64_t host, uint64_t len)
{
    if (s->no_reserve || s->f->fd < 0 || s->f->direct || s->f->proto->submit || len < RESERVE_MIN)
        return;
    if (vd_file_allocate(s->f, host, len) == -ENOTSUP)
        s->no_reserve = true;
}

int vd_q2_alloc_op(struct vd_layer *l, uint64_t off, uint64_t len, struct vd_alloc *a)
{
    struct q2 *s = l->priv;
    uint64_t cs = s->cs, cstart = off & ~(cs - 1), end = off + len;
    uint8_t *tbl;
    uint64_t idx, e, bm;
    int r;
    if (end > s->size)
        end = s->size;
    if (off >= end)
        return vd_err(-EINVAL, "%s: allocation past the virtual size", s->fname);
    memset(a, 0, sizeof(*a));
    a->file = s->f;
    a->off = off;
    if ((r = get_entry(s, off >> s->cluster_bits, true, &tbl, &idx, &e, &bm)) < 0)
        return r;
    enum q2_kind k;
    unsigned sc0 = s->ext_l2 ? (unsigned)((off - cstart) / s->sc_size) : 0;
    if ((r = vd_q2_classify(s, e, bm, sc0, &k)) < 0)
        return r;
    if (k == Q2_NORMAL)
        return vd_err(-EINVAL, "%s: allocation requested for allocated guest offset 0x%llx", s->fname,
                      (unsigned long long)off);
    uint64_t hc = e & Q2_OFF_MASK;
    if (!(e & Q2_COMPRESSED) && hc) {
        if (!(e & Q2_COPIED))
            return vd_err(-ENOTSUP, "%s: cluster at 0x%llx is shared (refcount > 1); writing to images "
                          "with internal snapshots is not supported", s->fname, (unsigned long long)hc);
        if (s->ext_l2) {
            unsigned sc = sc0;
            while (sc < 32 && !((bm >> sc) & 1) && cstart + sc * s->sc_size < end)
                sc++;
            uint64_t vend = cstart + sc * s->sc_size;
            a->fill_off = cstart + sc0 * s->sc_size;
            a->fill_len = (vend < s->size ? vend : s->size) - a->fill_off;
            a->len = (end < vend ? end : vend) - off;
            a->host_off = hc + sc0 * s->sc_size;
            a->priv[0] = K_SUB;
        } else {
            a->fill_off = cstart;
            a->fill_len = (cstart + cs < s->size ? cstart + cs : s->size) - cstart;
            a->len = (end < cstart + cs ? end : cstart + cs) - off;
            a->host_off = hc;
            a->priv[0] = K_REUSE;
        }
        a->priv[1] = hc;
        a->priv[3] = cstart;
        return 0;
    }
    /* a run of clusters that all need fresh host clusters */
    uint64_t maxn = (64ull << 20) >> s->cluster_bits, n = 1;
    if (!maxn)
        maxn = 1;
    bool last_comp = e & Q2_COMPRESSED, first_comp = last_comp, any_comp = last_comp;
    while (n < maxn && cstart + n * cs < end) {
        uint64_t e2, bm2;
        if ((r = get_entry(s, (cstart >> s->cluster_bits) + n, true, &tbl, &idx, &e2, &bm2)) < 0)
            return r;
        if (!(e2 & Q2_COMPRESSED) && (e2 & Q2_OFF_MASK))
            break;
        if (!(e2 & Q2_COMPRESSED) && !s->ext_l2 && (e2 & ~(Q2_ZERO | Q2_COPIED)))
            break;
        last_comp = e2 & Q2_COMPRESSED;
        any_comp |= last_comp;
        n++;
    }
    uint64_t host, got, old_end = s->host_end;
    if ((r = vd_q2_alloc(s, n, false, &host, &got)) < 0)
        return r;
    if (got < n)
        last_comp = false;
    uint64_t vend = cstart + got * cs;
    uint64_t fs = cstart, fe = vend;
    if (s->ext_l2) {
        if (!first_comp)
            fs = off / s->sc_size * s->sc_size;
        if (!last_comp && end < vend)
            fe = (end + s->sc_size - 1) / s->sc_size * s->sc_size;
    }
    a->fresh = host >= old_end;
    if (a->fresh && !any_comp && !l->backing_name) {
        /* The clusters read as zeros now (unallocated, no backing file, or
         * zero clusters) and the new host space is past the end of the
         * file, so it reads as zeros too: no copy-on-write fill needed. */
        fs = off;
        fe = end < vend ? end : vend;
    }
    if (fe > s->size)
        fe = s->size;
    a->fill_off = fs;
    a->fill_len = fe - fs;
    a->len = (end < vend ? end : vend) - off;
    a->host_off = host + (fs - cstart);
    if (a->fresh)
        reserve_fresh(s, a->host_off, a->fill_len);
    a->priv[0] = K_FRESH;
    a->priv[1] = host;
    a->priv[2] = got;
    a->priv[3] = cstart;
    return 0;
}

int vd_q2_commit(struct vd_layer *l, struct vd_alloc *a, int err)
{
    struct q2 *s = l->priv;
    uint64_t kind = a->priv[0], host = a->priv[1], got = a->priv[2], cstart = a->priv[3];
    int r;
    if (err < 0) {
        if (kind == K_FRESH)
            return vd_q2_free_now(s, host, got * s->cs);
        return 0;
    }
    uint64_t fe = a->fill_off + a->fill_len;
    uint64_t nclu = kind == K_FRESH ? got : 1;
    for (uint64_t i = 0; i < nclu; i++) {
        uint64_t vc = (cstart >> s->cluster_bits) + i, cst = vc << s->cluster_bits;
        uint8_t *tbl;
        uint64_t idx, e, bm;
        if ((r = get_entry(s, vc, true, &tbl, &idx, &e, &bm)) < 0)
            return r;
        uint64_t ne, nbm = 0;
        if (kind == K_FRESH) {
            if (e & Q2_COMPRESSED) {
                uint64_t ch, cl;
                vd_q2_comp_decode(s, e, &ch, &cl);
                if ((r = vd_q2_free_later(s, ch, cl)) < 0)
                    return r;
                bm = 0;
                nbm = 0xffffffffu;
            } else if (e & Q2_OFF_MASK) {
                return vd_err(-EIO, "%s: guest cluster 0x%llx was allocated concurrently", s->fname,
                              (unsigned long long)cst);
            }
            ne = (host + i * s->cs) | Q2_COPIED;
            if (host + (i + 1) * s->cs > s->linked_end)
                s->linked_end = host + (i + 1) * s->cs;
        } else {
            ne = (e & Q2_OFF_MASK) | Q2_COPIED;
        }
        if (s->ext_l2) {
            uint32_t m = sc_mask(s, cst, a->fill_off, fe);
            if (!nbm)
                nbm = ((bm & 0xffffffffu) | m) | ((bm >> 32) & ~(uint64_t)m) << 32;
        }
        q2_l2_set(s, tbl, idx, ne, nbm);
        vd_q2_cache_dirty(&s->l2c, tbl);
    }
    return 0;
}

/* Does guest range [o, o+n) (inside one cluster) read as zeros right now? */
static int reads_zero(struct q2 *s, uint64_t o, uint64_t n, bool *z)
{
    struct vd_map m;
    uint64_t cur = o;
    *z = true;
    while (cur < o + n) {
        int r = vd_q2_map(s->l, cur, o + n - cur, 0, &m);
        if (r < 0)
            return r;
        if (m.kind == VD_MAP_DATA || m.kind == VD_MAP_COMPRESSED ||
            (m.kind == VD_MAP_UNALLOC && s->l->backing_name)) {
            *z = false;
            return 0;
        }
        cur += m.len;
    }
    return 0;
}

static int drop_host(struct q2 *s, uint64_t e)
{
    if (e & Q2_COMPRESSED) {
        uint64_t ch, cl;
        vd_q2_comp_decode(s, e, &ch, &cl);
        return vd_q2_free_later(s, ch, cl);
    }
    if (e & Q2_OFF_MASK)
        return vd_q2_free_later(s, e & Q2_OFF_MASK, s->cs);
    return 0;
}

static int maybe_release(struct q2 *s)
{
    if (s->npf > 4096)
        return vd_q2_flush_all(s);
    return 0;
}

int vd_q2_discard(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags)
{
    struct q2 *s = l->priv;
    (void)flags;
    if (!l->discard_unmap || l->readonly)
        return -ENOTSUP;
    /* v2 cannot mark a cluster zero, and unallocated would expose the
     * backing file's data: discard is only a hint, ignore it (as QEMU) */
    if (s->version < 3 && l->backing_name)
        return -ENOTSUP;
    uint64_t end = off + len > s->size ? s->size : off + len;
    uint64_t c0 = (off + s->cs - 1) >> s->cluster_bits;
    uint64_t c1 = end == s->size ? (end + s->cs - 1) >> s->cluster_bits : end >> s->cluster_bits;
    bool backing = l->backing_name != NULL;
    for (uint64_t vc = c0; vc < c1; vc++) {
        uint8_t *tbl;
        uint64_t idx, e, bm;
        int r = get_entry(s, vc, backing && s->version >= 3, &tbl, &idx, &e, &bm);
        if (r < 0)
            return r;
        if (!tbl)
            continue;
        bool allocated = (e & Q2_COMPRESSED) || (e & Q2_OFF_MASK);
        uint64_t ne = 0, nbm = 0;
        if (s->version >= 3 && (backing || allocated)) {
            if (s->ext_l2)
                nbm = 0xffffffff00000000ull;
            else
                ne = Q2_ZERO;
        }
        if (ne == e && nbm == bm)
            continue;
        if ((r = drop_host(s, e)) < 0)
            return r;
        q2_l2_set(s, tbl, idx, ne, nbm);
        vd_q2_cache_dirty(&s->l2c, tbl);
    }
    return maybe_release(s);
}

int vd_q2_zero(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags)
{
    struct q2 *s = l->priv;
    bool unmap = flags & 0x2; /* VD_REQ_MAY_UNMAP */
    bool backing = l->backing_name != NULL;
    uint64_t end = off + len > s->size ? s->size : off + len;
    if (s->version < 3 && backing)
        return -ENOTSUP;
    uint64_t g = s->ext_l2 ? s->sc_size : s->cs;
    /* the partial units at both ends must already read as zeros */
    uint64_t a0 = (off + g - 1) / g * g, a1 = end == s->size ? end : end / g * g;
    bool z;
    int r;
    if (a0 > a1) {
        if ((r = reads_zero(s, off, end - off, &z)) < 0)
            return r;
        return z ? 0 : -ENOTSUP;
    }
    if (off < a0) {
        if ((r = reads_zero(s, off, a0 - off, &z)) < 0)
            return r;
        if (!z)
            return -ENOTSUP;
    }
    if (a1 < end) {
        if ((r = reads_zero(s, a1, end - a1, &z)) < 0)
            return r;
        if (!z)
            return -ENOTSUP;
    }
    /* compressed clusters only partly covered cannot be zeroed in place */
    for (uint64_t edge = 0; edge < 2; edge++) {
        uint64_t vo = edge ? a1 - 1 : a0;
        if (a1 <= a0)
            break;
        uint8_t *tbl;
        uint64_t idx, e, bm;
        if ((r = get_entry(s, vo >> s->cluster_bits, false, &tbl, &idx, &e, &bm)) < 0)
            return r;
        uint64_t cst = vo & ~(s->cs - 1);
        uint64_t cen = cst + s->cs > s->size ? s->size : cst + s->cs;
        if ((e & Q2_COMPRESSED) && (a0 > cst || a1 < cen))
            return -ENOTSUP;
    }
    for (uint64_t vc = a0 >> s->cluster_bits; (vc << s->cluster_bits) < a1; vc++) {
        uint64_t cst = vc << s->cluster_bits;
        uint8_t *tbl;
        uint64_t idx, e, bm;
        bool need_table = s->version >= 3 && backing;
        if ((r = get_entry(s, vc, need_table, &tbl, &idx, &e, &bm)) < 0)
            return r;
        if (!tbl)
            continue;
        uint64_t ne, nbm = bm;
        bool drop = false;
        if (s->version < 3) {
            ne = 0;
            drop = true;
        } else if (!s->ext_l2) {
            if ((e & Q2_COMPRESSED) || !(e & Q2_OFF_MASK) || unmap) {
                ne = Q2_ZERO;
                drop = true;
            } else {
                ne = (e & Q2_OFF_MASK) | Q2_COPIED | Q2_ZERO;
            }
        } else {
            uint64_t s0 = a0 > cst ? a0 : cst, s1 = a1 < cst + s->cs ? a1 : cst + s->cs;
            uint32_t m = sc_mask(s, cst, s0, s1);
            if (s1 == s->size && s1 < cst + s->cs)
                m |= ~sc_mask(s, cst, cst, s1);   /* past the end counts as covered */
            if (e & Q2_COMPRESSED) {
                ne = 0;
                nbm = 0xffffffff00000000ull;
                drop = true;
            } else {
                nbm = ((bm & 0xffffffffu) & ~(uint64_t)m) | ((bm >> 32 | m) << 32);
                ne = e;
                if (!(nbm & 0xffffffffu) && unmap && (e & Q2_OFF_MASK)) {
                    ne = 0;
                    drop = true;
                }
            }
        }
        if (ne == e && nbm == bm)
            continue;
        if (drop && (r = drop_host(s, e)) < 0)
            return r;
        q2_l2_set(s, tbl, idx, ne, nbm);
        vd_q2_cache_dirty(&s->l2c, tbl);
    }
    return maybe_release(s);
}

int vd_q2_write_l1(struct q2 *s)
{
    if (s->l1_dlo >= s->l1_dhi)
        return 0;
    size_t n = s->l1_dhi - s->l1_dlo;
    uint8_t *b = malloc(n * 8);
    if (!b)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++)
        q2_put64(b + 8 * i, s->l1[s->l1_dlo + i]);
    int r = vd_file_pwrite(s->f, b, n * 8, s->l1_off + (uint64_t)s->l1_dlo * 8);
    free(b);
    if (r < 0)
        return vd_err(r, "%s: writing the L1 table failed", s->fname);
    s->l1_dlo = s->l1_dhi = 0;
    return 0;
}

int vd_q2_flush_all(struct q2 *s)
{
    int r;
    if (!s->rw)
        return 0;
    if ((r = vd_q2_comp_flush(s)) < 0)
        return r;
    if ((r = vd_q2_cache_flush(&s->l2c)) < 0)
        return r;
    bool l1 = s->l1_dlo < s->l1_dhi;
    if (l1 || s->npf) {
        if ((r = vd_q2_l2_pre_write(s)) < 0)
            return r;
        /* New L2 tables were written durably (fresh); other tables
         * written since the last sync must be on disk before the frees
         * of what they stopped referencing are applied. */
        if (s->l2c.wrote && s->npf && (r = sync_all(s)) < 0)
            return r;
        if ((r = vd_q2_write_l1(s)) < 0)
            return r;
        if (s->npf) {
            if (l1 && (r = sync_all(s)) < 0)
                return r;
            if ((r = vd_q2_apply_frees(s)) < 0)
                return r;
        }
    }
    return vd_q2_cache_flush(&s->rcc);
}

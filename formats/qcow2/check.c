/* qcow2 consistency check: recount every reference (header, L1/L2 tables,
 * data and compressed clusters, refcount structures, snapshots, bitmaps)
 * and compare with the stored refcounts; check the COPIED flags. Repairs
 * leaks and refcount errors in place when the refcount blocks allow it,
 * otherwise writes fresh refcount structures past the end of the image. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "vdisk/error.h"
#include "vdisk/file.h"
#include "qcow2.h"

struct ck {
    struct q2 *s;
    struct vd_check *r;
    uint64_t nclu;          /* clusters in the file */
    uint32_t *ref;          /* computed references */
    uint8_t *rt_owned;      /* 1: cluster belongs to the refcount structures */
    uint64_t highest;
    uint8_t *tbl;
};

static void inc(struct ck *k, uint64_t off, uint64_t len, const char *what)
{
    struct q2 *s = k->s;
    if (!len)
        return;
    for (uint64_t c = off / s->cs; c <= (off + len - 1) / s->cs; c++) {
        if (c >= k->nclu) {
            k->r->corruptions++;
            vd_check_report(k->r, "ERROR %s at offset 0x%llx lies past the end of the image",
                            what, (unsigned long long)(c * s->cs));
            return;
        }
        if (k->ref[c] != UINT32_MAX)
            k->ref[c]++;
        if (c + 1 > k->highest)
            k->highest = c + 1;
    }
}

static int read_tbl(struct ck *k, uint64_t off)
{
    return vd_file_pread(k->s->f, k->tbl, k->s->cs, off);
}

/* Walk one L1 table (active or a snapshot's). */
static int walk_l1(struct ck *k, const uint64_t *l1, uint32_t l1_size, bool active)
{
    struct q2 *s = k->s;
    for (uint32_t i = 0; i < l1_size; i++) {
        uint64_t next_contig = 0;   /* fragmentation is counted within each L2 table, as QEMU */
        uint64_t e = l1[i], off = e & Q2_OFF_MASK;
        if (!off)
            continue;
        if ((e & Q2_L1_RESERVED) || (off & (s->cs - 1))) {
            k->r->corruptions++;
            vd_check_report(k->r, "ERROR L1 entry %u (0x%llx) is invalid", i, (unsigned long long)e);
            continue;
        }
        inc(k, off, s->cs, "L2 table");
        if (off / s->cs >= k->nclu)
            continue;
        int r = read_tbl(k, off);
        if (r < 0)
            return r;
        for (uint64_t j = 0; j < s->l2_entries; j++) {
            uint64_t le = q2_l2_entry(s, k->tbl, j), bm = q2_l2_bitmap(s, k->tbl, j);
            uint64_t guest = (((uint64_t)i << s->l2_bits) + j) << s->cluster_bits;
            if (le & Q2_COMPRESSED) {
                uint64_t ch, cl;
                vd_q2_comp_decode(s, le, &ch, &cl);
                if ((le & Q2_COPIED) || (s->ext_l2 && bm)) {
                    k->r->corruptions++;
                    vd_check_report(k->r, "ERROR compressed cluster for guest offset 0x%llx has %s",
                                    (unsigned long long)guest,
                                    (le & Q2_COPIED) ? "the COPIED flag set" : "a subcluster bitmap");
                }
                inc(k, ch, cl, "compressed cluster");
                if (active) {
                    k->r->allocated_clusters++;
                    k->r->compressed_clusters++;
                    k->r->fragmented_clusters++;
                }
                continue;
            }
            uint64_t h = le & Q2_OFF_MASK;
            if ((le & Q2_L2_RESERVED) || (h & (s->cs - 1))) {
                k->r->corruptions++;
                vd_check_report(k->r, "ERROR L2 entry for guest offset 0x%llx (0x%llx) is invalid",
                                (unsigned long long)guest, (unsigned long long)le);
                continue;
            }
            if (s->ext_l2) {
                uint32_t a = (uint32_t)bm, z = (uint32_t)(bm >> 32);
                if ((a & z) || (a && !h)) {
                    k->r->corruptions++;
                    vd_check_report(k->r, "ERROR invalid subcluster bitmap 0x%llx for guest offset 0x%llx",
                                    (unsigned long long)bm, (unsigned long long)guest);
                }
            }
            if (!h)
                continue;
            inc(k, h, s->cs, "data cluster");
            if (active) {
                k->r->allocated_clusters++;
                if (next_contig && h != next_contig)
                    k->r->fragmented_clusters++;
                next_contig = h + s->cs;
            }
        }
    }
    return 0;
}

static int load_l1_copy(struct q2 *s, uint64_t off, uint32_t n, uint64_t **out)
{
    uint64_t *l1 = calloc(n ? n : 1, 8);
    uint8_t *b = malloc(n ? (size_t)n * 8 : 1);
    int r = -ENOMEM;
    if (l1 && b) {
        r = vd_file_pread(s->f, b, (size_t)n * 8, off);
        for (uint32_t i = 0; r == 0 && i < n; i++)
            l1[i] = q2_be64(b + 8 * i);
    }
    free(b);
    if (r < 0) {
        free(l1);
        return r;
    }
    *out = l1;
    return 0;
}

static void count_bitmaps(struct ck *k)
{
    struct q2 *s = k->s;
    for (size_t i = 0; i < s->n_exts; i++) {
        if (s->exts[i].type != Q2_EXT_BITMAPS || s->exts[i].len < 24)
            continue;
        const uint8_t *d = s->exts[i].data;
        uint32_t nb = q2_be32(d);
        uint64_t dsize = q2_be64(d + 8), doff = q2_be64(d + 16);
        if (dsize > (64u << 20) || (doff & (s->cs - 1)))
            return;
        inc(k, doff, dsize, "bitmap directory");
        uint8_t *dir = malloc(dsize ? dsize : 1);
        if (!dir || vd_file_pread(s->f, dir, dsize, doff) < 0) {
            free(dir);
            return;
        }
        uint64_t p = 0;
        for (uint32_t b = 0; b < nb && p + 24 <= dsize; b++) {
            uint64_t toff = q2_be64(dir + p);
            uint32_t tsize = q2_be32(dir + p + 8);
            uint32_t name = q2_be16(dir + p + 18), extra = q2_be32(dir + p + 20);
            if (tsize <= (1u << 24) && !(toff & (s->cs - 1)) && toff) {
                inc(k, toff, (uint64_t)tsize * 8, "bitmap table");
                uint8_t *t = malloc((size_t)tsize * 8 + 1);
                if (t && vd_file_pread(s->f, t, (size_t)tsize * 8, toff) == 0)
                    for (uint32_t j = 0; j < tsize; j++) {
                        uint64_t o = q2_be64(t + 8 * j) & Q2_OFF_MASK;
                        if (o)
                            inc(k, o, s->cs, "bitmap data");
                    }
                free(t);
            }
            p += (24 + (uint64_t)name + extra + 7) & ~7ull;
        }
        free(dir);
    }
}

/* Stored refcount of cluster c, reading blocks directly (0 if unreadable). */
static uint64_t stored_rc(struct ck *k, uint64_t c, uint64_t *cached_bi, bool *have)
{
    struct q2 *s = k->s;
    uint64_t bi = c / s->rb_entries;
    if (bi != *cached_bi) {
        *cached_bi = bi;
        *have = false;
        if (bi < s->rt_entries && s->rt[bi] && !(s->rt[bi] & (s->cs - 1)) && s->rt[bi] / s->cs < k->nclu)
            *have = vd_file_pread(s->f, k->tbl, s->cs, s->rt[bi]) == 0;
    }
    return *have ? vd_q2_rc_get(k->tbl, c % s->rb_entries, s->refcount_order) : 0;
}

/* Write new refcount structures for the computed counts past everything
 * in use, then switch the header to them. */
static int rebuild(struct ck *k)
{
    struct q2 *s = k->s;
    uint64_t c0 = k->nclu > k->highest ? k->nclu : k->highest, T = 1, B = 0;
    if (c0 < 1)
        c0 = 1;
    for (int it = 0; it < 64; it++) {
        uint64_t nB = (c0 + T + B + s->rb_entries - 1) / s->rb_entries;
        uint64_t nT = (nB * 8 + s->cs - 1) / s->cs;
        if (nB == B && nT == T)
            break;
        B = nB;
        T = nT;
    }
    if (T * s->cs > Q2_MAX_RT_BYTES)
        return vd_err(-EFBIG, "%s: rebuilt refcount table would be too large", s->fname);
    uint8_t *tab = calloc(1, T * s->cs), *blk = malloc(s->cs);
    int r = -ENOMEM;
    if (!tab || !blk)
        goto out;
    for (uint64_t b = 0; b < B; b++) {
        memset(blk, 0, s->cs);
        for (uint64_t i = 0; i < s->rb_entries; i++) {
            uint64_t c = b * s->rb_entries + i, v = 0;
            if (c < k->nclu && !k->rt_owned[c])
                v = k->ref[c];
            if (c >= c0 && c < c0 + T + B)
                v = 1;
            if (v > s->rc_max)
                v = s->rc_max;
            if (v)
                vd_q2_rc_set(blk, i, s->refcount_order, v);
        }
        uint64_t at = (c0 + T + b) * s->cs;
        q2_put64(tab + 8 * b, at);
        if ((r = vd_file_pwrite(s->f, blk, s->cs, at)) < 0)
            goto out;
    }
    if ((r = vd_file_pwrite(s->f, tab, T * s->cs, c0 * s->cs)) < 0 || (r = vd_file_sync(s->f)) < 0)
        goto out;
    uint8_t h[12];
    q2_put64(h, c0 * s->cs);
    q2_put32(h + 8, (uint32_t)T);
    if ((r = vd_file_pwrite(s->f, h, 12, 48)) < 0 || (r = vd_file_sync(s->f)) < 0)
        goto out;
    /* reload the new structures */
    for (size_t i = 0; i < s->rcc.n; i++)
        s->rcc.e[i].off = 0, s->rcc.e[i].dirty = false;
    free(s->rt);
    s->rt = NULL;
    s->rt_off = c0 * s->cs;
    s->rt_clusters = (uint32_t)T;
    s->host_end = (c0 + T + B) * s->cs;
    s->free_hint = 0;
    s->comp_cursor = 0;
    r = vd_q2_load_rt(s);
out:
    free(tab);
    free(blk);
    if (r < 0)
        vd_err(r, "%s: rebuilding the refcount structures failed", s->fname);
    return r;
}

/* Rewrite COPIED flags of the active tables to match the counts. */
static int fix_copied(struct ck *k, int64_t *fixed)
{
    struct q2 *s = k->s;
    for (uint32_t i = 0; i < s->l1_size; i++) {
        uint64_t e = s->l1[i], off = e & Q2_OFF_MASK;
        if (!off || (off & (s->cs - 1)) || off / s->cs >= k->nclu)
            continue;
        bool want = k->ref[off / s->cs] == 1;
        if (!!(e & Q2_COPIED) != want) {
            s->l1[i] = want ? e | Q2_COPIED : e & ~Q2_COPIED;
            uint8_t b[8];
            q2_put64(b, s->l1[i]);
            int r = vd_file_pwrite(s->f, b, 8, s->l1_off + 8ull * i);
            if (r < 0)
                return r;
            (*fixed)++;
        }
        uint8_t *t;
        int r = vd_q2_cache_get(&s->l2c, off, true, &t);
        if (r < 0)
            return r;
        bool changed = false;
        for (uint64_t j = 0; j < s->l2_entries; j++) {
            uint64_t le = q2_l2_entry(s, t, j), h = le & Q2_OFF_MASK;
            if ((le & Q2_COMPRESSED) || !h || (h & (s->cs - 1)) || h / s->cs >= k->nclu)
                continue;
            bool w = k->ref[h / s->cs] == 1;
            if (!!(le & Q2_COPIED) != w) {
                q2_l2_set(s, t, j, w ? le | Q2_COPIED : le & ~Q2_COPIED, q2_l2_bitmap(s, t, j));
                changed = true;
                (*fixed)++;
            }
        }
        if (changed) {
            vd_q2_cache_dirty(&s->l2c, t);
            if ((r = vd_q2_cache_flush(&s->l2c)) < 0)
                return r;
        }
    }
    return 0;
}

int vd_q2_check(struct vd_layer *l, unsigned fix, struct vd_check *res)
{
    struct q2 *s = l->priv;
    struct ck k = { .s = s, .r = res };
    int r;
    if (!s->rw)
        fix = 0;
    if (s->rw && (r = vd_q2_flush_all(s)) < 0)
        return r;
    uint64_t fsize;
    if ((r = vd_file_size(s->f, &fsize)) < 0)
        return r;
    res->corruptions = res->leaks = res->check_errors = 0;
    res->corruptions_fixed = res->leaks_fixed = 0;
    res->allocated_clusters = res->fragmented_clusters = res->compressed_clusters = 0;
    res->total_clusters = (int64_t)((s->size + s->cs - 1) / s->cs);
    k.nclu = (fsize + s->cs - 1) / s->cs;
    if (k.nclu < s->host_end / s->cs)
        k.nclu = s->host_end / s->cs;
    k.ref = calloc(k.nclu ? k.nclu : 1, sizeof(*k.ref));
    k.rt_owned = calloc(k.nclu ? k.nclu : 1, 1);
    k.tbl = malloc(s->cs);
    r = -ENOMEM;
    if (!k.ref || !k.rt_owned || !k.tbl)
        goto out;

    inc(&k, 0, s->cs, "header");
    inc(&k, s->l1_off, (uint64_t)s->l1_size * 8, "L1 table");
    if ((r = walk_l1(&k, s->l1, s->l1_size, true)) < 0)
        goto out;
    if (s->nb_snapshots) {
        inc(&k, s->snap_off, s->snap_bytes, "snapshot table");
        for (uint32_t i = 0; i < s->nb_snapshots; i++) {
            uint64_t *sl1;
            inc(&k, s->snaps[i].l1_off, (uint64_t)s->snaps[i].l1_size * 8, "snapshot L1 table");
            if ((r = load_l1_copy(s, s->snaps[i].l1_off, s->snaps[i].l1_size, &sl1)) < 0)
                goto out;
            r = walk_l1(&k, sl1, s->snaps[i].l1_size, false);
            free(sl1);
            if (r < 0)
                goto out;
        }
    }
    count_bitmaps(&k);
    /* refcount structures */
    inc(&k, s->rt_off, (uint64_t)s->rt_clusters * s->cs, "refcount table");
    for (uint64_t c = s->rt_off / s->cs; c < s->rt_off / s->cs + s->rt_clusters && c < k.nclu; c++)
        k.rt_owned[c] = 1;
    for (uint64_t i = 0; i < s->rt_entries; i++) {
        uint64_t o = s->rt[i];
        if (!o)
            continue;
        if ((o & Q2_RT_RESERVED) || (o & (s->cs - 1))) {
            res->corruptions++;
            vd_check_report(res, "ERROR refcount block %llu is not cluster aligned (0x%llx)",
                            (unsigned long long)i, (unsigned long long)o);
            continue;
        }
        inc(&k, o, s->cs, "refcount block");
        if (o / s->cs < k.nclu)
            k.rt_owned[o / s->cs] = 1;
    }

    /* compare */
    uint64_t cov = s->rt_entries * s->rb_entries, last = k.nclu > cov ? k.nclu : cov;
    uint64_t cbi = UINT64_MAX;
    bool have = false;
    bool need_rebuild = false;
    int64_t want_fix = 0;
    uint8_t *fixmask = calloc(k.nclu ? k.nclu : 1, 1);
    if (!fixmask) {
        r = -ENOMEM;
        goto out;
    }
    for (uint64_t c = 0; c < last; c++) {
        if (c >= k.nclu && c / s->rb_entries < s->rt_entries && !s->rt[c / s->rb_entries]) {
            c = (c / s->rb_entries + 1) * s->rb_entries - 1;
            continue;
        }
        uint64_t st = stored_rc(&k, c, &cbi, &have), cm = c < k.nclu ? k.ref[c] : 0;
        if (st == cm)
            continue;
        bool leak = st > cm;
        if (leak) {
            res->leaks++;
            vd_check_report(res, "Leaked cluster %llu refcount=%llu reference=%llu",
                            (unsigned long long)c, (unsigned long long)st, (unsigned long long)cm);
        } else {
            res->corruptions++;
            vd_check_report(res, "ERROR cluster %llu refcount=%llu reference=%llu",
                            (unsigned long long)c, (unsigned long long)st, (unsigned long long)cm);
        }
        if ((leak && (fix & VD_CHECK_FIX_LEAKS)) || (!leak && (fix & VD_CHECK_FIX_ERRORS))) {
            if (c >= k.nclu || !have || cm > s->rc_max)
                need_rebuild = true;
            else
                fixmask[c] = leak ? 1 : 2;
            want_fix++;
        }
    }
    if (want_fix) {
        if (need_rebuild && (fix & VD_CHECK_FIX_ERRORS) && (fix & VD_CHECK_FIX_LEAKS)) {
            r = rebuild(&k);
            if (r == 0) {
                res->leaks_fixed = res->leaks;
                res->corruptions_fixed = res->corruptions;
            }
        } else {
            r = 0;
            for (uint64_t c = 0; c < k.nclu && r == 0; c++) {
                if (!fixmask[c])
                    continue;
                uint64_t st = stored_rc(&k, c, &cbi, &have);
                r = vd_q2_rc_update(s, c, (int64_t)k.ref[c] - (int64_t)st);
                if (r == 0) {
                    if (fixmask[c] == 1) res->leaks_fixed++;
                    else res->corruptions_fixed++;
                }
                cbi = UINT64_MAX;   /* rc_update goes through the cache; re-read */
            }
            if (r == 0)
                r = vd_q2_cache_flush(&s->rcc);
            if (r == 0)
                r = vd_file_sync(s->f);
        }
        if (r < 0) {
            free(fixmask);
            goto out;
        }
    }
    free(fixmask);

    /* COPIED flags of the active tables */
    for (uint32_t i = 0; i < s->l1_size; i++) {
        uint64_t e = s->l1[i], off = e & Q2_OFF_MASK;
        if (!off || (off & (s->cs - 1)) || off / s->cs >= k.nclu)
            continue;
        int64_t bad = 0;
        if (!!(e & Q2_COPIED) != (k.ref[off / s->cs] == 1))
            bad++;
        if ((r = read_tbl(&k, off)) < 0)
            goto out;
        for (uint64_t j = 0; j < s->l2_entries; j++) {
            uint64_t le = q2_l2_entry(s, k.tbl, j), h = le & Q2_OFF_MASK;
            if ((le & Q2_COMPRESSED) || !h || (h & (s->cs - 1)) || h / s->cs >= k.nclu)
                continue;
            if (!!(le & Q2_COPIED) != (k.ref[h / s->cs] == 1))
                bad++;
        }
        if (bad) {
            res->corruptions += bad;
            vd_check_report(res, "ERROR OFLAG_COPIED: %lld entries of L2 table 0x%llx (or its L1 entry) "
                            "disagree with the refcounts", (long long)bad, (unsigned long long)off);
        }
    }
    if (fix & VD_CHECK_FIX_ERRORS) {
        int64_t fixed = 0;
        if ((r = fix_copied(&k, &fixed)) < 0)
            goto out;
        res->corruptions_fixed += fixed;
        if (fixed && (r = vd_file_sync(s->f)) < 0)
            goto out;
    }
    res->image_end_offset = (int64_t)(k.highest * s->cs);
    r = 0;
out:
    free(k.ref);
    free(k.rt_owned);
    free(k.tbl);
    return r;
}

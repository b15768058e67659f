/* qcow2 reference counts: lookups, updates, cluster allocation, growth of
 * the refcount table, and deferred frees.
 *
 * Crash ordering: a refcount increase may reach the disk at any time (the
 * worst case is a leak), so refcount blocks are written freely; an L2
 * table is only written after every dirty refcount block is on disk and
 * synced (vd_q2_l2_pre_write). A decrease is only applied (in memory) once
 * the metadata that dropped the reference is on disk (vd_q2_free_later +
 * vd_q2_apply_frees after a synced flush), so it can never be written
 * before that metadata. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "vdisk/error.h"
#include "vdisk/file.h"
#include "qcow2.h"

int vd_q2_load_rt(struct q2 *s)
{
    size_t bytes = (size_t)s->rt_clusters * s->cs;
    uint8_t *buf = malloc(bytes ? bytes : 1);
    if (!buf)
        return -ENOMEM;
    int r = vd_file_pread(s->f, buf, bytes, s->rt_off);
    if (r < 0) {
        free(buf);
        return vd_err(r, "%s: reading the refcount table at 0x%llx failed", s->fname,
                      (unsigned long long)s->rt_off);
    }
    s->rt_entries = bytes / 8;
    s->rt = calloc(s->rt_entries ? s->rt_entries : 1, 8);
    if (!s->rt) {
        free(buf);
        return -ENOMEM;
    }
    for (uint64_t i = 0; i < s->rt_entries; i++)
        s->rt[i] = q2_be64(buf + 8 * i);
    free(buf);
    return 0;
}

static int rb_get(struct q2 *s, uint64_t bi, uint8_t **blk)
{
    *blk = NULL;
    if (bi >= s->rt_entries || !s->rt[bi])
        return 0;
    uint64_t off = s->rt[bi];
    if ((off & Q2_RT_RESERVED) || (off & (s->cs - 1)))
        return vd_err(-EIO, "%s: refcount table entry %llu (0x%llx) is not a cluster-aligned offset",
                      s->fname, (unsigned long long)bi, (unsigned long long)off);
    if (off >= s->host_end)
        return vd_err(-EIO, "%s: refcount block %llu at 0x%llx lies past the end of the image",
                      s->fname, (unsigned long long)bi, (unsigned long long)off);
    return vd_q2_cache_get(&s->rcc, off, true, blk);
}

int vd_q2_refcount(struct q2 *s, uint64_t c, uint64_t *rc)
{
    uint8_t *blk;
    int r = rb_get(s, c / s->rb_entries, &blk);
    if (r < 0)
        return r;
    *rc = blk ? vd_q2_rc_get(blk, c % s->rb_entries, s->refcount_order) : 0;
    return 0;
}

static int write_header_rt(struct q2 *s, uint64_t off, uint32_t clusters)
{
    uint8_t b[12];
    q2_put64(b, off);
    q2_put32(b + 8, clusters);
    int r = vd_file_pwrite(s->f, b, sizeof(b), 48);
    if (r < 0)
        return vd_err(r, "%s: updating the refcount table pointer in the header failed", s->fname);
    return 0;
}

static bool have_block(struct q2 *s, uint64_t bi)
{
    return bi < s->rt_entries && s->rt[bi];
}

/* The refcount table is full: put a bigger one (with the refcount blocks
 * describing it) past the end of the image, then switch the header to it.
 * Until the header write the old structures stay valid and untouched. */
static int grow_rt(struct q2 *s, uint64_t need_bi)
{
    uint64_t c0 = s->host_end / s->cs;
    uint64_t n_ent = (need_bi + 1) * 3 / 2 + 1, T, B, first_bi, last_bi;
    if (n_ent < s->rt_entries * 2)
        n_ent = s->rt_entries * 2;
    for (;;) {
        T = (n_ent * 8 + s->cs - 1) / s->cs;
        B = 0;
        for (;;) {
            uint64_t miss = 0;
            first_bi = c0 / s->rb_entries;
            last_bi = (c0 + T + B - 1) / s->rb_entries;
            for (uint64_t bi = first_bi; bi <= last_bi; bi++)
                miss += !have_block(s, bi);
            if (miss == B)
                break;
            B = miss;
        }
        if (last_bi < n_ent)
            break;
        n_ent = last_bi + 1 + n_ent / 2;
    }
    if (T * s->cs > Q2_MAX_RT_BYTES)
        return vd_err(-EFBIG, "%s: the refcount table would grow past %u MiB", s->fname,
                      Q2_MAX_RT_BYTES >> 20);
    uint64_t tab_ent = T * s->cs / 8;
    uint64_t *nrt = calloc(tab_ent, 8);
    uint8_t *tab = calloc(1, T * s->cs);
    uint8_t *blk = malloc(s->cs);
    int r = -ENOMEM;
    if (!nrt || !tab || !blk)
        goto out;
    memcpy(nrt, s->rt, s->rt_entries * 8);
    uint64_t j = 0;
    for (uint64_t bi = first_bi; bi <= last_bi; bi++)
        if (!have_block(s, bi))
            nrt[bi] = (c0 + T + j++) * s->cs;
    /* refcounts of the new clusters: in new blocks, written whole */
    for (uint64_t bi = first_bi; bi <= last_bi; bi++) {
        if (have_block(s, bi))
            continue;
        memset(blk, 0, s->cs);
        for (uint64_t x = c0; x < c0 + T + B; x++)
            if (x / s->rb_entries == bi)
                vd_q2_rc_set(blk, x % s->rb_entries, s->refcount_order, 1);
        r = vd_file_pwrite(s->f, blk, s->cs, nrt[bi]);
        if (r < 0) {
            vd_err(r, "%s: writing a refcount block at 0x%llx failed", s->fname,
                   (unsigned long long)nrt[bi]);
            goto out;
        }
    }
    /* ... and in blocks that exist already */
    for (uint64_t x = c0; x < c0 + T + B; x++) {
        if (!have_block(s, x / s->rb_entries))
            continue;
        if ((r = vd_q2_rc_update(s, x, 1)) < 0)
            goto out;
    }
    if ((r = vd_q2_cache_flush(&s->rcc)) < 0)
        goto out;
    for (uint64_t i = 0; i < tab_ent; i++)
        q2_put64(tab + 8 * i, nrt[i]);
    if ((r = vd_file_pwrite(s->f, tab, T * s->cs, c0 * s->cs)) < 0) {
        vd_err(r, "%s: writing the new refcount table failed", s->fname);
        goto out;
    }
    if ((r = vd_file_sync(s->f)) < 0)
        goto out;
    if ((r = write_header_rt(s, c0 * s->cs, (uint32_t)T)) < 0)
        goto out;
    if ((r = vd_file_sync(s->f)) < 0)
        goto out;
    s->rcc.wrote = false;
    uint64_t old_off = s->rt_off, old_c = s->rt_clusters;
    free(s->rt);
    s->rt = nrt;
    nrt = NULL;
    s->rt_entries = tab_ent;
    s->rt_off = c0 * s->cs;
    s->rt_clusters = (uint32_t)T;
    s->host_end = (c0 + T + B) * s->cs;
    /* the header no longer points at the old table: free it right away */
    r = vd_q2_free_now(s, old_off, old_c * s->cs);
out:
    free(nrt);
    free(tab);
    free(blk);
    return r;
}

/* Block bi is missing: put it at the first cluster it describes (free,
 * since no block counts it), counting itself. Written and synced before
 * the refcount table points at it. */
static int create_block(struct q2 *s, uint64_t bi)
{
    if (bi >= s->rt_entries)
        return grow_rt(s, bi);
    uint64_t at = bi * s->rb_entries * s->cs;
    if (at == 0 || (at >> 56))
        return vd_err(-EIO, "%s: cannot place refcount block %llu", s->fname, (unsigned long long)bi);
    uint8_t *blk = calloc(1, s->cs);
    if (!blk)
        return -ENOMEM;
    vd_q2_rc_set(blk, 0, s->refcount_order, 1);
    int r = vd_q2_pwrite_durable(s, blk, s->cs, at);
    if (r < 0)
        vd_err(r, "%s: writing a refcount block at 0x%llx failed", s->fname, (unsigned long long)at);
    if (r >= 0) {
        uint8_t e[8];
        q2_put64(e, at);
        r = s->dirty_on_disk ? vd_file_pwrite(s->f, e, 8, s->rt_off + bi * 8)
                             : vd_q2_pwrite_durable(s, e, 8, s->rt_off + bi * 8);
        if (r < 0)
            vd_err(r, "%s: updating refcount table entry %llu failed", s->fname, (unsigned long long)bi);
    }
    if (r >= 0) {
        s->rt[bi] = at;
        if (at + s->cs > s->host_end)
            s->host_end = at + s->cs;
        r = vd_q2_cache_put_clean(&s->rcc, at, blk);
    }
    free(blk);
    return r;
}

int vd_q2_rc_update(struct q2 *s, uint64_t c, int64_t delta)
{
    uint64_t bi = c / s->rb_entries;
    uint8_t *blk;
    int r = rb_get(s, bi, &blk);
    if (r < 0)
        return r;
    if (!blk) {
        if (delta <= 0)
            return vd_err(-EIO, "%s: freeing cluster 0x%llx whose refcount is already 0", s->fname,
                          (unsigned long long)(c * s->cs));
        if ((r = create_block(s, bi)) < 0)
            return r;
        return vd_q2_rc_update(s, c, delta);
    }
    uint64_t i = c % s->rb_entries;
    uint64_t v = vd_q2_rc_get(blk, i, s->refcount_order), nv;
    if (delta < 0) {
        if (v < (uint64_t)-delta)
            return vd_err(-EIO, "%s: freeing cluster 0x%llx whose refcount is already %llu", s->fname,
                          (unsigned long long)(c * s->cs), (unsigned long long)v);
        nv = v - (uint64_t)-delta;
    } else {
        nv = v + (uint64_t)delta;
        if (nv < v || nv > s->rc_max)
            return vd_err(-ERANGE, "%s: refcount of cluster 0x%llx would overflow %u bits", s->fname,
                          (unsigned long long)(c * s->cs), s->refcount_bits);
    }
    vd_q2_rc_set(blk, i, s->refcount_order, nv);
    vd_q2_cache_dirty(&s->rcc, blk);
    if (nv == 0) {
        if (c < s->free_hint)
            s->free_hint = c;
        if (s->comp_cursor && s->comp_cursor / s->cs == c)
            s->comp_cursor = 0;
    }
    return 0;
}

/* A run of n free clusters if one starts within a short scan of the first
 * free cluster (or anywhere, when exact), else the longest shorter run
 * seen: a write then lands in one piece, so a crash cannot leave it torn
 * at a cluster boundary inside it. */
#define Q2_SCAN_LIMIT 4096

int vd_q2_alloc(struct q2 *s, uint64_t n, bool exact, uint64_t *host, uint64_t *got)
{
    int r;
restart:;
    uint64_t idx = s->free_hint, rc, first_free = UINT64_MAX, best = 0, best_run = 0, scanned = 0;
    if (idx == 0)
        idx = 1;   /* the header */
    for (;;) {
        if ((r = vd_q2_refcount(s, idx, &rc)) < 0)
            return r;
        if (rc) {
            idx++;
            if (best_run && !exact && ++scanned > Q2_SCAN_LIMIT)
                break;
            continue;
        }
        if (first_free == UINT64_MAX)
            first_free = idx;
        uint64_t run = 1;
        while (run < n) {
            if ((r = vd_q2_refcount(s, idx + run, &rc)) < 0)
                return r;
            if (rc)
                break;
            run++;
        }
        if (run > best_run) {
            best = idx;
            best_run = run;
        }
        if (run == n)
            break;
        idx += run;
        scanned += run;
        if (!exact && scanned > Q2_SCAN_LIMIT)
            break;
    }
    idx = best;
    uint64_t run = best_run;
    if ((idx + run) * s->cs > (1ull << 56))
        return vd_err(-ENOSPC, "%s: no room for clusters below 64 PiB", s->fname);
    for (uint64_t bi = idx / s->rb_entries; bi <= (idx + run - 1) / s->rb_entries; bi++) {
        if (!have_block(s, bi)) {
            if ((r = create_block(s, bi)) < 0)
                return r;
            goto restart;
        }
    }
    for (uint64_t x = idx; x < idx + run; x++)
        if ((r = vd_q2_rc_update(s, x, 1)) < 0)
            return r;
    s->free_hint = first_free == idx ? idx + run : first_free;
    if ((idx + run) * s->cs > s->host_end)
        s->host_end = (idx + run) * s->cs;
    *host = idx * s->cs;
    *got = run;
    return 0;
}

int vd_q2_free_now(struct q2 *s, uint64_t off, uint64_t len)
{
    if (!len)
        return 0;
    for (uint64_t c = off / s->cs; c <= (off + len - 1) / s->cs; c++) {
        int r = vd_q2_rc_update(s, c, -1);
        if (r < 0)
            return r;
    }
    return 0;
}

int vd_q2_free_later(struct q2 *s, uint64_t off, uint64_t len)
{
    if (s->npf == s->cappf) {
        size_t nc = s->cappf ? s->cappf * 2 : 64;
        struct q2_pfree *n = realloc(s->pf, nc * sizeof(*n));
        if (!n)
            return -ENOMEM;
        s->pf = n;
        s->cappf = nc;
    }
    s->pf[s->npf].off = off;
    s->pf[s->npf].len = len;
    s->npf++;
    return 0;
}

int vd_q2_apply_frees(struct q2 *s)
{
    int r = 0;
    for (size_t i = 0; i < s->npf; i++) {
        int e = vd_q2_free_now(s, s->pf[i].off, s->pf[i].len);
        if (e < 0 && r == 0)
            r = e;
    }
    s->npf = 0;
    return r;
}

int vd_q2_rc_pre_write(struct q2 *s)
{
    (void)s;
    return 0;
}

/* Before an L2 table goes to disk, every refcount it relies on must be there. */
int vd_q2_l2_pre_write(struct q2 *s)
{
    int r;
    /* the data an L2 entry points to goes first, as for ordinary writes */
    if ((r = vd_q2_comp_flush(s)) < 0)
        return r;
    if ((r = vd_q2_mark_dirty(s)) < 0)
        return r;
    /* Fresh clusters past the end of the file as last synced: the writes
     * that grew the file into them are done (commit follows the data) but
     * maybe not durable. Were the table to reach the disk first, a power
     * loss could leave an entry pointing past the end of the file (an
     * error to every check, EIO to the guest): sync those writes first.
     * Only when the file grew; data written over clusters inside it may
     * still be lost with the flush it was not covered by, as allowed. */
    if (s->linked_end > s->synced_end) {
        uint64_t end = s->linked_end;
        if ((r = vd_file_sync(s->f)) < 0)
            return vd_err(r, "%s: sync before an L2 table write failed", s->fname);
        s->synced_end = end;
        s->rcc.wrote = s->l2c.wrote = false;
    }
    if (s->dirty_on_disk) {     /* lazy refcounts: rebuilt after a crash */
        r = vd_q2_cache_flush(&s->rcc);
        s->rcc.wrote = false;
        return r;
    }
    /* A few dirty blocks are written durably one by one: that does not
     * wait for the write-back of the data written since the last flush
     * (which the flush that follows syncs anyway). */
    if (!s->rcc.wrote && vd_q2_cache_ndirty(&s->rcc) <= 4) {
        s->rcc.dsync = true;
        r = vd_q2_cache_flush(&s->rcc);
        s->rcc.dsync = false;
        return r;
    }
    if ((r = vd_q2_cache_flush(&s->rcc)) < 0)
        return r;
    if (s->rcc.wrote && (r = vd_file_sync(s->f)) < 0)
        return r;
    s->rcc.wrote = false;
    return 0;
}

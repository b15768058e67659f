/* A small write-back cache of cluster-sized metadata tables (L2 tables and
 * refcount blocks). It is bounded (n tables) and evicts the least recently
 * used table; a dirty table is written on eviction or flush, after the
 * cache's pre_write hook has put whatever must precede it on disk. */
#include <errno.h>
#include <sys/uio.h>
#include <stdlib.h>
#include <string.h>
#include "vdisk/error.h"
#include "vdisk/file.h"
#include "qcow2.h"

int vd_q2_cache_init(struct q2_cache *c, struct q2 *s, const char *what, size_t n, size_t tsize,
                     int (*pre_write)(struct q2 *s))
{
    memset(c, 0, sizeof(*c));
    c->s = s;
    c->what = what;
    c->n = n;
    c->tsize = tsize;
    c->pre_write = pre_write;
    c->e = calloc(n, sizeof(*c->e));
    if (!c->e)
        return -ENOMEM;
    uint8_t *base;
    if (posix_memalign((void **)&base, 4096, n * tsize)) {
        free(c->e);
        c->e = NULL;
        return -ENOMEM;
    }
    for (size_t i = 0; i < n; i++)
        c->e[i].buf = base + i * tsize;
    return 0;
}

void vd_q2_cache_fini(struct q2_cache *c)
{
    if (c->e) {
        free(c->e[0].buf);
        free(c->e);
    }
    c->e = NULL;
}

static long find(struct q2_cache *c, uint64_t off)
{
    if (c->e[c->last].off == off)
        return (long)c->last;
    for (size_t i = 0; i < c->n; i++)
        if (c->e[i].off == off)
            return (long)i;
    return -1;
}

static int write_ent(struct q2_cache *c, struct q2_cache_ent *e)
{
    int r;
    if (c->pre_write && (r = c->pre_write(c->s)) < 0)
        return r;
    bool durable = c->dsync || e->fresh;
    if (durable)
        r = vd_q2_pwrite_durable(c->s, e->buf, c->tsize, e->off);
    else
        r = vd_file_pwrite(c->s->f, e->buf, c->tsize, e->off);
    if (r < 0)
        return vd_err(r, "%s: writing %s at offset 0x%llx failed", c->s->fname, c->what,
                      (unsigned long long)e->off);
    e->dirty = false;
    e->fresh = false;
    if (!durable)
        c->wrote = true;
    return 0;
}

size_t vd_q2_cache_ndirty(const struct q2_cache *c)
{
    size_t n = 0;
    for (size_t i = 0; i < c->n; i++)
        n += c->e[i].off && c->e[i].dirty;
    return n;
}

int vd_q2_pwrite_durable(struct q2 *s, const void *buf, size_t len, uint64_t off)
{
    /* the core knows how (RWF_DSYNC) and when not to (cache=unsafe) */
    return vd_file_pwrite_durable(s->f, buf, len, off);
}

int vd_q2_cache_get(struct q2_cache *c, uint64_t off, bool load, uint8_t **buf)
{
    long i = find(c, off);
    struct q2_cache_ent *e;
    if (i >= 0) {
        e = &c->e[i];
        if (!load)
            memset(e->buf, 0, c->tsize);
        c->hits++;
    } else {
        size_t v = 0;
        for (size_t k = 0; k < c->n; k++) {
            if (!c->e[k].off) { v = k; break; }
            if (c->e[k].lru < c->e[v].lru)
                v = k;
        }
        e = &c->e[v];
        if (e->off && e->dirty) {
            int r = write_ent(c, e);
            if (r < 0)
                return r;
        }
        e->off = 0;
        e->dirty = false;
        e->fresh = false;
        if (load) {
            int r = vd_file_pread(c->s->f, e->buf, c->tsize, off);
            if (r < 0)
                return vd_err(r, "%s: reading %s at offset 0x%llx failed", c->s->fname, c->what,
                              (unsigned long long)off);
        } else {
            memset(e->buf, 0, c->tsize);
        }
        e->off = off;
        i = (long)v;
        c->misses++;
    }
    e->lru = ++c->tick;
    c->last = (size_t)i;
    *buf = e->buf;
    return 0;
}

void vd_q2_cache_dirty(struct q2_cache *c, const uint8_t *buf)
{
    size_t i = (size_t)(buf - c->e[0].buf) / c->tsize;
    c->e[i].dirty = true;
}

void vd_q2_cache_fresh(struct q2_cache *c, const uint8_t *buf)
{
    size_t i = (size_t)(buf - c->e[0].buf) / c->tsize;
    c->e[i].fresh = true;
}

/* Write dirty tables in offset order (kinder to the disk). */
int vd_q2_cache_flush(struct q2_cache *c)
{
    for (;;) {
        struct q2_cache_ent *best = NULL;
        for (size_t i = 0; i < c->n; i++)
            if (c->e[i].off && c->e[i].dirty && (!best || c->e[i].off < best->off))
                best = &c->e[i];
        if (!best)
            return 0;
        int r = write_ent(c, best);
        if (r < 0)
            return r;
    }
}

void vd_q2_cache_drop(struct q2_cache *c, uint64_t off)
{
    long i = find(c, off);
    if (i >= 0) {
        c->e[i].off = 0;
        c->e[i].dirty = false;
        c->e[i].fresh = false;
        c->e[i].lru = 0;
    }
}

int vd_q2_cache_put_clean(struct q2_cache *c, uint64_t off, const uint8_t *buf)
{
    uint8_t *b;
    int r = vd_q2_cache_get(c, off, false, &b);
    if (r < 0)
        return r;
    memcpy(b, buf, c->tsize);
    c->e[c->last].dirty = false;
    return 0;
}

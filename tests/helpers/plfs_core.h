/* plfs_core.h: the power-loss model behind tests/helpers/plfs.c, kept apart
 * from the FUSE glue so that tests/unit/test_plfs.c checks it directly.
 *
 * A plfs_state wraps one backing file. Every change made through it goes to
 * the file at once and is also recorded, in order, as an undo record: the
 * range of 512-byte sectors it touched with their content before it, and the
 * file size before and after. A sync (fsync / fdatasync, or an O_DSYNC
 * write) makes the file durable and forgets the records.
 *
 * A power loss keeps a random subset of the records and undoes the others:
 * afterwards each sector holds what the last kept change touching it left
 * there, or, when no kept change touched it, what it held at the last sync;
 * the size is that of the last kept change of size (or the size at the last
 * sync). Walking the records from newest to oldest gives exactly that: a
 * kept record freezes its sectors (they hold what it left, since every newer
 * record touching them has already been undone down to it); a dropped one
 * writes its old content back into the sectors not yet frozen.
 *
 * Content past the end of the file counts as zeros, so growing a file
 * changes no sector; shrinking one is a change of the sectors cut off.
 * Header only (static functions): the helper rule of the Makefile builds
 * every .c file of tests/helpers into a program. */
#ifndef PLFS_CORE_H
#define PLFS_CORE_H

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PLFS_SECTOR 512u
/* Old content held at most; past it a change first syncs (a disk may always
 * write back early), so memory stays bounded. */
#define PLFS_MAX_UNDO (512ull << 20)

struct plfs_rec {
    uint64_t off, len;          /* sectors touched, 512-aligned; len 0: size only */
    uint8_t *old;               /* their content before (len bytes) */
    uint64_t old_size, new_size;
    bool durable;               /* an O_DSYNC write: kept by every power loss */
};

struct plfs_state {
    int fd;
    uint64_t size;              /* current size of the file */
    uint64_t base_size;         /* size at the last completed sync */
    struct plfs_rec *r;
    size_t n, cap;
    uint64_t undo_bytes;
    uint64_t syncs, changes;    /* counters for the log */
};

static inline uint64_t plfs_down(uint64_t x) { return x / PLFS_SECTOR * PLFS_SECTOR; }
static inline uint64_t plfs_up(uint64_t x) { return (x + PLFS_SECTOR - 1) / PLFS_SECTOR * PLFS_SECTOR; }

static inline int plfs_init(struct plfs_state *st, int fd)
{
    struct stat sb;
    memset(st, 0, sizeof(*st));
    st->fd = fd;
    if (fstat(fd, &sb) < 0)
        return -errno;
    st->size = st->base_size = (uint64_t)sb.st_size;
    return 0;
}

static inline void plfs_forget(struct plfs_state *st)
{
    for (size_t i = 0; i < st->n; i++)
        free(st->r[i].old);
    st->n = 0;
    st->undo_bytes = 0;
    st->base_size = st->size;
}

static inline void plfs_fini(struct plfs_state *st)
{
    plfs_forget(st);
    free(st->r);
    st->r = NULL;
    st->cap = 0;
}

/* pread of exactly len bytes, zeros past the end of the file. */
static inline int plfs_pread_full(int fd, uint8_t *buf, uint64_t len, uint64_t off)
{
    while (len) {
        ssize_t k = pread(fd, buf, len, (off_t)off);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0)
            return -errno;
        if (k == 0) {
            memset(buf, 0, len);
            return 0;
        }
        buf += k;
        off += (uint64_t)k;
        len -= (uint64_t)k;
    }
    return 0;
}

static inline int plfs_pwrite_full(int fd, const uint8_t *buf, uint64_t len, uint64_t off)
{
    while (len) {
        ssize_t k = pwrite(fd, buf, len, (off_t)off);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0)
            return -errno;
        buf += k;
        off += (uint64_t)k;
        len -= (uint64_t)k;
    }
    return 0;
}

/* What a sync does: the file durable, the records forgotten. */
static inline int plfs_sync(struct plfs_state *st)
{
    if (fdatasync(st->fd) < 0)
        return -errno;
    plfs_forget(st);
    st->syncs++;
    return 0;
}

/* Record the coming change of bytes [off, off+len) (its sectors' content
 * now) and of the size to new_size. Call before making the change. */
static inline int plfs_record(struct plfs_state *st, uint64_t off, uint64_t len, uint64_t new_size, bool durable)
{
    uint64_t a = plfs_down(off), b = len ? plfs_up(off + len) : a;
    if (b == a && new_size == st->size && !durable)
        return 0;                       /* changes nothing */
    if (st->undo_bytes + (b - a) > PLFS_MAX_UNDO) {
        int r = plfs_sync(st);
        if (r < 0)
            return r;
    }
    if (st->n == st->cap) {
        size_t cap = st->cap ? st->cap * 2 : 64;
        struct plfs_rec *nr = realloc(st->r, cap * sizeof(*nr));
        if (!nr)
            return -ENOMEM;
        st->r = nr;
        st->cap = cap;
    }
    struct plfs_rec *rec = &st->r[st->n];
    *rec = (struct plfs_rec){ .off = a, .len = b - a, .old_size = st->size, .new_size = new_size,
                              .durable = durable };
    if (b > a) {
        rec->old = malloc(b - a);
        if (!rec->old)
            return -ENOMEM;
        int r = plfs_pread_full(st->fd, rec->old, b - a, a);
        if (r < 0) {
            free(rec->old);
            return r;
        }
    }
    st->n++;
    st->undo_bytes += b - a;
    st->changes++;
    return 0;
}

/* The changes themselves, each recorded first. */
static inline int plfs_write(struct plfs_state *st, const void *buf, uint64_t len, uint64_t off, bool dsync)
{
    uint64_t end = off + len > st->size ? off + len : st->size;
    int r = plfs_record(st, off, len, end, dsync);
    if (r < 0)
        return r;
    r = plfs_pwrite_full(st->fd, buf, len, off);
    if (r < 0)
        return r;      /* the record stays: undoing it restores what was there */
    st->size = end;
    if (dsync && fdatasync(st->fd) < 0)
        return -errno;
    return 0;
}

static inline int plfs_truncate(struct plfs_state *st, uint64_t size)
{
    int r = size < st->size ? plfs_record(st, size, st->size - size, size, false)
                            : plfs_record(st, 0, 0, size, false);
    if (r < 0)
        return r;
    if (ftruncate(st->fd, (off_t)size) < 0)
        return -errno;
    st->size = size;
    return 0;
}

#ifndef FALLOC_FL_KEEP_SIZE
#include <linux/falloc.h>
#endif

static inline int plfs_fallocate(struct plfs_state *st, int mode, uint64_t off, uint64_t len)
{
    bool keep = mode & FALLOC_FL_KEEP_SIZE;
    uint64_t end = !keep && off + len > st->size ? off + len : st->size;
    int r;
    if (mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE))
        return -EOPNOTSUPP;
    if (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) {
        /* only the part inside the file changes content */
        uint64_t cend = off + len < st->size ? off + len : st->size;
        r = plfs_record(st, off, cend > off ? cend - off : 0, end, false);
    } else {
        r = plfs_record(st, 0, 0, end, false);
    }
    if (r < 0)
        return r;
    if (fallocate(st->fd, mode, (off_t)off, (off_t)len) < 0)
        return -errno;
    st->size = end;
    return 0;
}

/* ---- the power loss ---- */

/* Sorted disjoint [a, b) ranges of frozen sectors. */
struct plfs_ranges {
    uint64_t (*v)[2];
    size_t n, cap;
};

static inline int plfs_ranges_add(struct plfs_ranges *s, uint64_t a, uint64_t b)
{
    if (a >= b)
        return 0;
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 32;
        void *nv = realloc(s->v, cap * sizeof(*s->v));
        if (!nv)
            return -ENOMEM;
        s->v = nv;
        s->cap = cap;
    }
    /* insert in order, then merge neighbours that touch */
    size_t i = 0;
    while (i < s->n && s->v[i][0] < a)
        i++;
    memmove(&s->v[i + 1], &s->v[i], (s->n - i) * sizeof(*s->v));
    s->v[i][0] = a;
    s->v[i][1] = b;
    s->n++;
    size_t w = 0;
    for (size_t k = 1; k < s->n; k++) {
        if (s->v[k][0] <= s->v[w][1]) {
            if (s->v[k][1] > s->v[w][1])
                s->v[w][1] = s->v[k][1];
        } else {
            w++;
            s->v[w][0] = s->v[k][0];
            s->v[w][1] = s->v[k][1];
        }
    }
    s->n = s->n ? w + 1 : 0;
    return 0;
}

/* Write rec's old content back over the parts of [a, b) not frozen. */
static inline int plfs_undo_unfrozen(struct plfs_state *st, const struct plfs_rec *rec, const struct plfs_ranges *fz)
{
    uint64_t a = rec->off, b = rec->off + rec->len, pos = a;
    for (size_t k = 0; k <= fz->n && pos < b; k++) {
        uint64_t ga = k < fz->n ? fz->v[k][0] : UINT64_MAX;   /* next frozen range */
        uint64_t gb = k < fz->n ? fz->v[k][1] : UINT64_MAX;
        if (gb <= pos)
            continue;
        uint64_t stop = ga < b ? ga : b;
        if (stop > pos) {
            int r = plfs_pwrite_full(st->fd, rec->old + (pos - a), stop - pos, pos);
            if (r < 0)
                return r;
        }
        pos = gb > pos ? gb : pos;
    }
    return 0;
}

/* Undo every record i with !keep[i] (durable ones are always kept), as the
 * model above says; leaves the file durable and the log empty. */
static inline int plfs_revert(struct plfs_state *st, const bool *keep)
{
    struct plfs_ranges fz = { 0 };
    uint64_t size = st->base_size;
    int r = 0;
    for (size_t i = 0; i < st->n; i++)
        if ((keep[i] || st->r[i].durable) && st->r[i].new_size != st->r[i].old_size)
            size = st->r[i].new_size;
    for (size_t i = st->n; i-- > 0 && r == 0;) {
        const struct plfs_rec *rec = &st->r[i];
        if (keep[i] || rec->durable)
            r = plfs_ranges_add(&fz, rec->off, rec->off + rec->len);
        else if (rec->len)
            r = plfs_undo_unfrozen(st, rec, &fz);
    }
    free(fz.v);
    if (r == 0 && ftruncate(st->fd, (off_t)size) < 0)
        r = -errno;
    if (r == 0) {
        st->size = size;
        r = plfs_sync(st);
    }
    return r;
}

static inline uint64_t plfs_rand(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* A power loss: each record not yet durable is kept with probability
 * keep_pct/100 (from seed); logs every record and its fate to log (may be
 * NULL). Returns 0 or -errno. */
static inline int plfs_power_loss(struct plfs_state *st, uint64_t seed, unsigned keep_pct, FILE *log)
{
    bool *keep = calloc(st->n ? st->n : 1, sizeof(*keep));
    if (!keep)
        return -ENOMEM;
    uint64_t rng = seed;
    size_t kept = 0;
    for (size_t i = 0; i < st->n; i++) {
        keep[i] = st->r[i].durable || plfs_rand(&rng) % 100 < keep_pct;
        kept += keep[i];
        if (log)
            fprintf(log, "plfs: record %zu: sectors [%" PRIu64 ", %" PRIu64 ") size %" PRIu64 " -> %" PRIu64
                    "%s: %s\n", i, st->r[i].off, st->r[i].off + st->r[i].len, st->r[i].old_size,
                    st->r[i].new_size, st->r[i].durable ? " (O_DSYNC)" : "", keep[i] ? "kept" : "lost");
    }
    if (log)
        fprintf(log, "plfs: power loss, seed %" PRIu64 ", keep %u%%: %zu unsynced changes, %zu kept, %zu lost "
                "(%" PRIu64 " changes and %" PRIu64 " syncs in all)\n", seed, keep_pct, st->n, kept,
                st->n - kept, st->changes, st->syncs);
    int r = plfs_revert(st, keep);
    free(keep);
    if (log)
        fprintf(log, "plfs: size after the loss %" PRIu64 "%s%s\n", st->size, r < 0 ? ", revert failed: " : "",
                r < 0 ? strerror(-r) : "");
    return r;
}

#endif

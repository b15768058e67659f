/* qcow2 driver internals shared by the files of formats/qcow2/.
 * On-disk facts follow QEMU's docs/interop/qcow2.rst. All table contents
 * are kept big-endian in memory (as on disk); the L1 and refcount tables
 * are kept host-endian. */
#ifndef VDISK_QCOW2_INTERNAL_H
#define VDISK_QCOW2_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "vdisk/format.h"

#define Q2_MAGIC 0x514649fbu            /* "QFI\xfb" */
#define Q2_MIN_CLUSTER_BITS 9
#define Q2_MAX_CLUSTER_BITS 21
#define Q2_MAX_L1_BYTES (32u << 20)     /* same limit as QEMU */
#define Q2_MAX_RT_BYTES (8u << 20)
#define Q2_MAX_SNAPSHOTS 65536
#define Q2_MAX_BACKING_NAME 1023

/* incompatible feature bits */
#define Q2_INCOMPAT_DIRTY    (1ull << 0)
#define Q2_INCOMPAT_CORRUPT  (1ull << 1)
#define Q2_INCOMPAT_DATAFILE (1ull << 2)
#define Q2_INCOMPAT_COMPRESS (1ull << 3)
#define Q2_INCOMPAT_EXTL2    (1ull << 4)
#define Q2_INCOMPAT_KNOWN    0x1full
/* compatible */
#define Q2_COMPAT_LAZY       (1ull << 0)

/* header extension types */
#define Q2_EXT_END          0x00000000u
#define Q2_EXT_BACKING_FMT  0xe2792acau
#define Q2_EXT_FEATURES     0x6803f857u
#define Q2_EXT_BITMAPS      0x23852875u
#define Q2_EXT_CRYPTO       0x0537be77u
#define Q2_EXT_DATAFILE     0x44415441u

/* L1 / L2 entry bits */
#define Q2_COPIED      (1ull << 63)
#define Q2_COMPRESSED  (1ull << 62)
#define Q2_ZERO        1ull
#define Q2_OFF_MASK    0x00fffffffffffe00ull
#define Q2_L1_RESERVED 0x7f000000000001feull
#define Q2_L2_RESERVED 0x3f000000000001feull
#define Q2_RT_RESERVED 0x00000000000001ffull

enum q2_ctype { Q2_CT_ZLIB = 0, Q2_CT_ZSTD = 1 };

/* A decoded (sub)cluster, as map sees it. */
enum q2_kind { Q2_UNALLOC, Q2_ZERO_PLAIN, Q2_ZERO_ALLOC, Q2_NORMAL, Q2_COMPRESSED_K,
              Q2_UNALLOC_ALLOC /* map only: unallocated subcluster of an allocated cluster */ };

/* A bounded write-back cache of cluster-sized tables (L2 tables,
 * refcount blocks). Lookups keep a last-hit fast path; eviction is LRU. */
struct q2;
struct q2_cache_ent {
    uint64_t off;       /* host offset; 0 = empty slot */
    uint64_t lru;
    bool dirty;
    bool fresh;         /* a new table no L1 entry on disk points to yet:
                           its first write is durable (RWF_DSYNC), so the
                           L1 entry may follow without a sync of the file */
    uint8_t *buf;
};
struct q2_cache {
    struct q2 *s;
    const char *what;
    size_t n;
    size_t tsize;       /* table size in bytes */
    struct q2_cache_ent *e;
    uint64_t tick;
    size_t last;
    /* called before a dirty table of this cache is written (ordering) */
    int (*pre_write)(struct q2 *s);
    bool wrote;         /* a table was written since the last sync */
    bool dsync;         /* write tables durably one by one (RWF_DSYNC) */
    uint64_t hits, misses;
};

struct q2_ext {          /* a header extension kept for rewriting */
    uint32_t type, len;
    uint8_t *data;
};

struct q2_snap {
    uint64_t l1_off;
    uint32_t l1_size;
    char *id, *name;
    uint32_t date_sec, date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t vm_state_size;
    uint64_t disk_size;
    uint64_t icount;
    bool has_icount;
};

struct q2_pfree { uint64_t off, len; };

struct q2 {
    struct vd_layer *l;
    struct vd_file *f;
    const char *fname;
    bool rw;

    uint32_t version;
    uint32_t cluster_bits;
    uint64_t cs;
    uint64_t size;
    uint64_t incompat, compat, autoclear;
    uint32_t header_length;
    uint8_t ctype;
    uint8_t *raw_hdr;             /* header bytes as read (unknown fields kept) */
    uint32_t raw_len;

    uint32_t refcount_order, refcount_bits;
    uint64_t rc_max;
    uint64_t rb_entries;          /* refcounts per block */

    bool ext_l2;
    uint32_t l2_entries, l2_esize, l2_bits;  /* entries per table, entry size */
    uint64_t sc_size;             /* subcluster size (ext_l2), else cs */
    int csize_shift;              /* compressed descriptor layout */
    uint64_t csize_mask, coff_mask;

    uint32_t l1_size;
    uint64_t l1_off;
    uint64_t *l1;
    uint32_t l1_dlo, l1_dhi;      /* dirty span [lo, hi) */

    uint64_t rt_off;
    uint32_t rt_clusters;
    uint64_t rt_entries;
    uint64_t *rt;

    char *backing, *backing_fmt;
    struct q2_ext *exts;          /* extensions other than backing fmt */
    size_t n_exts;

    uint32_t nb_snapshots;
    uint64_t snap_off;
    uint64_t snap_bytes;          /* size of the snapshot table */
    struct q2_snap *snaps;

    struct q2_cache l2c, rcc;

    uint64_t free_hint;           /* cluster index: nothing free below it */
    uint64_t host_end;            /* bytes, cluster aligned: nothing allocated at or past it */
    /* End of the fresh data clusters linked into L2 tables (commit), and
     * how far that was when the file was last synced for an L2 write: a
     * table must not reach the disk before the file covers its clusters. */
    uint64_t linked_end, synced_end;
    uint64_t comp_cursor;         /* next free byte in the compressed-data cluster, 0 = none */
    /* Compressed blobs allocated back to back are gathered here and written
     * in one request (vd_q2_comp_flush) before any L2 table, any flush, and
     * any map() answer that names them: one pwrite per ~1 MiB instead of
     * one per cluster under the layer lock. */
    uint8_t *cpend;
    uint64_t cpend_off;
    size_t cpend_len, cpend_cap;

    struct q2_pfree *pf;          /* frees waiting for the metadata that dropped them */
    size_t npf, cappf;

    bool rc_unsynced, l2_unsynced;
    bool dirty_on_disk;           /* header dirty bit set by us (lazy refcounts) */
    bool lazy;
    bool no_reserve;              /* the file cannot reserve space (fallocate) */
    int meta_prealloc;            /* -1 unknown, 0/1: data clusters may be holes (as QEMU guesses) */
};

/* endian helpers */
static inline uint64_t q2_be64(const uint8_t *p)
{
    return ((uint64_t)p[0] << 56) | ((uint64_t)p[1] << 48) | ((uint64_t)p[2] << 40) |
           ((uint64_t)p[3] << 32) | ((uint64_t)p[4] << 24) | ((uint64_t)p[5] << 16) |
           ((uint64_t)p[6] << 8) | p[7];
}
static inline uint32_t q2_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline uint16_t q2_be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline void q2_put64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) { p[i] = (uint8_t)v; v >>= 8; }
}
static inline void q2_put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static inline void q2_put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }

/* ---- entries.c: pure encodings (unit-tested) ---- */
/* Set the derived geometry fields of s from cluster_bits, refcount_order, ext_l2. */
void vd_q2_geometry(struct q2 *s);
uint64_t vd_q2_rc_get(const uint8_t *blk, uint64_t idx, uint32_t order);
void vd_q2_rc_set(uint8_t *blk, uint64_t idx, uint32_t order, uint64_t v);
/* Compressed descriptor <-> host byte offset and byte length of the blob
 * (length counted to the end of its last 512-byte sector). */
uint64_t vd_q2_comp_encode(const struct q2 *s, uint64_t host, uint64_t len);
void vd_q2_comp_decode(const struct q2 *s, uint64_t entry, uint64_t *host, uint64_t *len);
/* Classify subcluster sc (0 without ext L2) of an entry; -EIO on reserved
 * bits or inconsistent bitmaps (with a message). */
int vd_q2_classify(const struct q2 *s, uint64_t entry, uint64_t bitmap, unsigned sc, enum q2_kind *k);

/* ---- cache.c ---- */
int  vd_q2_cache_init(struct q2_cache *c, struct q2 *s, const char *what, size_t n, size_t tsize,
                      int (*pre_write)(struct q2 *s));
void vd_q2_cache_fini(struct q2_cache *c);
/* The table at host offset off; load = false: a new zero-filled table. */
int  vd_q2_cache_get(struct q2_cache *c, uint64_t off, bool load, uint8_t **buf);
void vd_q2_cache_dirty(struct q2_cache *c, const uint8_t *buf);
void vd_q2_cache_fresh(struct q2_cache *c, const uint8_t *buf);
int  vd_q2_cache_flush(struct q2_cache *c);
void vd_q2_cache_drop(struct q2_cache *c, uint64_t off);
/* Put an already-written table in the cache (clean). */
int  vd_q2_cache_put_clean(struct q2_cache *c, uint64_t off, const uint8_t *buf);

/* Write durably without syncing the rest of the file (RWF_DSYNC on local
 * files: only this range is written back, then the disk cache flushed). */
int vd_q2_pwrite_durable(struct q2 *s, const void *buf, size_t len, uint64_t off);
size_t vd_q2_cache_ndirty(const struct q2_cache *c);

/* ---- refcount.c ---- */
int vd_q2_refcount(struct q2 *s, uint64_t cluster, uint64_t *rc);
/* Add delta to the refcount of cluster (allocating its block when needed). */
int vd_q2_rc_update(struct q2 *s, uint64_t cluster, int64_t delta);
/* Allocate a run of up to n contiguous free clusters (exact: all n),
 * refcount 1 each. *host: byte offset, *got: clusters. */
int vd_q2_alloc(struct q2 *s, uint64_t n, bool exact, uint64_t *host, uint64_t *got);
/* Decrement the refcounts of the clusters touched by [off, off+len) now. */
int vd_q2_free_now(struct q2 *s, uint64_t off, uint64_t len);
/* Same, once the metadata that stopped referencing them is on disk. */
int vd_q2_free_later(struct q2 *s, uint64_t off, uint64_t len);
int vd_q2_apply_frees(struct q2 *s);
int vd_q2_rc_pre_write(struct q2 *s);
int vd_q2_l2_pre_write(struct q2 *s);
int vd_q2_load_rt(struct q2 *s);

/* ---- l2.c ---- */
int vd_q2_l2_table(struct q2 *s, uint64_t l1i, bool create, uint8_t **tbl);
int vd_q2_map(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags, struct vd_map *m);
int vd_q2_alloc_op(struct vd_layer *l, uint64_t off, uint64_t len, struct vd_alloc *a);
int vd_q2_commit(struct vd_layer *l, struct vd_alloc *a, int err);
int vd_q2_discard(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags);
int vd_q2_zero(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags);
int vd_q2_write_l1(struct q2 *s);
int vd_q2_flush_all(struct q2 *s);
static inline uint64_t q2_l2_entry(const struct q2 *s, const uint8_t *t, uint64_t i)
{ return q2_be64(t + i * s->l2_esize); }
static inline uint64_t q2_l2_bitmap(const struct q2 *s, const uint8_t *t, uint64_t i)
{ return s->ext_l2 ? q2_be64(t + i * 16 + 8) : 0; }
static inline void q2_l2_set(const struct q2 *s, uint8_t *t, uint64_t i, uint64_t e, uint64_t bm)
{ q2_put64(t + i * s->l2_esize, e); if (s->ext_l2) q2_put64(t + i * 16 + 8, bm); }
/* Mark the image dirty on disk before the first metadata change (lazy refcounts). */
int vd_q2_mark_dirty(struct q2 *s);

/* ---- header.c ---- */
int  vd_q2_parse_header(struct q2 *s, const uint8_t *buf, size_t len, uint64_t file_size);
/* Rewrite cluster 0's header, extensions and backing name from s. */
int  vd_q2_write_header(struct q2 *s);
int  vd_q2_update_incompat(struct q2 *s, uint64_t incompat);
int  vd_q2_load_snapshots(struct q2 *s, uint64_t file_size);
void vd_q2_free_header(struct q2 *s);
/* Serialise a fresh header (create): returns bytes used or -errno. */
int  vd_q2_build_header(const struct q2 *s, uint8_t *buf, size_t len);

/* ---- compress.c ---- */
int vd_q2_compress(struct vd_layer *l, const void *in, size_t len, void *out, size_t *outlen);
int vd_q2_compress_buf(uint8_t ctype, uint64_t cs, const void *in, size_t len, void *out, size_t *outlen);
int vd_q2_decompress(uint8_t ctype, const void *in, size_t inlen, void *out, size_t outlen);
int vd_q2_read_compressed(struct vd_layer *l, const struct vd_map *m, void *buf);
int vd_q2_write_compressed(struct vd_layer *l, uint64_t off, const void *buf, size_t len);
int vd_q2_write_compressed_raw(struct vd_layer *l, uint64_t off, const void *blob, size_t bloblen);
/* Write the gathered compressed blobs out (kept on failure, for a retry). */
int vd_q2_comp_flush(struct q2 *s);

/* ---- check.c ---- */
int vd_q2_check(struct vd_layer *l, unsigned fix, struct vd_check *r);

/* ---- create.c ---- */
int vd_q2_create(const char *filename, const struct vd_create_opts *o);
int vd_q2_resize(struct vd_layer *l, uint64_t size, enum vd_prealloc prealloc);
/* Give [off, off+len) host clusters as preallocation does (metadata). */
int vd_q2_preallocate(struct q2 *s, uint64_t off, uint64_t len, enum vd_prealloc mode);

#endif

/* VMDK (VMware Virtual Disk Format 1.1): structures shared by the driver's
 * files. Sparse headers and tables are little-endian; sizes in the header
 * and descriptor are in 512-byte sectors. */
#ifndef VDISK_FORMATS_VMDK_H
#define VDISK_FORMATS_VMDK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "vdisk/format.h"

#define VMDK_SECTOR         512u
#define VMDK_MAGIC          0x564D444Bu     /* "KDMV" on disk */
#define VMDK_COWD_MAGIC     0x44574F43u     /* "COWD" on disk (ESX VMFSSPARSE) */
#define VMDK_GD_AT_END      0xFFFFFFFFFFFFFFFFull

#define VMDK_FLAG_NL_TEST   (1u << 0)
#define VMDK_FLAG_RGD       (1u << 1)
#define VMDK_FLAG_ZERO_GTE  (1u << 2)
#define VMDK_FLAG_COMPRESS  (1u << 16)
#define VMDK_FLAG_MARKERS   (1u << 17)

#define VMDK_MARKER_EOS     0
#define VMDK_MARKER_GT      1
#define VMDK_MARKER_GD      2
#define VMDK_MARKER_FOOTER  3

#define VMDK_DEFAULT_GRAIN  128u            /* sectors: 64 KiB */
#define VMDK_GTES           512u
#define VMDK_TWO_GB         (2048ull << 20)

/* Header field offsets (packed SparseExtentHeader). */
#define VH_MAGIC        0
#define VH_VERSION      4
#define VH_FLAGS        8
#define VH_CAPACITY     12
#define VH_GRAIN        20
#define VH_DESC_OFF     28
#define VH_DESC_SIZE    36
#define VH_NUM_GTES     44
#define VH_RGD_OFF      48
#define VH_GD_OFF       56
#define VH_OVERHEAD     64
#define VH_UNCLEAN      72
#define VH_NL_CHARS     73      /* '\n' ' ' '\r' '\n' */
#define VH_COMPRESS     77

static inline uint32_t le32(const void *v)
{
    const uint8_t *p = v;
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t le64(const void *p)
{
    return (uint64_t)le32(p) | (uint64_t)le32((const uint8_t *)p + 4) << 32;
}
static inline void put_le32(void *v, uint32_t x)
{
    uint8_t *p = v;
    p[0] = (uint8_t)x; p[1] = (uint8_t)(x >> 8); p[2] = (uint8_t)(x >> 16); p[3] = (uint8_t)(x >> 24);
}
static inline void put_le64(void *p, uint64_t x)
{
    put_le32(p, (uint32_t)x);
    put_le32((uint8_t *)p + 4, (uint32_t)(x >> 32));
}
static inline void put_le16(void *v, uint16_t x)
{
    uint8_t *p = v;
    p[0] = (uint8_t)x; p[1] = (uint8_t)(x >> 8);
}

/* ---- descriptor (vmdk_desc.c) ---- */
enum vmdk_access { VMDK_RW, VMDK_RDONLY, VMDK_NOACCESS };
enum vmdk_etype { VMDK_SPARSE, VMDK_FLAT, VMDK_ZERO, VMDK_VMFS, VMDK_VMFSSPARSE };

struct vmdk_desc_extent {
    enum vmdk_access access;
    uint64_t sectors;
    enum vmdk_etype type;
    char *file;             /* NULL for ZERO */
    uint64_t offset;        /* FLAT / VMFS: start in the file, sectors */
};

struct vmdk_desc_line {
    char *text;             /* the line as read (without newline) */
    char *key, *val;        /* a "key = value" line (value unquoted), else NULL */
    bool quoted;
};

struct vmdk_desc {
    struct vmdk_desc_line *lines;
    size_t nlines;
    struct vmdk_desc_extent *ext;
    size_t next;
    uint32_t cid, parent_cid;
    char *create_type;
    char *parent_hint;      /* parentFileNameHint, or NULL */
};

/* Parse text (len bytes, not NUL-terminated, may hold trailing NULs).
 * name is for messages. */
int  vd_vmdk_desc_parse(const char *name, const char *text, size_t len, struct vmdk_desc *d);
void vd_vmdk_desc_free(struct vmdk_desc *d);
/* The value for key, or NULL. */
const char *vd_vmdk_desc_get(const struct vmdk_desc *d, const char *key);
/* Set key (replacing its line, or adding one before the extents/ddb as fits). */
int  vd_vmdk_desc_set(struct vmdk_desc *d, const char *key, const char *val, bool quoted);
/* Serialise every line (unknown ones as read); malloc'ed, *len set. */
char *vd_vmdk_desc_text(const struct vmdk_desc *d, size_t *len);
const char *vd_vmdk_etype_name(enum vmdk_etype t);
/* Rewrite the size (in sectors) of extent line idx. */
int  vd_vmdk_desc_set_extent_sectors(struct vmdk_desc *d, size_t idx, uint64_t sectors);

/* ---- sparse extents (vmdk_sparse.c) ---- */
struct vmdk_sparse {
    uint32_t version, flags;
    bool cowd;                  /* ESX COWD (VMFSSPARSE) header */
    uint64_t capacity;          /* sectors */
    uint64_t grain;             /* sectors */
    uint32_t gtes;              /* entries per grain table */
    uint64_t gd_off, rgd_off;   /* sectors; rgd 0 when none */
    uint64_t desc_off, desc_size;
    uint32_t gd_n;              /* grain directory entries */
    uint32_t *gd, *rgd;         /* host order */
    uint32_t **gt, **rgt;       /* loaded on demand, per directory entry */
    uint64_t next;              /* byte offset for the next grain or table */
    uint64_t fsize;
    bool compressed, markers, zero_gte;
    uint8_t header[VMDK_SECTOR];
    /* streamOptimized writer (vmdk_stream.c) */
    bool stream;                /* append-only writer in use */
    bool stream_dirty;          /* GD / footer must be rewritten */
    uint8_t *gt_dirty;          /* per GD entry: the table needs (re)writing */
    uint64_t last_lba;
    /* Grain table and directory changes not yet written (per directory
     * entry, VMDK_PEND_*): linking a grain only changes the tables in
     * memory; vd_vmdk_sparse_write_links writes them out at a flush, after
     * the grains they point at are durable. */
    uint8_t *pend;
    bool any_pend;
};
#define VMDK_PEND_GT  1u        /* the table changed */
#define VMDK_PEND_RGT 2u        /* the redundant table changed */
#define VMDK_PEND_GD  4u        /* the directory entry is new */
#define VMDK_PEND_RGD 8u        /* the redundant directory entry is new */

struct vmdk_extent {
    enum vmdk_access access;
    enum vmdk_etype type;
    uint64_t start, sectors;    /* virtual, sectors */
    uint64_t flat_off;          /* bytes, FLAT / VMFS */
    struct vd_file *file;
    bool own_file;
    char *path;
    struct vmdk_sparse *sp;
};

struct vmdk {
    struct vmdk_desc desc;
    bool embedded;              /* the descriptor lives inside extent 0 */
    struct vmdk_extent *ext;
    size_t next;
    bool cid_updated;
    bool stream_type;           /* createType streamOptimized */
    struct vmdk_scratch *scratch;   /* uncompressed staging for stream writes */
    struct vmdk_pend { size_t ext; uint64_t g; } *pend;   /* grains between alloc and commit */
    size_t npend, cpend;
};

/* ---- driver internals shared with vmdk_ops.c (vmdk.c) ---- */
struct vmdk_extent *vd_vmdk_find_extent(struct vmdk *s, uint64_t sector);
/* The first change of this open: a new CID in the descriptor. */
int  vd_vmdk_touch_cid(struct vd_layer *l);
/* Write the (changed) descriptor back. */
int  vd_vmdk_write_desc(struct vd_layer *l);
/* True while grain g of extent ext is between alloc and commit. */
bool vd_vmdk_pending(const struct vmdk *s, size_t ext, uint64_t g);

/* ---- write-zeroes, discard, resize (vmdk_ops.c) ---- */
int  vd_vmdk_zero(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags);
int  vd_vmdk_discard(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags);
int  vd_vmdk_resize(struct vd_layer *l, uint64_t size, enum vd_prealloc prealloc);

int  vd_vmdk_sparse_open(const char *name, struct vd_file *f, struct vmdk_sparse **out);
void vd_vmdk_sparse_free(struct vmdk_sparse *s);
/* Read the header at offset 0 (or the footer copy) and validate it. */
int  vd_vmdk_sparse_header(const char *name, struct vd_file *f, uint8_t *hdr, uint64_t fsize);
/* Grain table entry for grain g of the extent (loads its table). */
int  vd_vmdk_sparse_gte(const char *name, struct vd_file *f, struct vmdk_sparse *s, uint64_t g, uint32_t *gte);
/* Link grain g at sector `sector` (both directories), allocating its grain
 * table when the directory has none. */
int  vd_vmdk_sparse_link(const char *name, struct vd_file *f, struct vmdk_sparse *s, uint64_t g, uint32_t sector);
int  vd_vmdk_sparse_write_links(const char *name, struct vd_file *f, struct vmdk_sparse *s);
/* A fresh sparse extent image into buf-less file: header, descriptor, tables. */
int  vd_vmdk_sparse_write_new(struct vd_file *f, uint64_t capacity, uint32_t version, uint32_t flags,
                           const char *desc, size_t desc_len, const char *name);
/* Decompress a grain (marker at host_off) into buf (unit bytes). */
int  vd_vmdk_read_grain(const char *name, struct vd_file *f, uint64_t host_off, uint32_t comp_len,
                     uint64_t expect_lba, void *buf, size_t unit);

/* ---- streamOptimized writer (vmdk_stream.c) ---- */
int  vd_vmdk_stream_new(struct vd_file *f, uint64_t capacity, const char *desc, size_t desc_len,
                     const char *name);
int  vd_vmdk_stream_begin(const char *name, struct vd_file *f, struct vmdk_sparse *s);
/* Compress one grain (len <= grain bytes, padded with zeros) with its
 * marker header into a malloc'ed blob padded to a sector. Pure: no state. */
int  vd_vmdk_compress_grain(const void *data, size_t len, size_t grain_bytes, uint64_t lba,
                         uint8_t **blob, size_t *blob_len);
/* zlib-compress one grain (padded to grain_bytes) into out; -ENOSPC when
 * it does not fit cap. Thread-safe. */
int  vd_vmdk_deflate(const void *in, size_t len, size_t grain_bytes, void *out, size_t cap, size_t *n);
/* A grain marker (lba, size) + the zlib stream, padded to a sector. */
int  vd_vmdk_frame_grain(uint64_t lba, const void *z, size_t zlen, uint8_t **blob, size_t *blob_len);
/* Append a compressed grain blob for grain g and link it in memory. */
int  vd_vmdk_stream_append(const char *name, struct vd_file *f, struct vmdk_sparse *s, uint64_t g,
                        const uint8_t *blob, size_t blob_len);
int  vd_vmdk_stream_finish(const char *name, struct vd_file *f, struct vmdk_sparse *s);

/* ---- create (vd_vmdk_create.c) ---- */
int  vd_vmdk_create(const char *filename, const struct vd_create_opts *o);
/* The descriptor text of an existing image file (embedded or separate). */
int  vd_vmdk_read_desc(const char *name, struct vd_file *f, char **text, size_t *len, bool *embedded);
uint32_t vd_vmdk_new_cid(void);

/* "thin", "lazy-zeroed", "eager-zeroed" (or "thick") for a host file that
 * holds a virtual disk of vsize bytes at [off, off+len) (vmdk_prov.c). */
const char *vd_provisioning_of(struct vd_file *f, uint64_t off, uint64_t len, uint64_t vsize);

#endif

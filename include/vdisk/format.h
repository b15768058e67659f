/* The image-format interface. A format translates addresses; the core moves
 * the data. A driver answers "where does virtual range [off, off+len) live?"
 * (map) and "give this write a place" (alloc, then commit once the data is
 * written), keeping its tables consistent across a crash at any point.
 * The core (block/) does the data I/O, copy-on-write of partial allocation
 * units from the layer below, zero detection, backing chains and requests.
 *
 * Locking: the core calls map/alloc/commit/discard/zero/flush/resize with
 * layer->lock held, so a driver needs no locks of its own. Driver calls are
 * synchronous: they may do metadata I/O with vd_file_pread/pwrite. */
#ifndef VDISK_FORMAT_H
#define VDISK_FORMAT_H

#include <stdbool.h>
#include <stdint.h>
#include <pthread.h>
#include <jansson.h>
#include "file.h"
#include "opts.h"

struct vd_layer;

enum vd_map_kind {
    VD_MAP_DATA,        /* data at file:host_off, writable in place */
    VD_MAP_ZERO,        /* reads as zeros here (host_off valid if host_valid) */
    VD_MAP_UNALLOC,     /* not in this layer: read the layer below (zeros if none) */
    VD_MAP_COMPRESSED,  /* compressed blob at file:host_off; read via read_compressed */
};

/* request flags (also passed to a driver's zero()) */
#define VD_REQ_FUA       0x1   /* write: durable when done */
#define VD_REQ_MAY_UNMAP 0x2   /* write-zeroes: may deallocate */
#define VD_REQ_FAST_ZERO 0x4   /* write-zeroes: fail -ENOTSUP rather than write zeros */

/* map flags */
#define VD_MAP_F_STATUS 0x1  /* exact data/zero/hole answer wanted (block status);
                                without it a driver may answer DATA for ranges
                                that merely read as zeros, when that is cheaper */
#define VD_MAP_F_WRITE  0x2  /* the answer is for a write: the image is about to
                                change (VMDK bumps its content ID once per open) */

struct vd_map {
    uint64_t len;            /* bytes from off this answer covers, > 0 */
    enum vd_map_kind kind;
    struct vd_file *file;    /* DATA, COMPRESSED (and ZERO with host_valid) */
    uint64_t host_off;       /* DATA: where off lives; COMPRESSED: start of blob */
    bool host_valid;         /* ZERO: host_off names space reserved for it */
    uint32_t comp_len;       /* COMPRESSED: blob bytes (upper bound) */
    uint32_t comp_unit;      /* COMPRESSED: bytes the blob decompresses to */
    uint64_t comp_voff;      /* COMPRESSED: virtual offset of the unit's start */
    bool reads_zero;         /* DATA with VD_MAP_F_STATUS: the host range is known to
                                read as zeros (a hole); block status adds "zero" */
};

struct vd_alloc {
    /* all set by the driver in alloc() */
    uint64_t off, len;          /* the part of the write this place serves
                                   (off as asked, 0 < len <= asked len) */
    uint64_t fill_off, fill_len;/* virtual span the core writes at host_off;
                                   contains [off, off+len); bytes outside the
                                   write get the layer's current content (COW) */
    struct vd_file *file;
    uint64_t host_off;          /* host offset of fill_off */
    bool fresh;                 /* the host span already reads as zeros, so a
                                   fill that is all zeros need not be written */
    uint64_t priv[4];           /* driver state handed back to commit() */
};

enum vd_prealloc { VD_PREALLOC_OFF, VD_PREALLOC_METADATA, VD_PREALLOC_FALLOC, VD_PREALLOC_FULL };

struct vd_create_opts {
    uint64_t size;               /* virtual size in bytes */
    const char *backing;         /* backing file name as to be recorded, or NULL */
    const char *backing_fmt;     /* its format, or NULL */
    enum vd_prealloc prealloc;   /* from provisioning= or preallocation= */
    struct vd_opts *opts;        /* the rest of -o, for format options */
};

/* One qemu-img-style check report (qemu-img check --output=json keys). */
struct vd_check {
    int64_t corruptions, leaks, check_errors;
    int64_t corruptions_fixed, leaks_fixed;
    int64_t image_end_offset;           /* -1 if n/a */
    int64_t total_clusters, allocated_clusters, fragmented_clusters, compressed_clusters; /* -1 if n/a */
    /* each problem is also printed by the driver through vd_check_report */
    void (*report)(void *opaque, const char *msg);
    void *report_opaque;
};
void vd_check_report(struct vd_check *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define VD_CHECK_FIX_LEAKS  0x1
#define VD_CHECK_FIX_ERRORS 0x2

/* Create-option descriptions, for --help and for refusing unknown keys. */
struct vd_create_opt_desc {
    const char *name;
    const char *help;
};

struct vd_format {
    const char *name;                   /* "raw", "qcow2", "vmdk", "vhd" */
    const char *const *aliases;         /* NULL-terminated, may be NULL ("vpc") */
    /* Every guest offset is the same offset of layer->file (raw): discard
     * and write-zeroes are the file's punch and zero, so the core can send
     * them to a backend that does them asynchronously (RBD). */
    bool identity_map;
    /* 0..100: how sure buf (the first bytes of f, len <= 64 KiB) is this format. */
    int  (*probe)(const uint8_t *buf, size_t len, struct vd_file *f);
    /* layer->file, filename, readonly are set; set size, alloc_unit, and
     * backing_name / backing_fmt when the image has a backing file. */
    int  (*open)(struct vd_layer *l);
    void (*close)(struct vd_layer *l);
    int  (*create)(const char *filename, const struct vd_create_opts *o);
    int  (*map)(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags, struct vd_map *m);
    /* Give [off, off+len) (not DATA in map) a place. NULL: never needed. */
    int  (*alloc)(struct vd_layer *l, uint64_t off, uint64_t len, struct vd_alloc *a);
    /* The data of a is on disk (err == 0) or failed (err < 0): link or undo. */
    int  (*commit)(struct vd_layer *l, struct vd_alloc *a, int err);
    /* Decompress the unit described by m into buf (m->comp_unit bytes). */
    int  (*read_compressed)(struct vd_layer *l, const struct vd_map *m, void *buf);
    /* Write one whole compressed unit at off (unit-aligned, len = unit or the
     * image's last partial unit); -ENOTSUP if the format cannot. */
    int  (*write_compressed)(struct vd_layer *l, uint64_t off, const void *buf, size_t len);
    /* Drop [off, off+len); what it reads as afterwards is the driver's choice
     * (zeros, or the layer below). -ENOTSUP: ignored (discard is advisory). */
    int  (*discard)(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags);
    /* Make [off, off+len) read as zeros without writing data; flags may hold
     * VD_REQ_MAY_UNMAP. -ENOTSUP: the core writes zeros instead. */
    int  (*zero)(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags);
    /* Write cached metadata out; sync any files other than l->file (extra
     * extents). The core then syncs l->file. */
    int  (*flush)(struct vd_layer *l);
    int  (*resize)(struct vd_layer *l, uint64_t size, enum vd_prealloc prealloc);
    int  (*check)(struct vd_layer *l, unsigned fix, struct vd_check *r);
    /* Add keys to qemu-img's info object: "cluster-size", "format-specific",
     * "snapshots", "dirty-flag"… (the core adds the generic ones). */
    int  (*info)(struct vd_layer *l, json_t *info);
    /* Called once l->backing is open, to check it is the right parent
     * (VMDK parentCID, VHD parent UUID); may be NULL. */
    int  (*backing_opened)(struct vd_layer *l);
    /* Rewrite the backing file name / format (rebase -u). */
    int  (*set_backing)(struct vd_layer *l, const char *name, const char *fmt);
    const struct vd_create_opt_desc *create_opts;   /* {NULL} terminated */
    /* Optional split of write_compressed for parallel compression (convert -c):
     * compress() is thread-safe and is called WITHOUT layer->lock, on any
     * thread: it compresses one whole unit (len = unit, or the image's last
     * partial unit, which it pads with zeros) into out (capacity *outlen,
     * give at least the unit size) and sets *outlen. -ENOSPC: the unit does
     * not shrink; write it with an ordinary write instead.
     * write_compressed_raw() is called WITH layer->lock held: it stores a
     * blob made by compress() as the unit at off (unit-aligned). */
    int  (*compress)(struct vd_layer *l, const void *in, size_t len, void *out, size_t *outlen);
    int  (*write_compressed_raw)(struct vd_layer *l, uint64_t off, const void *blob, size_t bloblen);
};

struct vd_layer {
    const struct vd_format *fmt;
    struct vd_file *file;
    char *filename;
    bool readonly;
    uint64_t size;              /* virtual size */
    uint32_t alloc_unit;        /* allocating writes within one unit are
                                   serialised by the core; 0 = never allocates */
    uint32_t cluster_size;      /* for info, 0 if n/a */
    char *backing_name;         /* as recorded in the image, or NULL */
    char *backing_fmt;          /* as recorded, or NULL */
    struct vd_layer *backing;   /* the opened layer below, or NULL */
    unsigned discard_unmap : 1; /* discard=unmap (else ignore) */
    void *priv;                 /* driver state */
    pthread_mutex_t lock;
    struct vd_inflight *inflight;   /* core-private */
    enum vd_cache cache;
    bool opened;                /* core-private: fmt->open succeeded */
    bool compressed_only;       /* set by open: data is stored only as whole
                                   compressed units, each written once
                                   (streamOptimized VMDK); convert then
                                   writes it as with -c */
};

/* Formats: raw always; others register in formats/registry.c. */
const struct vd_format *vd_format_find(const char *name);     /* name or alias */
/* The format of f by probing its content; -EINVAL with a message when no
 * format claims it (raw is never probed: -f raw must say so). */
int vd_format_probe(struct vd_file *f, const struct vd_format **out);
/* Add a format at run time (out-of-tree drivers, tests). */
int vd_format_register(const struct vd_format *f);
/* Iterate: i = 0, 1, … until NULL. */
const struct vd_format *vd_format_at(size_t i);

/* For a DATA answer m stored in place in a host file: trim m to the file's
 * current extent and make it ZERO (host_valid) over a hole, so block status
 * of flat files reports holes as qemu-img does. */
void vd_map_file_status(struct vd_map *m);

/* The path of a backing file as recorded in `image` (relative names are
 * relative to the image's folder; absolute names and protocol URIs are
 * kept). Free with free(); NULL when out of memory. */
char *vd_backing_path(const char *image, const char *backing);

/* Read [off, off+len) of layer l (and below) synchronously: for COW fills,
 * check and slow paths. */
int vd_layer_pread(struct vd_layer *l, void *buf, size_t len, uint64_t off);

#endif

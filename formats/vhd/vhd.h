/* VHD (Microsoft Virtual Hard Disk Image Format Specification, v1.0):
 * on-disk structures and helpers shared by the driver's files. All fields
 * are big-endian. */
#ifndef VDISK_FORMATS_VHD_H
#define VDISK_FORMATS_VHD_H

#include <stdbool.h>
#include <stdint.h>
#include "vdisk/format.h"

#define VHD_SECTOR          512u
#define VHD_FOOTER_SIZE     512u
#define VHD_DYNHDR_SIZE     1024u
#define VHD_BAT_UNUSED      0xFFFFFFFFu
#define VHD_TYPE_FIXED      2u
#define VHD_TYPE_DYNAMIC    3u
#define VHD_TYPE_DIFF       4u
#define VHD_DEFAULT_BLOCK   (2u << 20)
/* The largest geometry a footer can hold: 65535 cylinders, 16 heads, 255 sectors. */
#define VHD_CHS_MAX_SECTORS (65535ull * 16 * 255)
/* Seconds between 1970-01-01 and 2000-01-01 (the VHD epoch). */
#define VHD_EPOCH_OFFSET    946684800u

/* footer field offsets */
#define VF_COOKIE       0
#define VF_FEATURES     8
#define VF_VERSION      12
#define VF_DATA_OFF     16
#define VF_TIMESTAMP    24
#define VF_CREATOR_APP  28
#define VF_CREATOR_VER  32
#define VF_CREATOR_OS   36
#define VF_ORIG_SIZE    40
#define VF_CUR_SIZE     48
#define VF_GEOMETRY     56
#define VF_DISK_TYPE    60
#define VF_CHECKSUM     64
#define VF_UUID         68
#define VF_SAVED_STATE  84

/* dynamic header field offsets */
#define VH_COOKIE       0
#define VH_DATA_OFF     8
#define VH_TABLE_OFF    16
#define VH_VERSION      24
#define VH_MAX_ENTRIES  28
#define VH_BLOCK_SIZE   32
#define VH_CHECKSUM     36
#define VH_PARENT_UUID  40
#define VH_PARENT_TIME  56
#define VH_PARENT_NAME  64      /* 512 bytes UTF-16BE */
#define VH_LOCATORS     576     /* 8 entries of 24 bytes */

#define VHD_PLAT_W2RU   0x57327275u   /* relative Windows path, UTF-16LE */
#define VHD_PLAT_W2KU   0x57326B75u   /* absolute Windows path, UTF-16LE */
#define VHD_PLAT_MACX   0x4D616358u   /* file URL, UTF-8 */

static inline uint32_t vhd_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t vhd_be64(const uint8_t *p)
{
    return (uint64_t)vhd_be32(p) << 32 | vhd_be32(p + 4);
}
static inline void vhd_put32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}
static inline void vhd_put64(uint8_t *p, uint64_t v)
{
    vhd_put32(p, v >> 32); vhd_put32(p + 4, (uint32_t)v);
}

/* Driver state of an open image (vhd.c; the ops in vhd_ops.c share it). */
struct vhd {
    uint8_t footer[VHD_FOOTER_SIZE];
    uint8_t dynhdr[VHD_DYNHDR_SIZE];
    uint32_t type;
    /* dynamic and differencing */
    uint64_t bat_off;
    uint32_t max_entries;
    uint32_t block_size;
    uint32_t bitmap_size;       /* bytes, sector-padded */
    uint32_t *bat;              /* host order */
    uint8_t **bitmaps;          /* per block, loaded on demand (differencing) */
    uint64_t next;              /* where the next block goes (the footer sits here) */
    uint8_t *pending;           /* per block: a new block is being written (alloc..commit) */
};

const char *vd_vhd_name(struct vd_layer *l);
/* The sector bitmap of allocated block blk (read once, then cached). */
int  vd_vhd_bitmap(struct vd_layer *l, uint32_t blk, uint8_t **out);
/* Write the footer (s->footer) at offset off. */
int  vd_vhd_write_footer(struct vd_layer *l, uint64_t off);
/* Append a block at the end (the footer moves behind it) whose on-disk
 * bitmap is bm; the data area reads as zeros. Sets *block_off. Does not
 * link it in the BAT. */
int  vd_vhd_append_block(struct vd_layer *l, const uint8_t *bm, uint64_t *block_off);
/* Write BAT entry blk (host order value v) and cache it. */
int  vd_vhd_set_bat(struct vd_layer *l, uint32_t blk, uint32_t v);

static inline bool vhd_bit(const uint8_t *bm, uint64_t sec)
{
    return bm[sec / 8] & (0x80 >> (sec % 8));
}

/* vhd_ops.c */
int vd_vhd_zero(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags);
int vd_vhd_discard(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags);
int vd_vhd_resize(struct vd_layer *l, uint64_t size, enum vd_prealloc prealloc);
int vd_vhd_set_backing(struct vd_layer *l, const char *name, const char *fmt);

/* vhd_create.c: a parent's identity, for a differencing disk's header. */
struct vd_vhd_parent {
    uint8_t uuid[16];
    uint32_t mtime;
    uint64_t size;
    char *abs;          /* absolute path */
    const char *rel;    /* as recorded (relative to the child's folder) */
};
int vd_vhd_read_parent(const char *child, const char *backing, struct vd_vhd_parent *pi);
/* UTF-8 to UTF-16 (le or be, '/' as '\\' if backslash); bytes written. */
size_t vd_vhd_to_utf16(const char *s, uint8_t *out, size_t cap, bool le, bool backslash);
/* Fill header parent fields (uuid, time, name) and build the two locators'
 * data (W2ku absolute, W2ru relative) into loc[] (malloc'ed, sector-padded,
 * sizes in space[], used bytes in len[]). */
int vd_vhd_parent_locators(const struct vd_vhd_parent *pi, uint8_t *hdr, uint8_t *loc[2],
                           size_t space[2], size_t len[2]);

/* One's complement of the byte sum, skipping the 4 checksum bytes at csum_off. */
uint32_t vd_vhd_checksum(const uint8_t *buf, size_t len, size_t csum_off);
/* The specification's CHS algorithm for a sector count. */
void vd_vhd_geometry(uint64_t sectors, unsigned *cyl, unsigned *heads, unsigned *spt);
/* Virtual size in bytes of a footer, by its creator (see vhd_meta.c). */
uint64_t vd_vhd_footer_size(const uint8_t *footer);
/* True when footer has the cookie and a matching checksum. */
bool vd_vhd_footer_valid(const uint8_t *footer);

/* Provisioning of a host file as the file system holds it (vmdk_prov.c). */
const char *vd_provisioning_of(struct vd_file *f, uint64_t off, uint64_t len, uint64_t vsize);

int vd_vhd_create(const char *filename, const struct vd_create_opts *o);
int vd_vhd_probe(const uint8_t *buf, size_t len, struct vd_file *f);

#endif

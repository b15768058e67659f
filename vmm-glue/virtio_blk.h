/* virtio-blk device definitions (VIRTIO 1.2, 5.2). */
#ifndef VMM_GLUE_VIRTIO_BLK_H
#define VMM_GLUE_VIRTIO_BLK_H

#include <stdint.h>

#define VIRTIO_BLK_T_IN           0
#define VIRTIO_BLK_T_OUT          1
#define VIRTIO_BLK_T_FLUSH        4
#define VIRTIO_BLK_T_GET_ID       8
#define VIRTIO_BLK_T_DISCARD      11
#define VIRTIO_BLK_T_WRITE_ZEROES 13

#define VIRTIO_BLK_S_OK     0
#define VIRTIO_BLK_S_IOERR  1
#define VIRTIO_BLK_S_UNSUPP 2

#define VIRTIO_BLK_ID_BYTES 20
#define VIRTIO_BLK_WZ_F_UNMAP 1
#define VIRTIO_BLK_SECTOR 512

struct virtio_blk_outhdr {
    uint32_t type;
    uint32_t ioprio;
    uint64_t sector;
};

struct virtio_blk_dwz_seg {
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

struct virtio_blk_config {
    uint64_t capacity;             /* in 512-byte sectors */
    uint32_t size_max;
    uint32_t seg_max;
    struct { uint16_t cylinders; uint8_t heads, sectors; } geometry;
    uint32_t blk_size;
    uint8_t  physical_block_exp;
    uint8_t  alignment_offset;
    uint16_t min_io_size;
    uint32_t opt_io_size;
    uint8_t  writeback;
    uint8_t  unused0;
    uint16_t num_queues;
    uint32_t max_discard_sectors;
    uint32_t max_discard_seg;
    uint32_t discard_sector_alignment;
    uint32_t max_write_zeroes_sectors;
    uint32_t max_write_zeroes_seg;
    uint8_t  write_zeroes_may_unmap;
    uint8_t  unused1[3];
    uint32_t max_secure_erase_sectors;
    uint32_t max_secure_erase_seg;
    uint32_t secure_erase_sector_alignment;
} __attribute__((packed));

_Static_assert(sizeof(struct virtio_blk_config) == 72, "virtio-blk config layout");

#define VHB_CONFIG_WRITEBACK_OFF 32
#define VHB_MAX_DWZ_SECTORS (1u << 21)     /* 1 GiB per discard / write-zeroes */

#endif

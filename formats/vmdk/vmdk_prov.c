/* Provisioning of a thick host file as the file system sees it: eager-zeroed
 * when its blocks are written, lazy-zeroed when they are only reserved
 * (fallocate's unwritten extents), thin when most of it is not allocated.
 * FIEMAP tells unwritten extents apart; SEEK_DATA cannot once a read has
 * brought the file's pages into the cache. Shared by vmdk, vhd and df. */
#include <errno.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include "formats/vmdk/vmdk.h"

const char *vd_provisioning_of(struct vd_file *f, uint64_t off, uint64_t len, uint64_t vsize)
{
    struct stat st;
    if (!f || f->fd < 0 || fstat(f->fd, &st) < 0)
        return "thick";
    if ((uint64_t)st.st_blocks * 512 < vsize / 2)
        return "thin";
    size_t sz = sizeof(struct fiemap) + 4 * sizeof(struct fiemap_extent);
    struct fiemap *fm = calloc(1, sz);
    if (!fm)
        return "thick";
    fm->fm_start = off;
    fm->fm_length = len ? len : FIEMAP_MAX_OFFSET;
    fm->fm_extent_count = 4;
    const char *r = "thick";
    if (ioctl(f->fd, FS_IOC_FIEMAP, fm) == 0 && fm->fm_mapped_extents > 0) {
        r = "eager-zeroed";
        for (unsigned i = 0; i < fm->fm_mapped_extents; i++)
            if (fm->fm_extents[i].fe_flags & FIEMAP_EXTENT_UNWRITTEN)
                r = "lazy-zeroed";
    }
    free(fm);
    return r;
}

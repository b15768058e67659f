/* VHD creation: fixed, dynamic and differencing disks.
 * Provisioning: thin (preallocation=off/metadata) makes a dynamic disk,
 * lazy-zeroed (falloc) and eager-zeroed (full) a fixed one whose data is
 * fallocated or written with zeros. subformat= overrides the choice. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include "vdisk/error.h"
#include "vdisk/format.h"
#include "formats/vhd/vhd.h"

static void make_footer(uint8_t *f, uint32_t type, uint64_t size, bool force_size, uint64_t data_off)
{
    memset(f, 0, VHD_FOOTER_SIZE);
    memcpy(f + VF_COOKIE, "conectix", 8);
    vhd_put32(f + VF_FEATURES, 2);                 /* the reserved bit is always set */
    vhd_put32(f + VF_VERSION, 0x00010000);
    vhd_put64(f + VF_DATA_OFF, data_off);
    time_t now = time(NULL);
    vhd_put32(f + VF_TIMESTAMP, (uint32_t)(now - VHD_EPOCH_OFFSET));
    /* "vdsk" sizes by geometry like Virtual PC (the size is a whole CHS);
     * an exact size that is no CHS product is marked "qem2", the creator id
     * other readers already know as "size by current size". */
    memcpy(f + VF_CREATOR_APP, force_size ? "qem2" : "vdsk", 4);
    vhd_put32(f + VF_CREATOR_VER, 0x00010000);
    memcpy(f + VF_CREATOR_OS, "Wi2k", 4);
    vhd_put64(f + VF_ORIG_SIZE, size);
    vhd_put64(f + VF_CUR_SIZE, size);
    unsigned c, h, s;
    vd_vhd_geometry(size / VHD_SECTOR, &c, &h, &s);
    vhd_put32(f + VF_GEOMETRY, c << 16 | h << 8 | s);
    vhd_put32(f + VF_DISK_TYPE, type);
    getrandom(f + VF_UUID, 16, 0);
    f[VF_UUID + 6] = (f[VF_UUID + 6] & 0x0F) | 0x40;    /* RFC 4122 version 4 */
    f[VF_UUID + 8] = (f[VF_UUID + 8] & 0x3F) | 0x80;
    vhd_put32(f + VF_CHECKSUM, vd_vhd_checksum(f, VHD_FOOTER_SIZE, VF_CHECKSUM));
}

/* UTF-8 to UTF-16 (le or be); returns bytes written (no terminator). */
size_t vd_vhd_to_utf16(const char *s, uint8_t *out, size_t cap, bool le, bool backslash)
{
    size_t n = 0;
    const unsigned char *p = (const unsigned char *)s;
    while (*p && n + 2 <= cap) {
        uint32_t c = *p++;
        if (c >= 0xE0 && p[0] && p[1]) {
            c = (c & 0x0F) << 12 | (p[0] & 0x3F) << 6 | (p[1] & 0x3F); p += 2;
        } else if (c >= 0xC0 && p[0]) {
            c = (c & 0x1F) << 6 | (p[0] & 0x3F); p++;
        }
        if (backslash && c == '/')
            c = '\\';
        out[n + (le ? 0 : 1)] = (uint8_t)c;
        out[n + (le ? 1 : 0)] = (uint8_t)(c >> 8);
        n += 2;
    }
    return n;
}

static int write_zeros(struct vd_file *f, uint64_t off, uint64_t len, const char *name)
{
    int r = vd_file_write_zeros(f, off, len);
    return r < 0 ? vd_err(r, "%s: cannot write zeros: %s", name, vd_errmsg(r)) : 0;
}

static int read_parent_at(const char *child, const char *path, struct vd_vhd_parent *pi)
{
    struct vd_file *f;
    int r = vd_file_open(path, VD_FILE_RDONLY | VD_FILE_NOLOCK, VD_CACHE_WRITEBACK, &f);
    if (r < 0)
        return vd_err(r, "%s: cannot open the parent %s", child, path);
    uint64_t fsize;
    uint8_t foot[VHD_FOOTER_SIZE];
    r = vd_file_size(f, &fsize);
    if (r >= 0 && fsize >= VHD_FOOTER_SIZE)
        r = vd_file_pread(f, foot, sizeof(foot), fsize - VHD_FOOTER_SIZE);
    if (r >= 0 && !vd_vhd_footer_valid(foot))
        r = vd_file_pread(f, foot, sizeof(foot), 0);
    vd_file_close(f);
    if (r < 0 || fsize < VHD_FOOTER_SIZE || !vd_vhd_footer_valid(foot))
        return vd_err(-EINVAL, "%s: the parent %s is not a VHD (a differencing VHD needs a VHD parent)",
                      child, path);
    memcpy(pi->uuid, foot + VF_UUID, 16);
    pi->size = vd_vhd_footer_size(foot);
    struct stat st;
    pi->mtime = stat(path, &st) == 0 && st.st_mtime > VHD_EPOCH_OFFSET
                ? (uint32_t)(st.st_mtime - VHD_EPOCH_OFFSET) : 0;
    pi->abs = realpath(path, NULL);
    return pi->abs ? 0 : vd_err(-errno, "%s: cannot resolve %s", child, path);
}

/* The parent named `backing`, resolved against the child's folder as the
 * core resolves it when opening the chain. */
int vd_vhd_read_parent(const char *child, const char *backing, struct vd_vhd_parent *pi)
{
    char *path = vd_backing_path(child, backing);
    if (!path)
        return -ENOMEM;
    pi->rel = backing;
    int r = read_parent_at(child, path, pi);
    free(path);
    return r;
}

int vd_vhd_parent_locators(const struct vd_vhd_parent *pi, uint8_t *hdr, uint8_t *loc[2],
                           size_t space[2], size_t len[2])
{
    memcpy(hdr + VH_PARENT_UUID, pi->uuid, 16);
    vhd_put32(hdr + VH_PARENT_TIME, pi->mtime);
    memset(hdr + VH_PARENT_NAME, 0, 512);
    memset(hdr + VH_LOCATORS, 0, 8 * 24);
    const char *base = strrchr(pi->abs, '/');
    vd_vhd_to_utf16(base ? base + 1 : pi->abs, hdr + VH_PARENT_NAME, 512, false, false);
    /* W2ku: the absolute path; W2ru: relative to the child, ".\name". */
    char rel[PATH_MAX + 3];
    snprintf(rel, sizeof(rel), "%s%s", pi->rel[0] == '/' || pi->rel[0] == '.' ? "" : "./", pi->rel);
    const char *paths[2] = { pi->abs, rel };
    uint32_t codes[2] = { VHD_PLAT_W2KU, VHD_PLAT_W2RU };
    loc[0] = loc[1] = NULL;
    for (int i = 0; i < 2; i++) {
        size_t cap = strlen(paths[i]) * 2 + 2;
        space[i] = (cap + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
        loc[i] = calloc(1, space[i]);
        if (!loc[i]) {
            free(loc[0]);
            loc[0] = NULL;
            return -ENOMEM;
        }
        len[i] = vd_vhd_to_utf16(paths[i], loc[i], cap, true, true);
        uint8_t *e = hdr + VH_LOCATORS + i * 24;
        vhd_put32(e, codes[i]);
        vhd_put32(e + 4, (uint32_t)space[i]);   /* bytes, as Windows writes it */
        vhd_put32(e + 8, (uint32_t)len[i]);
        /* the offset (e + 16) is the caller's to set */
    }
    return 0;
}

int vd_vhd_create(const char *filename, const struct vd_create_opts *o)
{
    const char *sub = vd_opts_get(o->opts, "subformat");
    bool force = false;
    uint64_t bs = VHD_DEFAULT_BLOCK;
    int r = vd_opts_get_bool(o->opts, "force_size", &force);
    if (r < 0)
        return r;
    r = vd_opts_get_size(o->opts, "block_size", &bs);
    if (r < 0)
        return r;
    if (bs < 4096 || bs > (256u << 20) || (bs & (bs - 1)))
        return vd_err(-EINVAL, "%s: block_size must be a power of two from 4K to 256M", filename);
    bool fixed = o->prealloc == VD_PREALLOC_FALLOC || o->prealloc == VD_PREALLOC_FULL;
    if (sub) {
        if (!strcmp(sub, "fixed"))
            fixed = true;
        else if (!strcmp(sub, "dynamic"))
            fixed = false;
        else
            return vd_err(-EINVAL, "%s: unknown VHD subformat '%s' (fixed or dynamic)", filename, sub);
        if (!fixed && (o->prealloc == VD_PREALLOC_FALLOC || o->prealloc == VD_PREALLOC_FULL))
            return vd_err(-EINVAL, "%s: a dynamic VHD is thin; lazy-/eager-zeroed provisioning "
                          "needs subformat=fixed", filename);
    }
    struct vd_vhd_parent pi = { 0 };
    uint64_t size = o->size;
    if (o->backing) {
        if (fixed)
            return vd_err(-EINVAL, "%s: a differencing VHD is dynamic; it cannot be fixed", filename);
        if (o->backing_fmt && strcmp(o->backing_fmt, "vhd") && strcmp(o->backing_fmt, "vpc"))
            return vd_err(-EINVAL, "%s: a differencing VHD needs a VHD parent, not %s", filename,
                          o->backing_fmt);
        r = vd_vhd_read_parent(filename, o->backing, &pi);
        if (r < 0)
            return r;
        if (size == 0)
            size = pi.size;
        if (size != pi.size) {
            free(pi.abs);
            return vd_err(-EINVAL, "%s: a differencing VHD has its parent's size (%llu), not %llu",
                          filename, (unsigned long long)pi.size, (unsigned long long)size);
        }
        force = true;   /* the parent's size, exactly */
    }
    if (size == 0 || size > (2040ull << 30)) {
        free(pi.abs);
        return vd_err(-EINVAL, "%s: VHD size must be from 512 bytes to 2040 GiB", filename);
    }
    size = (size + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
    if (!force && size / VHD_SECTOR < VHD_CHS_MAX_SECTORS) {
        /* Round up to the smallest geometry that holds the size, so that
         * readers sizing by geometry (Virtual PC, QEMU) see every byte. */
        uint64_t sec = size / VHD_SECTOR;
        for (uint64_t t = sec;; t++) {
            unsigned c, h, s;
            vd_vhd_geometry(t, &c, &h, &s);
            if ((uint64_t)c * h * s >= sec) {
                size = (uint64_t)c * h * s * VHD_SECTOR;
                break;
            }
        }
    }   /* past the geometry limit every reader uses the current size */

    struct vd_file *f;
    r = vd_file_open(filename, VD_FILE_CREATE | VD_FILE_TRUNC, VD_CACHE_WRITEBACK, &f);
    if (r < 0) {
        free(pi.abs);
        return vd_err(r, "%s: cannot create: %s", filename, vd_errmsg(r));
    }
    uint8_t foot[VHD_FOOTER_SIZE];
    if (fixed) {
        make_footer(foot, VHD_TYPE_FIXED, size, force, UINT64_MAX);
        r = vd_file_truncate(f, size + VHD_FOOTER_SIZE);
        if (r >= 0 && o->prealloc == VD_PREALLOC_FALLOC)
            r = vd_file_allocate(f, 0, size);
        if (r >= 0 && o->prealloc == VD_PREALLOC_FULL)
            r = write_zeros(f, 0, size, filename);
        if (r >= 0)
            r = vd_file_pwrite(f, foot, sizeof(foot), size);
        if (r < 0)
            r = vd_err(r, "%s: cannot write the fixed disk: %s", filename, vd_errmsg(r));
        goto out;
    }

    make_footer(foot, o->backing ? VHD_TYPE_DIFF : VHD_TYPE_DYNAMIC, size, force, VHD_SECTOR);
    uint32_t entries = (uint32_t)((size + bs - 1) / bs);
    uint8_t hdr[VHD_DYNHDR_SIZE] = { 0 };
    memcpy(hdr + VH_COOKIE, "cxsparse", 8);
    vhd_put64(hdr + VH_DATA_OFF, UINT64_MAX);
    vhd_put32(hdr + VH_VERSION, 0x00010000);
    vhd_put32(hdr + VH_MAX_ENTRIES, entries);
    vhd_put32(hdr + VH_BLOCK_SIZE, (uint32_t)bs);
    uint64_t pos = VHD_SECTOR + VHD_DYNHDR_SIZE;
    uint8_t *loc[2] = { NULL, NULL };
    size_t loclen[2] = { 0, 0 }, locspace[2] = { 0, 0 };
    uint64_t locoff[2] = { 0, 0 };
    if (o->backing) {
        r = vd_vhd_parent_locators(&pi, hdr, loc, locspace, loclen);
        if (r < 0)
            goto out_loc;
        for (int i = 0; i < 2; i++) {
            locoff[i] = pos;
            pos += locspace[i];
            vhd_put64(hdr + VH_LOCATORS + i * 24 + 16, locoff[i]);
        }
    }
    uint64_t bat_off = pos;
    vhd_put64(hdr + VH_TABLE_OFF, bat_off);
    vhd_put32(hdr + VH_CHECKSUM, vd_vhd_checksum(hdr, sizeof(hdr), VH_CHECKSUM));
    uint64_t bat_bytes = ((uint64_t)entries * 4 + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
    uint8_t *bat = malloc(bat_bytes);
    if (!bat) {
        r = -ENOMEM;
        goto out_loc;
    }
    memset(bat, 0xFF, bat_bytes);
    r = vd_file_pwrite(f, foot, sizeof(foot), 0);
    if (r >= 0)
        r = vd_file_pwrite(f, hdr, sizeof(hdr), VHD_SECTOR);
    for (int i = 0; i < 2 && r >= 0; i++)
        if (loc[i])
            r = vd_file_pwrite(f, loc[i], locspace[i], locoff[i]);
    if (r >= 0)
        r = vd_file_pwrite(f, bat, bat_bytes, bat_off);
    if (r >= 0)
        r = vd_file_pwrite(f, foot, sizeof(foot), bat_off + bat_bytes);
    free(bat);
    if (r < 0)
        r = vd_err(r, "%s: cannot write the dynamic disk's metadata: %s", filename, vd_errmsg(r));
out_loc:
    free(loc[0]);
    free(loc[1]);
out:
    if (r >= 0)
        r = vd_file_sync(f);
    vd_file_close(f);
    free(pi.abs);
    return r < 0 ? r : 0;
}

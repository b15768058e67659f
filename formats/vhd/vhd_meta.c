/* VHD footer helpers: checksum, CHS geometry, virtual size by creator, probe. */
#include <string.h>
#include "formats/vhd/vhd.h"

uint32_t vd_vhd_checksum(const uint8_t *buf, size_t len, size_t csum_off)
{
    uint32_t sum = 0;
    for (size_t i = 0; i < len; i++)
        if (i < csum_off || i >= csum_off + 4)
            sum += buf[i];
    return ~sum;
}

/* Appendix "CHS Calculation" of the specification. */
void vd_vhd_geometry(uint64_t sectors, unsigned *cyl, unsigned *heads, unsigned *spt)
{
    uint64_t cth;
    unsigned h, s;
    if (sectors > VHD_CHS_MAX_SECTORS)
        sectors = VHD_CHS_MAX_SECTORS;
    if (sectors >= 65535ull * 16 * 63) {
        s = 255; h = 16;
        cth = sectors / s;
    } else {
        s = 17;
        cth = sectors / s;
        h = (unsigned)((cth + 1023) / 1024);
        if (h < 4)
            h = 4;
        if (cth >= h * 1024ull || h > 16) {
            s = 31; h = 16;
            cth = sectors / s;
        }
        if (cth >= h * 1024ull) {
            s = 63; h = 16;
            cth = sectors / s;
        }
    }
    *cyl = (unsigned)(cth / h);
    *heads = h;
    *spt = s;
}

bool vd_vhd_footer_valid(const uint8_t *f)
{
    return memcmp(f + VF_COOKIE, "conectix", 8) == 0 &&
           vhd_be32(f + VF_CHECKSUM) == vd_vhd_checksum(f, VHD_FOOTER_SIZE, VF_CHECKSUM);
}

/* Virtual PC and QEMU's own older images size a disk by its geometry, other
 * creators (Hyper-V "win ", QEMU with force_size "qem2", Disk2VHD, XenServer,
 * Citrix, Azure) by the current-size field. The geometry cannot describe
 * disks past ~127 GiB, so a saturated geometry means "use current size". */
uint64_t vd_vhd_footer_size(const uint8_t *f)
{
    static const char *const by_size[] = { "win ", "qem2", "d2v ", "tap", "CTXS", "wa\0\0" };
    const uint8_t *app = f + VF_CREATOR_APP;
    uint64_t cur = vhd_be64(f + VF_CUR_SIZE);
    for (size_t i = 0; i < sizeof(by_size) / sizeof(by_size[0]); i++)
        if (memcmp(app, by_size[i], 4) == 0)
            return cur;
    uint32_t g = vhd_be32(f + VF_GEOMETRY);
    uint64_t c = g >> 16, h = (g >> 8) & 0xff, s = g & 0xff;
    uint64_t chs = c * h * s;
    if (chs == 0 || chs >= VHD_CHS_MAX_SECTORS)
        return cur;
    return chs * VHD_SECTOR;
}

int vd_vhd_probe(const uint8_t *buf, size_t len, struct vd_file *f)
{
    if (len >= 8 && memcmp(buf, "conectix", 8) == 0)
        return 100;
    /* A fixed disk is its data followed by the footer. */
    uint64_t size;
    uint8_t foot[VHD_FOOTER_SIZE];
    if (!f || vd_file_size(f, &size) < 0 || size < VHD_FOOTER_SIZE)
        return 0;
    if (vd_file_pread(f, foot, sizeof(foot), size - VHD_FOOTER_SIZE) < 0)
        return 0;
    if (memcmp(foot, "conectix", 8) == 0)
        return 100;
    return 0;
}

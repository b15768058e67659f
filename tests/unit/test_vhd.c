/* VHD: footer checksum, the specification's CHS geometry, virtual size by
 * creator application, and a differencing disk's bitmap through the disk API. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "vdisk/block.h"
#include "formats/vhd/vhd.h"

static void geometry(void **state)
{
    unsigned c, h, s;
    vd_vhd_geometry(204800, &c, &h, &s);          /* 100 MiB */
    assert_int_equal(c * h * s <= 204800, 1);
    assert_true(h >= 4 && h <= 16);
    vd_vhd_geometry(VHD_CHS_MAX_SECTORS * 2, &c, &h, &s);
    assert_int_equal(c, 65535);
    assert_int_equal(h, 16);
    assert_int_equal(s, 255);
    /* the spec: small disks use 17 sectors per track and at least 4 heads */
    vd_vhd_geometry(2048, &c, &h, &s);
    assert_int_equal(s, 17);
    assert_int_equal(h, 4);
    assert_int_equal(c, 2048 / 17 / 4);
}

static void footer(uint8_t *f, const char *app, uint64_t cur, unsigned c, unsigned h, unsigned s)
{
    memset(f, 0, 512);
    memcpy(f, "conectix", 8);
    memcpy(f + VF_CREATOR_APP, app, 4);
    vhd_put64(f + VF_CUR_SIZE, cur);
    vhd_put32(f + VF_GEOMETRY, c << 16 | h << 8 | s);
    vhd_put32(f + VF_CHECKSUM, vd_vhd_checksum(f, 512, VF_CHECKSUM));
}

static void size_by_creator(void **state)
{
    uint8_t f[512];
    /* geometry 100/16/63 = 100800 sectors, current size a bit larger */
    uint64_t chs = 100800ull * 512, cur = chs + 4096;
    static const char *const by_chs[] = { "vpc ", "qemu", "vdsk" };
    static const char *const by_size[] = { "win ", "qem2", "d2v ", "tap\0", "CTXS", "wa\0\0" };
    for (size_t i = 0; i < 3; i++) {
        footer(f, by_chs[i], cur, 100, 16, 63);
        assert_true(vd_vhd_footer_valid(f));
        assert_int_equal(vd_vhd_footer_size(f), chs);
    }
    for (size_t i = 0; i < 6; i++) {
        footer(f, by_size[i], cur, 100, 16, 63);
        assert_int_equal(vd_vhd_footer_size(f), cur);
    }
    /* a saturated geometry means "use current size" whoever made it */
    footer(f, "vpc ", 200ull << 30, 65535, 16, 255);
    assert_int_equal(vd_vhd_footer_size(f), 200ull << 30);
    f[100] ^= 1;
    assert_false(vd_vhd_footer_valid(f));
}

static void diff_bitmap(void **state)
{
    char dir[] = "/tmp/test_vhd.XXXXXX", base[64], top[64], cmd[96];
    assert_non_null(mkdtemp(dir));
    snprintf(base, sizeof(base), "%s/base.vhd", dir);
    snprintf(top, sizeof(top), "%s/top.vhd", dir);
    struct vd_opts opts = { 0 };
    struct vd_create_opts co = { .size = 8 << 20, .opts = &opts };
    assert_int_equal(vd_image_create(base, "vhd", &co), 0);
    struct vd_disk *d;
    uint8_t a[8192], b[8192];
    memset(a, 0xaa, sizeof(a));
    assert_int_equal(vd_disk_open(base, NULL, &d), 0);
    assert_int_equal(vd_disk_pwrite(d, a, sizeof(a), 0, 0), 0);
    assert_int_equal(vd_disk_close(d), 0);
    struct vd_create_opts co2 = { .backing = "base.vhd", .backing_fmt = "vhd", .opts = &opts };
    assert_int_equal(vd_image_create(top, "vhd", &co2), 0);
    assert_int_equal(vd_disk_open(top, NULL, &d), 0);
    assert_int_equal(vd_disk_depth(d), 2);
    memset(b, 0xbb, 700);
    assert_int_equal(vd_disk_pwrite(d, b, 700, 1000, 0), 0);   /* sectors 1..3, partially */
    assert_int_equal(vd_disk_pread(d, b, sizeof(b), 0), 0);
    for (int i = 0; i < 8192; i++)
        assert_int_equal(b[i], i >= 1000 && i < 1700 ? 0xbb : 0xaa);
    /* block status: sectors 1..3 are the child's, the rest the parent's */
    struct vd_extent e;
    assert_int_equal(vd_disk_block_status(d, 512, 4096, &e), 0);
    assert_int_equal(e.depth, 0);
    assert_int_equal(e.len, 3 * 512);
    assert_int_equal(vd_disk_block_status(d, 2048, 4096, &e), 0);
    assert_int_equal(e.depth, 1);
    assert_int_equal(vd_disk_close(d), 0);
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(geometry),
        cmocka_unit_test(size_by_creator),
        cmocka_unit_test(diff_bitmap),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* VMDK: descriptor parsing and rewriting, sparse extents through the disk
 * API (allocation, redundant directory kept in step, CID bump). */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include "vdisk/block.h"
#include "vdisk/error.h"
#include "formats/vmdk/vmdk.h"

static const char qemu_desc[] =
    "# Disk DescriptorFile\n"
    "version=1\n"
    "CID=5f4b3669\n"
    "parentCID=ffffffff\n"
    "createType=\"twoGbMaxExtentFlat\"\n"
    "\n"
    "# Extent description\n"
    "RW 4194304 FLAT \"b-f001.vmdk\" 0\n"
    "RDONLY 100 VMFS \"with space.vmdk\" 7\n"
    "NOACCESS 50 ZERO\n"
    "\n"
    "# The Disk Data Base\n"
    "#DDB\n"
    "\n"
    "ddb.virtualHWVersion = \"4\"\n"
    "ddb.adapterType = \"lsilogic\"\n"
    "ddb.vendor.unknown = \"keep me\"\n";

static void desc_parse(void **state)
{
    struct vmdk_desc d;
    assert_int_equal(vd_vmdk_desc_parse("t", qemu_desc, sizeof(qemu_desc) - 1, &d), 0);
    assert_int_equal(d.cid, 0x5f4b3669);
    assert_int_equal(d.parent_cid, 0xffffffff);
    assert_string_equal(d.create_type, "twoGbMaxExtentFlat");
    assert_int_equal(d.next, 3);
    assert_int_equal(d.ext[0].access, VMDK_RW);
    assert_int_equal(d.ext[0].type, VMDK_FLAT);
    assert_int_equal(d.ext[0].sectors, 4194304);
    assert_string_equal(d.ext[0].file, "b-f001.vmdk");
    assert_int_equal(d.ext[1].access, VMDK_RDONLY);
    assert_int_equal(d.ext[1].type, VMDK_VMFS);
    assert_string_equal(d.ext[1].file, "with space.vmdk");
    assert_int_equal(d.ext[1].offset, 7);
    assert_int_equal(d.ext[2].type, VMDK_ZERO);
    assert_null(d.ext[2].file);
    assert_string_equal(vd_vmdk_desc_get(&d, "ddb.adapterType"), "lsilogic");
    vd_vmdk_desc_free(&d);
}

static void desc_rewrite_keeps_unknown(void **state)
{
    struct vmdk_desc d, d2;
    assert_int_equal(vd_vmdk_desc_parse("t", qemu_desc, sizeof(qemu_desc) - 1, &d), 0);
    assert_int_equal(vd_vmdk_desc_set(&d, "CID", "0000abcd", false), 0);
    assert_int_equal(vd_vmdk_desc_set(&d, "parentFileNameHint", "base.vmdk", true), 0);
    size_t len;
    char *t = vd_vmdk_desc_text(&d, &len);
    assert_non_null(t);
    assert_non_null(strstr(t, "CID=0000abcd\n"));
    assert_null(strstr(t, "5f4b3669"));
    assert_non_null(strstr(t, "ddb.vendor.unknown = \"keep me\"\n"));
    /* new header keys go before the extents */
    assert_true(strstr(t, "parentFileNameHint=\"base.vmdk\"") < strstr(t, "RW 4194304"));
    assert_int_equal(vd_vmdk_desc_parse("t2", t, len, &d2), 0);
    assert_int_equal(d2.cid, 0xabcd);
    assert_string_equal(d2.parent_hint, "base.vmdk");
    assert_int_equal(d2.next, 3);
    free(t);
    vd_vmdk_desc_free(&d);
    vd_vmdk_desc_free(&d2);
}

static void desc_bad(void **state)
{
    static const char *const bad[] = {
        "version=1\nRW 10 FLAT \"x\" 0\n",                                   /* no createType */
        "createType=\"monolithicFlat\"\n",                                    /* no extents */
        "createType=\"x\"\nRW 0 FLAT \"x\" 0\n",                               /* zero size */
        "createType=\"x\"\nRW 10 FLAT x 0\n",                                  /* unquoted */
        "createType=\"x\"\nRW 10 SPARSE \"x\" 5\n",                            /* offset on sparse */
        "createType=\"x\"\nRW 10 WEIRD \"x\"\n",
        "createType=\"x\"\nCID=123456789\nRW 10 FLAT \"x\" 0\n",              /* CID > 32 bits */
        "createType=\"x\"\nversion=4\nRW 10 FLAT \"x\" 0\n",
        "createType=\"x\"\nwhat is this\nRW 10 FLAT \"x\" 0\n",
        "createType=\"x\"\nRW 99999999999999999999 FLAT \"x\" 0\n",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct vmdk_desc d;
        vd_err_clear();
        int r = vd_vmdk_desc_parse("bad", bad[i], strlen(bad[i]), &d);
        assert_true(r < 0);
        assert_non_null(strstr(vd_errmsg(r), "bad"));   /* names the file */
    }
}

static char dir[64];

static int setup(void **state)
{
    snprintf(dir, sizeof(dir), "/tmp/test_vmdk.XXXXXX");
    assert_non_null(mkdtemp(dir));
    return 0;
}

static int teardown(void **state)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    return system(cmd);
}

static uint32_t le32_at(const char *path, uint64_t off)
{
    FILE *f = fopen(path, "rb");
    uint8_t b[4] = { 0 };
    assert_non_null(f);
    fseek(f, (long)off, SEEK_SET);
    assert_int_equal(fread(b, 1, 4, f), 4);
    fclose(f);
    return le32(b);
}

static void sparse_write_keeps_rgd_in_step(void **state)
{
    char path[128];
    snprintf(path, sizeof(path), "%s/s.vmdk", dir);
    struct vd_opts opts = { 0 };
    struct vd_create_opts co = { .size = 64 << 20, .opts = &opts };
    assert_int_equal(vd_image_create(path, "vmdk", &co), 0);
    struct vd_disk *d;
    assert_int_equal(vd_disk_open(path, NULL, &d), 0);
    uint8_t *buf = malloc(1 << 20), *rb = malloc(1 << 20);
    memset(buf, 0x5a, 1 << 20);
    assert_int_equal(vd_disk_pwrite(d, buf, 4096, 40 << 20, 0), 0);   /* grain 640, table 1 */
    assert_int_equal(vd_disk_pwrite(d, buf, 1 << 20, 1 << 20, 0), 0);
    assert_int_equal(vd_disk_pread(d, rb, 4096, 40 << 20), 0);
    assert_memory_equal(rb, buf, 4096);
    assert_int_equal(vd_disk_pread(d, rb, 4096, (40 << 20) + 4096), 0);
    for (int i = 0; i < 4096; i++)
        assert_int_equal(rb[i], 0);
    assert_int_equal(vd_disk_close(d), 0);
    /* Both directories point at tables that hold the same grain entries. */
    uint64_t rgd = le32_at(path, 48), gd = le32_at(path, 56);
    uint32_t rgt1 = le32_at(path, rgd * 512 + 4), gt1 = le32_at(path, gd * 512 + 4);
    assert_int_not_equal(rgt1, gt1);
    uint32_t a = le32_at(path, (uint64_t)gt1 * 512 + (640 - 512) * 4);
    uint32_t b = le32_at(path, (uint64_t)rgt1 * 512 + (640 - 512) * 4);
    assert_true(a > 1);
    assert_int_equal(a, b);
    free(buf);
    free(rb);
}

static void cid_changes_once_per_open(void **state)
{
    char path[128];
    snprintf(path, sizeof(path), "%s/c.vmdk", dir);
    struct vd_opts opts = { 0 };
    struct vd_create_opts co = { .size = 8 << 20, .opts = &opts };
    assert_int_equal(vd_image_create(path, "vmdk", &co), 0);
    struct vd_disk *d;
    assert_int_equal(vd_disk_open(path, NULL, &d), 0);
    struct vmdk *s = vd_disk_top(d)->priv;
    uint32_t c0 = s->desc.cid;
    uint8_t b[512] = { 1 };
    assert_int_equal(vd_disk_pread(d, b, 512, 0), 0);
    assert_int_equal(s->desc.cid, c0);
    assert_int_equal(vd_disk_pwrite(d, b, 512, 0, 0), 0);
    uint32_t c1 = s->desc.cid;
    assert_int_not_equal(c1, c0);
    assert_int_equal(vd_disk_pwrite(d, b, 512, 1 << 20, 0), 0);
    assert_int_equal(s->desc.cid, c1);
    assert_int_equal(vd_disk_close(d), 0);
    assert_int_equal(vd_disk_open(path, NULL, &d), 0);
    s = vd_disk_top(d)->priv;
    assert_int_equal(s->desc.cid, c1);          /* it was written out */
    assert_int_equal(vd_disk_close(d), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(desc_parse),
        cmocka_unit_test(desc_rewrite_keeps_unknown),
        cmocka_unit_test(desc_bad),
        cmocka_unit_test_setup_teardown(sparse_write_keeps_rgd_in_step, setup, teardown),
        cmocka_unit_test_setup_teardown(cid_changes_once_per_open, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Option strings and sizes. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>
#include <cmocka.h>
#include "vdisk/opts.h"

static void parse_pairs(void **state)
{
    struct vd_opts o = {0};
    assert_int_equal(vd_opts_parse(&o, "cluster_size=64K,lazy_refcounts=on,name=a,,b,flag"), 0);
    assert_int_equal(o.n, 4);
    uint64_t cs = 0;
    bool lazy = false, flag = false;
    assert_int_equal(vd_opts_get_size(&o, "cluster_size", &cs), 0);
    assert_int_equal(cs, 65536);
    assert_int_equal(vd_opts_get_bool(&o, "lazy_refcounts", &lazy), 0);
    assert_true(lazy);
    assert_string_equal(vd_opts_get(&o, "name"), "a,b");
    assert_int_equal(vd_opts_check_unused(&o), -EINVAL);   /* flag not used yet */
    assert_int_equal(vd_opts_get_bool(&o, "flag", &flag), 0);
    assert_true(flag);
    assert_int_equal(vd_opts_check_unused(&o), 0);
    vd_opts_free(&o);
}

static void parse_bad(void **state)
{
    struct vd_opts o = {0};
    assert_int_equal(vd_opts_parse(&o, "a=1,,,=2"), -EINVAL);
    vd_opts_free(&o);
    assert_int_equal(vd_opts_parse(&o, "x=maybe"), 0);
    bool b;
    assert_int_equal(vd_opts_get_bool(&o, "x", &b), -EINVAL);
    vd_opts_free(&o);
}

static void sizes(void **state)
{
    uint64_t v;
    assert_int_equal(vd_parse_size("512", &v), 0);
    assert_int_equal(v, 512);
    assert_int_equal(vd_parse_size("10G", &v), 0);
    assert_int_equal(v, 10ULL << 30);
    assert_int_equal(vd_parse_size("1.5k", &v), 0);
    assert_int_equal(v, 1536);
    assert_int_equal(vd_parse_size("8E", &v), -ERANGE);
    assert_int_equal(vd_parse_size("16E", &v), -ERANGE);
    assert_int_equal(vd_parse_size("-1", &v), -EINVAL);
    assert_int_equal(vd_parse_size("1X", &v), -EINVAL);
    assert_int_equal(vd_parse_size("", &v), -EINVAL);
    assert_int_equal(vd_parse_size("1.5", &v), -EINVAL);
    assert_int_equal(vd_parse_size("0.8e88e", &v), -EINVAL);   /* found by fuzz_opts */
    assert_int_equal(vd_parse_size("1e3", &v), -EINVAL);
    assert_int_equal(vd_parse_size(" 1", &v), -EINVAL);
    assert_int_equal(vd_parse_size("1.", &v), -EINVAL);
    assert_int_equal(vd_parse_size("0.5M", &v), 0);
    assert_int_equal(v, 512 * 1024);
    assert_int_equal(vd_parse_size("7.5E", &v), 0);           /* just under 8 EiB */
    assert_int_equal(vd_parse_size("15.9E", &v), -ERANGE);
    assert_int_equal(vd_parse_size("99999999999999999999999", &v), -ERANGE);
}

static void size_strings(void **state)
{
    char b[32];
    vd_format_size(1ULL << 30, b, sizeof(b));
    assert_string_equal(b, "1 GiB");
    vd_format_size(512, b, sizeof(b));
    assert_string_equal(b, "512 B");
    vd_format_size(1000 * 1024, b, sizeof(b));
    assert_string_equal(b, "0.977 MiB");
    vd_format_size(196608, b, sizeof(b));
    assert_string_equal(b, "192 KiB");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(parse_pairs),
        cmocka_unit_test(parse_bad),
        cmocka_unit_test(sizes),
        cmocka_unit_test(size_strings),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* The power-loss model of tests/helpers/plfs.c (tests/helpers/plfs_core.h):
 * after a loss every sector holds what the last kept change touching it
 * left, or its content at the last sync; the size is that of the last kept
 * change of size. Checked on hand-made cases and against a reference that
 * keeps a snapshot of the whole file after every change. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include "tests/helpers/plfs_core.h"

#define MAXF (24 * PLFS_SECTOR)        /* the random files stay below this */

static int tmpfd(void)
{
    char name[] = "/tmp/test_plfs.XXXXXX";
    int fd = mkstemp(name);
    assert_true(fd >= 0);
    unlink(name);
    return fd;
}

static void put(int fd, char c, uint64_t len, uint64_t off)
{
    uint8_t b[8192];
    assert_true(len <= sizeof(b));
    memset(b, c, len);
    assert_int_equal(plfs_pwrite_full(fd, b, len, off), 0);
}

static char at(int fd, uint64_t off)
{
    uint8_t c;
    assert_int_equal(plfs_pread_full(fd, &c, 1, off), 0);
    return (char)c;
}

static uint64_t fsize(int fd)
{
    struct stat sb;
    assert_int_equal(fstat(fd, &sb), 0);
    return (uint64_t)sb.st_size;
}

/* Two writes over the same sector after a sync, every subset kept. */
static void test_two_writes(void **unused)
{
    for (int mask = 0; mask < 4; mask++) {
        int fd = tmpfd();
        struct plfs_state st;
        put(fd, 'o', 2048, 0);
        assert_int_equal(plfs_init(&st, fd), 0);
        uint8_t a[600], b[100];
        memset(a, 'a', sizeof(a));
        memset(b, 'b', sizeof(b));
        assert_int_equal(plfs_write(&st, a, sizeof(a), 100, false), 0);   /* sectors 0, 1 */
        assert_int_equal(plfs_write(&st, b, sizeof(b), 50, false), 0);    /* sector 0 */
        bool keep[2] = { mask & 1, mask & 2 };
        assert_int_equal(plfs_revert(&st, keep), 0);
        assert_int_equal(st.n, 0);
        /* sector 0: the second write when kept (with what the first left
         * there: a disk writes whole sectors), else the first's, else old */
        char s0_50 = keep[1] ? 'b' : 'o', s0_200 = keep[1] || keep[0] ? 'a' : 'o';
        assert_int_equal(at(fd, 50), s0_50);
        assert_int_equal(at(fd, 200), s0_200);
        assert_int_equal(at(fd, 10), 'o');
        /* sector 1: only the first write */
        assert_int_equal(at(fd, 600), keep[0] ? 'a' : 'o');
        assert_int_equal(at(fd, 1024), 'o');
        assert_int_equal(fsize(fd), 2048);
        plfs_fini(&st);
        close(fd);
    }
}

/* Changes before a sync survive; a growing write that is lost takes the
 * size back; an O_DSYNC write is always kept. */
static void test_sync_size_dsync(void **unused)
{
    int fd = tmpfd();
    struct plfs_state st;
    assert_int_equal(plfs_init(&st, fd), 0);
    uint8_t x[1024];
    memset(x, 'x', sizeof(x));
    assert_int_equal(plfs_write(&st, x, 1024, 0, false), 0);
    assert_int_equal(plfs_sync(&st), 0);
    memset(x, 'y', sizeof(x));
    assert_int_equal(plfs_write(&st, x, 1024, 4096, false), 0);        /* grows to 5120 */
    memset(x, 'z', sizeof(x));
    assert_int_equal(plfs_write(&st, x, 512, 512, true), 0);           /* O_DSYNC */
    assert_int_equal(plfs_truncate(&st, 700), 0);                       /* cuts z */
    assert_int_equal(st.n, 3);
    bool keep[3] = { false, false, false };
    assert_int_equal(plfs_revert(&st, keep), 0);
    assert_int_equal(fsize(fd), 1024);
    assert_int_equal(at(fd, 0), 'x');
    assert_int_equal(at(fd, 600), 'z');
    plfs_fini(&st);
    close(fd);
}

/* A lost hole punch and a lost shrink give the data back. */
static void test_punch_shrink(void **unused)
{
    int fd = tmpfd();
    struct plfs_state st;
    put(fd, 'd', 8192, 0);
    assert_int_equal(plfs_init(&st, fd), 0);
    assert_int_equal(plfs_fallocate(&st, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 4096), 0);
    assert_int_equal(at(fd, 5000), 0);
    assert_int_equal(plfs_truncate(&st, 1000), 0);
    assert_int_equal(plfs_truncate(&st, 3000), 0);
    assert_int_equal(at(fd, 2000), 0);
    bool keep[3] = { true, false, true };       /* punch and regrowth kept, shrink lost */
    assert_int_equal(plfs_revert(&st, keep), 0);
    assert_int_equal(fsize(fd), 3000);
    assert_int_equal(at(fd, 999), 'd');
    assert_int_equal(at(fd, 2999), 'd');
    plfs_fini(&st);
    close(fd);
}

/* ---- random changes against a reference ---- */

struct snap {
    uint8_t data[MAXF];
    uint64_t size;
};

static uint64_t rnd(uint64_t *s, uint64_t n)
{
    return plfs_rand(s) % n;
}

static void test_random_reference(void **unused)
{
    static struct snap base, after[64];
    uint64_t touch[64][2];
    bool sizer[64];
    uint8_t buf[MAXF];
    for (uint64_t run = 0; run < 800; run++) {
        uint64_t rng = run * 7919 + 1;
        int fd = tmpfd();
        struct plfs_state st;
        base.size = rnd(&rng, MAXF / 2);
        for (uint64_t i = 0; i < MAXF; i++)
            base.data[i] = i < base.size ? (uint8_t)(1 + rnd(&rng, 255)) : 0;
        assert_int_equal(plfs_pwrite_full(fd, base.data, base.size, 0), 0);
        assert_int_equal(ftruncate(fd, (off_t)base.size), 0);
        assert_int_equal(plfs_init(&st, fd), 0);
        struct snap cur = base;
        int nops = (int)(1 + rnd(&rng, 12)), n = 0;
        for (int k = 0; k < nops; k++) {
            uint64_t op = rnd(&rng, 10), off = rnd(&rng, MAXF / 2), len = 1 + rnd(&rng, MAXF / 2 - 1);
            uint64_t old = cur.size;
            bool dsync = false;
            if (op == 9) {      /* a sync: the reference starts again from here */
                assert_int_equal(plfs_sync(&st), 0);
                base = cur;
                n = 0;
                continue;
            }
            if (op <= 4 || op == 8) {
                dsync = op == 8;
                for (uint64_t i = 0; i < len; i++)
                    buf[i] = (uint8_t)(1 + rnd(&rng, 255));
                assert_int_equal(plfs_write(&st, buf, len, off, dsync), 0);
                memcpy(cur.data + off, buf, len);
                if (off + len > cur.size)
                    cur.size = off + len;
                touch[n][0] = plfs_down(off);
                touch[n][1] = plfs_up(off + len);
            } else if (op == 5) {
                uint64_t ns = rnd(&rng, MAXF);
                assert_int_equal(plfs_truncate(&st, ns), 0);
                if (ns < cur.size) {
                    memset(cur.data + ns, 0, cur.size - ns);
                    touch[n][0] = plfs_down(ns);
                    touch[n][1] = plfs_up(cur.size);
                } else {
                    touch[n][0] = touch[n][1] = 0;
                }
                cur.size = ns;
            } else {            /* 6: punch a hole, 7: zero a range (may grow) */
                int mode = op == 6 ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE;
                assert_int_equal(plfs_fallocate(&st, mode, off, len), 0);
                uint64_t cend = off + len < cur.size ? off + len : cur.size;
                if (cend > off) {
                    memset(cur.data + off, 0, cend - off);
                    touch[n][0] = plfs_down(off);
                    touch[n][1] = plfs_up(cend);
                } else {
                    touch[n][0] = touch[n][1] = 0;
                }
                if (op == 7 && off + len > cur.size)
                    cur.size = off + len;
            }
            if (touch[n][0] == touch[n][1] && cur.size == old && !dsync)
                continue;       /* nothing changed: no record */
            sizer[n] = cur.size != old;
            after[n] = cur;
            n++;
        }
        assert_int_equal(st.n, (size_t)n);
        bool keep[64];
        for (int i = 0; i < n; i++)
            keep[i] = st.r[i].durable || rnd(&rng, 2);
        /* what the model says */
        struct snap want = { .size = base.size };
        for (int i = 0; i < n; i++)
            if (keep[i] && sizer[i])
                want.size = after[i].size;
        for (uint64_t s = 0; s < MAXF; s += PLFS_SECTOR) {
            const struct snap *from = &base;
            for (int i = 0; i < n; i++)
                if (keep[i] && touch[i][0] <= s && s < touch[i][1])
                    from = &after[i];
            memcpy(want.data + s, from->data + s, PLFS_SECTOR);
        }
        assert_int_equal(plfs_revert(&st, keep), 0);
        assert_int_equal(fsize(fd), want.size);
        assert_int_equal(plfs_pread_full(fd, buf, want.size, 0), 0);
        if (memcmp(buf, want.data, want.size)) {
            for (uint64_t i = 0; i < want.size; i++)
                if (buf[i] != want.data[i]) {
                    print_error("run %" PRIu64 ": byte %" PRIu64 " is %u, the model says %u\n", run, i, buf[i],
                                want.data[i]);
                    break;
                }
            fail();
        }
        plfs_fini(&st);
        close(fd);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_two_writes),
        cmocka_unit_test(test_sync_size_dsync),
        cmocka_unit_test(test_punch_shrink),
        cmocka_unit_test(test_random_reference),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

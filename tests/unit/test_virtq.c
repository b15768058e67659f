/* Split virtqueue handling against hand-built rings in memfd "guest
 * memory": well-formed chains, indirect tables, notification suppression,
 * inflight recovery, and the hostile cases (loops, over-long chains,
 * nested or malformed indirect tables, addresses outside guest memory,
 * wrong directions, bad heads and indices). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdbool.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include "vmm-glue/virtq.h"

#define GPA0   0x100000ull      /* guest-physical base of region 0 */
#define MEM    (1u << 20)       /* 1 MiB */
#define GPA1   (GPA0 + MEM)     /* region 1 directly follows */
#define NUM    8

struct env {
    int fd[2];
    uint8_t *mem[2];            /* our own view of the regions */
    struct vhu_mtab *mt;
    struct virtq q;
    struct virtq_desc *desc;
    struct virtq_avail *avail;
    struct virtq_used *used;
    struct iovec iov[16];
    struct virtq_chain c;
};

static int setup(void **state)
{
    struct env *e = calloc(1, sizeof(*e));
    e->mt = vhu_mtab_new();
    for (int i = 0; i < 2; i++) {
        e->fd[i] = memfd_create("guest", 0);
        assert_int_equal(ftruncate(e->fd[i], MEM), 0);
        e->mem[i] = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_SHARED, e->fd[i], 0);
        assert_true(e->mem[i] != MAP_FAILED);
        struct vhu_region r = { i ? GPA1 : GPA0, MEM, 0x7000000000ull + i * MEM, 0 };
        assert_int_equal(vhu_mtab_add(e->mt, e->fd[i], &r), 0);
    }
    /* rings at the start of region 0, found through the table as the
     * back-end finds them (user addresses) */
    e->desc = vhu_uva(e->mt, 0x7000000000ull, virtq_desc_bytes(NUM));
    e->avail = vhu_uva(e->mt, 0x7000000000ull + 0x1000, virtq_avail_bytes(NUM));
    e->used = vhu_uva(e->mt, 0x7000000000ull + 0x2000, virtq_used_bytes(NUM));
    assert_non_null(e->desc);
    assert_non_null(e->avail);
    assert_non_null(e->used);
    assert_int_equal(virtq_init(&e->q, NUM, e->desc, e->avail, e->used, e->mt, true, 0), 0);
    e->c.iov = e->iov;
    e->c.cap = 16;
    *state = e;
    return 0;
}

static int teardown(void **state)
{
    struct env *e = *state;
    vhu_mtab_unref(e->mt);
    for (int i = 0; i < 2; i++) { munmap(e->mem[i], MEM); close(e->fd[i]); }
    free(e);
    return 0;
}

static void put_desc(struct virtq_desc *t, unsigned i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
    t[i] = (struct virtq_desc){ addr, len, flags, next };
}

static void offer(struct env *e, uint16_t head)
{
    e->avail->ring[e->avail->idx % NUM] = head;
    e->avail->idx++;
}

/* A virtio-blk style read: header (out), data (in), status (in). */
static void test_simple_chain(void **state)
{
    struct env *e = *state;
    uint16_t head;
    put_desc(e->desc, 0, GPA0 + 0x4000, 16, VIRTQ_DESC_F_NEXT, 1);
    put_desc(e->desc, 1, GPA0 + 0x5000, 4096, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
    put_desc(e->desc, 2, GPA0 + 0x6000, 1, VIRTQ_DESC_F_WRITE, 0);
    offer(e, 0);
    assert_int_equal(virtq_pop(&e->q, &head), 1);
    assert_int_equal(head, 0);
    assert_int_equal(virtq_pop(&e->q, &head), 0);
    assert_int_equal(virtq_map_chain(&e->q, head, &e->c), 0);
    assert_int_equal(e->c.niov, 3);
    assert_int_equal(e->c.nout, 1);
    assert_int_equal(e->c.out_len, 16);
    assert_int_equal(e->c.in_len, 4097);
    assert_ptr_equal(e->c.iov[1].iov_base, vhu_gpa(e->mt, GPA0 + 0x5000, 1));
    virtq_push(&e->q, head, 4097);
    assert_int_equal(e->used->idx, 1);
    assert_int_equal(e->used->ring[0].id, 0);
    assert_int_equal(e->used->ring[0].len, 4097);
}

static void test_indirect_chain(void **state)
{
    struct env *e = *state;
    struct virtq_desc *t = (void *)(e->mem[0] + 0x8000);
    put_desc(t, 0, GPA0 + 0x4000, 16, VIRTQ_DESC_F_NEXT, 1);
    put_desc(t, 1, GPA0 + 0x5000, 512, VIRTQ_DESC_F_NEXT, 2);
    put_desc(t, 2, GPA0 + 0x6000, 1, VIRTQ_DESC_F_WRITE, 0);
    put_desc(e->desc, 3, GPA0 + 0x8000, 3 * 16, VIRTQ_DESC_F_INDIRECT, 0);
    assert_int_equal(virtq_map_chain(&e->q, 3, &e->c), 0);
    assert_int_equal(e->c.niov, 3);
    assert_int_equal(e->c.nout, 2);
    assert_int_equal(e->c.out_len, 528);
    assert_int_equal(e->c.in_len, 1);
}

/* A buffer that runs from region 0 into region 1 maps to two iovecs. */
static void test_buffer_across_regions(void **state)
{
    struct env *e = *state;
    put_desc(e->desc, 0, GPA1 - 100, 300, VIRTQ_DESC_F_WRITE, 0);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), 0);
    assert_int_equal(e->c.niov, 2);
    assert_int_equal(e->c.iov[0].iov_len, 100);
    assert_ptr_equal(e->c.iov[0].iov_base, vhu_gpa(e->mt, GPA1 - 100, 100));
    assert_int_equal(e->c.iov[1].iov_len, 200);
    assert_ptr_equal(e->c.iov[1].iov_base, vhu_gpa(e->mt, GPA1, 200));
    assert_null(vhu_gpa(e->mt, GPA1 - 100, 300));   /* not in one region */
}

static void test_loop(void **state)
{
    struct env *e = *state;
    put_desc(e->desc, 0, GPA0 + 0x4000, 16, VIRTQ_DESC_F_NEXT, 1);
    put_desc(e->desc, 1, GPA0 + 0x5000, 16, VIRTQ_DESC_F_NEXT, 0);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
    /* a descriptor pointing at itself */
    put_desc(e->desc, 2, GPA0 + 0x4000, 16, VIRTQ_DESC_F_NEXT, 2);
    assert_int_equal(virtq_map_chain(&e->q, 2, &e->c), -EIO);
}

/* A whole chain naming a bad buffer still yields the driver's status
 * byte (its last, device-writable descriptor) so the request can fail
 * with IOERR; a read-only last descriptor yields none. */
static void test_status_after_bad_buffer(void **state)
{
    struct env *e = *state;
    put_desc(e->desc, 0, GPA0 + 0x4000, 16, VIRTQ_DESC_F_NEXT, 1);
    put_desc(e->desc, 1, 0x10, 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
    put_desc(e->desc, 2, GPA0 + 0x6000, 1, VIRTQ_DESC_F_WRITE, 0);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
    assert_ptr_equal(e->c.status, vhu_gpa(e->mt, GPA0 + 0x6000, 1));
    put_desc(e->desc, 2, GPA0 + 0x6000, 1, 0, 0);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
    assert_null(e->c.status);
    /* the status itself outside memory */
    put_desc(e->desc, 1, GPA0 + 0x5000, 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
    put_desc(e->desc, 2, GPA1 + MEM, 1, VIRTQ_DESC_F_WRITE, 0);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
    assert_null(e->c.status);
}

static void test_next_out_of_table(void **state)
{
    struct env *e = *state;
    put_desc(e->desc, 0, GPA0 + 0x4000, 16, VIRTQ_DESC_F_NEXT, NUM);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
    put_desc(e->desc, 0, GPA0 + 0x4000, 16, VIRTQ_DESC_F_NEXT, 0xffff);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
}

static void test_indirect_hostile(void **state)
{
    struct env *e = *state;
    struct virtq_desc *t = (void *)(e->mem[0] + 0x8000);
    /* a loop inside the table */
    put_desc(t, 0, GPA0 + 0x4000, 16, VIRTQ_DESC_F_NEXT, 1);
    put_desc(t, 1, GPA0 + 0x4000, 16, VIRTQ_DESC_F_NEXT, 0);
    put_desc(e->desc, 0, GPA0 + 0x8000, 2 * 16, VIRTQ_DESC_F_INDIRECT, 0);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
    /* next beyond the table's length (the table is 2 entries) */
    put_desc(t, 1, GPA0 + 0x4000, 16, VIRTQ_DESC_F_NEXT, 2);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
    /* nested indirect */
    put_desc(t, 1, GPA0 + 0x8000, 32, VIRTQ_DESC_F_INDIRECT, 0);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
    /* INDIRECT together with NEXT */
    put_desc(e->desc, 0, GPA0 + 0x8000, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
    /* a length that is not a whole number of descriptors, or zero */
    put_desc(e->desc, 0, GPA0 + 0x8000, 20, VIRTQ_DESC_F_INDIRECT, 0);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
    put_desc(e->desc, 0, GPA0 + 0x8000, 0, VIRTQ_DESC_F_INDIRECT, 0);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
    /* a table outside guest memory, or straddling its end */
    put_desc(e->desc, 0, 0x10, 32, VIRTQ_DESC_F_INDIRECT, 0);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
    put_desc(e->desc, 0, GPA1 + MEM - 16, 32, VIRTQ_DESC_F_INDIRECT, 0);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
}

static void test_bad_addresses(void **state)
{
    struct env *e = *state;
    /* below guest memory */
    put_desc(e->desc, 0, 0, 16, 0, 0);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
    /* running past the end of the last region */
    put_desc(e->desc, 0, GPA1 + MEM - 8, 16, VIRTQ_DESC_F_WRITE, 0);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
    /* wrapping around the address space */
    put_desc(e->desc, 0, 0xfffffffffffffff0ull, 0x100, 0, 0);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
    /* a huge length inside the table */
    put_desc(e->desc, 0, GPA0, 0xffffffffu, 0, 0);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
}

/* More segments than the caller's iovec array holds. */
static void test_too_many_segments(void **state)
{
    struct env *e = *state;
    struct virtq_desc *t = (void *)(e->mem[0] + 0x8000);
    for (int i = 0; i < 20; i++)
        put_desc(t, i, GPA0 + 0x4000 + i * 64, 64, i < 19 ? VIRTQ_DESC_F_NEXT : 0, i + 1);
    put_desc(e->desc, 0, GPA0 + 0x8000, 20 * 16, VIRTQ_DESC_F_INDIRECT, 0);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
    assert_true(e->c.niov <= e->c.cap);
}

/* Device-readable after device-writable: refused, and what was mapped
 * before the fault keeps the writable tail (for the status byte). */
static void test_wrong_direction(void **state)
{
    struct env *e = *state;
    put_desc(e->desc, 0, GPA0 + 0x4000, 16, VIRTQ_DESC_F_NEXT, 1);
    put_desc(e->desc, 1, GPA0 + 0x6000, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
    put_desc(e->desc, 2, GPA0 + 0x5000, 512, 0, 0);
    assert_int_equal(virtq_map_chain(&e->q, 0, &e->c), -EIO);
    assert_int_equal(e->c.nout, 1);
    assert_int_equal(e->c.niov, 2);
    assert_ptr_equal(e->c.iov[1].iov_base, vhu_gpa(e->mt, GPA0 + 0x6000, 1));
}

static void test_bad_head_breaks_ring(void **state)
{
    struct env *e = *state;
    uint16_t head;
    offer(e, NUM);           /* a head outside the table */
    assert_int_equal(virtq_pop(&e->q, &head), -EIO);
    assert_true(e->q.broken);
    assert_int_equal(virtq_pop(&e->q, &head), -EIO);
    assert_false(virtq_arm(&e->q));
}

static void test_avail_index_jump(void **state)
{
    struct env *e = *state;
    uint16_t head;
    e->avail->idx = NUM + 1;  /* more entries than the ring has */
    assert_int_equal(virtq_pop(&e->q, &head), -EIO);
    assert_true(e->q.broken);
}

static void test_event_idx(void **state)
{
    struct env *e = *state;
    uint16_t *used_event = &e->avail->ring[NUM];
    uint16_t *avail_event = (uint16_t *)&e->used->ring[NUM];
    uint16_t head;
    for (int i = 0; i < 4; i++) {
        put_desc(e->desc, i, GPA0 + 0x4000, 16, 0, 0);
        offer(e, i);
    }
    for (int i = 0; i < 4; i++) assert_int_equal(virtq_pop(&e->q, &head), 1);
    /* arm: the driver is asked to kick for entry 4 */
    assert_false(virtq_arm(&e->q));
    assert_int_equal(*avail_event, 4);
    offer(e, 0);
    assert_true(virtq_arm(&e->q));   /* one arrived meanwhile */
    /* first push always notifies; then only when used_event is crossed */
    *used_event = 0;
    virtq_push(&e->q, 0, 1);
    assert_true(virtq_should_notify(&e->q));
    virtq_push(&e->q, 1, 1);
    assert_false(virtq_should_notify(&e->q));   /* used_event 0 already passed */
    *used_event = 2;                            /* wants to hear when idx passes 2 */
    virtq_push(&e->q, 2, 1);
    assert_true(virtq_should_notify(&e->q));
    virtq_push(&e->q, 3, 1);
    assert_false(virtq_should_notify(&e->q));
}

static void test_no_event_idx(void **state)
{
    struct env *e = *state;
    assert_int_equal(virtq_init(&e->q, NUM, e->desc, e->avail, e->used, e->mt, false, 0), 0);
    virtq_push(&e->q, 0, 0);
    assert_true(virtq_should_notify(&e->q));
    e->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
    virtq_push(&e->q, 1, 0);
    assert_false(virtq_should_notify(&e->q));
}

static void test_init_rejects(void **state)
{
    struct env *e = *state;
    struct virtq q;
    assert_int_equal(virtq_init(&q, 0, e->desc, e->avail, e->used, e->mt, true, 0), -EINVAL);
    assert_int_equal(virtq_init(&q, VIRTQ_MAX_SIZE + 1, e->desc, e->avail, e->used, e->mt, true, 0), -EINVAL);
    assert_int_equal(virtq_init(&q, NUM, (char *)e->desc + 8, e->avail, e->used, e->mt, true, 0), -EINVAL);
    assert_int_equal(virtq_init(&q, NUM, e->desc, (char *)e->avail + 1, e->used, e->mt, true, 0), -EINVAL);
}

/* A back-end takes 3 chains, returns 1 and dies; the next one resubmits
 * the other 2 in submission order and continues after them. */
static void test_inflight_recovery(void **state)
{
    struct env *e = *state;
    size_t sz = vhu_inflight_queue_size(NUM);
    struct vhu_inflight_queue *r = calloc(1, sz);
    uint16_t heads[NUM], head;
    assert_int_equal(virtq_inflight_attach(&e->q, r, 0, heads, NUM), 0);
    assert_int_equal(r->version, 1);
    assert_int_equal(r->desc_num, NUM);
    offer(e, 5); offer(e, 2); offer(e, 7); offer(e, 1);
    for (int i = 0; i < 3; i++) assert_int_equal(virtq_pop(&e->q, &head), 1);
    assert_int_equal(r->desc[5].inflight, 1);
    assert_int_equal(r->desc[2].inflight, 1);
    assert_int_equal(r->desc[7].inflight, 1);
    virtq_push(&e->q, 5, 0);
    assert_int_equal(r->desc[5].inflight, 0);
    assert_int_equal(r->used_idx, 1);

    struct virtq q2;
    assert_int_equal(virtq_init(&q2, NUM, e->desc, e->avail, e->used, e->mt, true, 0), 0);
    assert_int_equal(virtq_inflight_attach(&q2, r, 0, heads, NUM), 2);
    assert_int_equal(heads[0], 2);
    assert_int_equal(heads[1], 7);
    assert_int_equal(q2.last_avail, 3);
    assert_int_equal(virtq_pop(&q2, &head), 1);
    assert_int_equal(head, 1);
    free(r);
}

/* Died after publishing used->idx but before clearing the batch's
 * inflight flag: the flag is cleared on attach, the chain not resubmitted. */
static void test_inflight_last_batch(void **state)
{
    struct env *e = *state;
    struct vhu_inflight_queue *r = calloc(1, vhu_inflight_queue_size(NUM));
    uint16_t heads[NUM], head;
    assert_int_equal(virtq_inflight_attach(&e->q, r, 0, heads, NUM), 0);
    offer(e, 4); offer(e, 6);
    assert_int_equal(virtq_pop(&e->q, &head), 1);
    assert_int_equal(virtq_pop(&e->q, &head), 1);
    virtq_push(&e->q, 4, 0);
    /* undo the last two steps of the push, as a crash would */
    r->desc[4].inflight = 1;
    r->used_idx = 0;
    struct virtq q2;
    assert_int_equal(virtq_init(&q2, NUM, e->desc, e->avail, e->used, e->mt, true, 0), 0);
    assert_int_equal(virtq_inflight_attach(&q2, r, 0, heads, NUM), 1);
    assert_int_equal(heads[0], 6);
    assert_int_equal(r->desc[4].inflight, 0);
    assert_int_equal(q2.last_avail, 2);
    free(r);
}

static void test_mtab_rejects(void **state)
{
    struct env *e = *state;
    struct vhu_mtab *t = vhu_mtab_new();
    struct vhu_region over = { GPA0 + 0x1000, 0x1000, 0x9000000000ull, 0 };
    struct vhu_region past = { 0x40000000, MEM, 0x9100000000ull, 4096 };   /* beyond the file */
    struct vhu_region wrap = { 0xfffffffffffff000ull, 0x2000, 0x9200000000ull, 0 };
    struct vhu_region empty = { 0x50000000, 0, 0x9300000000ull, 0 };
    assert_int_equal(vhu_mtab_add(e->mt, e->fd[0], &over), -EINVAL);
    assert_int_equal(vhu_mtab_add(t, e->fd[0], &past), -EINVAL);
    assert_int_equal(vhu_mtab_add(t, e->fd[0], &wrap), -EINVAL);
    assert_int_equal(vhu_mtab_add(t, e->fd[0], &empty), -EINVAL);
    /* a copy without region 0 no longer translates it, the original does */
    struct vhu_region r0 = { GPA0, MEM, 0, 0 };
    bool found;
    struct vhu_mtab *c = vhu_mtab_copy(e->mt, &r0, &found);
    assert_true(found);
    assert_null(vhu_gpa(c, GPA0, 16));
    assert_non_null(vhu_gpa(c, GPA1, 16));
    assert_non_null(vhu_gpa(e->mt, GPA0, 16));
    vhu_mtab_unref(c);
    vhu_mtab_unref(t);
}

static void test_iov_helpers(void **state)
{
    char a[4] = "abcd", b[6] = "efghij", out[10];
    struct iovec v[2] = { { a, 4 }, { b, 6 } }, s[2];
    assert_int_equal(virtq_iov_copy_from(v, 2, 2, out, 5), 5);
    assert_memory_equal(out, "cdefg", 5);
    assert_int_equal(virtq_iov_slice(v, 2, 3, 4, s, 2), 2);
    assert_ptr_equal(s[0].iov_base, a + 3);
    assert_int_equal(s[0].iov_len, 1);
    assert_int_equal(s[1].iov_len, 3);
    assert_int_equal(virtq_iov_slice(v, 2, 3, 40, s, 2), -1);
    assert_int_equal(virtq_iov_copy_to(v, 2, 9, "Z", 1), 1);
    assert_int_equal(b[5], 'Z');
}

/* ---- dirty logging ---- */

#define PG(gpa) ((gpa) / 4096)

/* A log memfd of size bytes at offset off (the rest of the file poisoned). */
static struct vhu_log *make_log(uint64_t size, uint64_t off, int *fdp, uint8_t **filep, size_t *flen)
{
    int fd = memfd_create("log", 0);
    size_t len = off + size + 4096;
    assert_int_equal(ftruncate(fd, len), 0);
    uint8_t *f = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    assert_true(f != MAP_FAILED);
    memset(f, 0, len);
    memset(f, 0x5a, off);
    memset(f + off + size, 0x5a, len - off - size);
    struct vhu_log *l = NULL;
    assert_int_equal(vhu_log_map(fd, size, off, &l), 0);
    *fdp = fd;
    *filep = f;
    *flen = len;
    return l;
}

/* Exactly the pages in want[] are set in the bitmap (bytes bits[0, size)). */
static void assert_bits(const uint8_t *bits, uint64_t size, const uint64_t *want, int n)
{
    for (uint64_t page = 0; page < size * 8; page++) {
        bool set = bits[page / 8] & (1u << (page % 8)), wanted = false;
        for (int i = 0; i < n; i++) wanted |= want[i] == page;
        if (set != wanted) fail_msg("page %llu (gpa 0x%llx): bit %d, expected %d",
                                    (unsigned long long)page, (unsigned long long)page * 4096, set, wanted);
    }
}

/* A read completes with the log on: the data pages (one buffer across
 * three pages), the status byte's page and the used ring's page, which is
 * logged at log_guest_addr (here a different address from where the ring
 * is mapped, as the spec allows), and nothing else. */
static void test_log_read(void **state)
{
    struct env *e = *state;
    int fd; uint8_t *file; size_t flen;
    uint64_t size = PG(GPA1 + MEM) / 8 + 1;          /* covers both regions */
    struct vhu_log *l = make_log(size, 0, &fd, &file, &flen);
    const uint64_t used_log = GPA0 + 0xf0000;        /* page 0x1f0 */
    uint16_t head;
    e->q.log = l;
    e->q.log_used = true;
    e->q.log_used_gpa = used_log;
    put_desc(e->desc, 0, GPA0 + 0x4000, 16, VIRTQ_DESC_F_NEXT, 1);
    put_desc(e->desc, 1, GPA0 + 0x5800, 8192, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
    put_desc(e->desc, 2, GPA0 + 0x9010, 1, VIRTQ_DESC_F_WRITE, 0);
    offer(e, 0);
    assert_int_equal(virtq_pop(&e->q, &head), 1);
    assert_int_equal(virtq_map_chain(&e->q, head, &e->c), 0);
    assert_bits(l->bits, size, NULL, 0);             /* nothing before completion */
    vhu_log_iov(l, e->mt, e->c.iov + e->c.nout, e->c.niov - e->c.nout);
    virtq_push(&e->q, head, 8193);
    uint64_t want[] = { PG(GPA0 + 0x5800), PG(GPA0 + 0x6000), PG(GPA0 + 0x7000),
                        PG(GPA0 + 0x9010), PG(used_log) };
    assert_bits(l->bits, size, want, 5);
    /* avail_event, at the used ring's end: its page is logged */
    memset(l->bits, 0, size);
    e->q.log_used_gpa = GPA0 + 0x10000 - 4 - 8 * NUM;   /* the ring's last bytes on the next page */
    assert_false(virtq_arm(&e->q));
    uint64_t want2[] = { PG(GPA0 + 0x10000) };
    assert_bits(l->bits, size, want2, 1);
    /* the used ring is not logged without VHOST_VRING_F_LOG */
    memset(l->bits, 0, size);
    e->q.log_used = false;
    offer(e, 0);
    assert_int_equal(virtq_pop(&e->q, &head), 1);
    virtq_push(&e->q, head, 1);
    assert_false(virtq_arm(&e->q));
    assert_bits(l->bits, size, NULL, 0);
    assert_int_equal(l->dropped, 0);
    /* a buffer across the region boundary marks pages in both */
    memset(l->bits, 0, size);
    struct iovec v[2];
    v[0].iov_base = vhu_gpa(e->mt, GPA1 - 16, 16); v[0].iov_len = 16;
    v[1].iov_base = vhu_gpa(e->mt, GPA1, 4097);   v[1].iov_len = 4097;
    vhu_log_iov(l, e->mt, v, 2);
    uint64_t want3[] = { PG(GPA1 - 1), PG(GPA1), PG(GPA1 + 4096) };
    assert_bits(l->bits, size, want3, 3);
    /* host memory outside the table is not guest memory: ignored */
    memset(l->bits, 0, size);
    uint8_t local[64];
    vhu_log_host(l, e->mt, local, sizeof(local));
    assert_bits(l->bits, size, NULL, 0);
    vhu_log_free(l);
    munmap(file, flen);
    close(fd);
}

/* Marks beyond the bitmap are dropped and counted, never written; a log at
 * an unaligned offset in its file is found there. */
static void test_log_bounds(void **state)
{
    (void)state;
    int fd; uint8_t *file; size_t flen;
    struct vhu_log *l = make_log(3, 4100, &fd, &file, &flen);   /* pages 0..23 */
    vhu_log_mark(l, 5 * 4096 + 100, 12 * 4096);                 /* pages 5..17 */
    uint64_t want[13];
    for (int i = 0; i < 13; i++) want[i] = 5 + i;
    assert_bits(file + 4100, 3, want, 13);
    assert_int_equal(l->dropped, 0);
    vhu_log_mark(l, 22 * 4096, 3 * 4096);                       /* 22, 23, then past */
    assert_true(file[4102] & 0xc0);
    assert_int_equal(l->dropped, 1);
    vhu_log_mark(l, 1ull << 40, 4096);
    vhu_log_mark(l, UINT64_MAX - 10, 100);                      /* wraps */
    vhu_log_mark(l, 7, 0);                                      /* empty: nothing */
    assert_int_equal(l->dropped, 3);
    for (size_t i = 0; i < flen; i++)
        if (i < 4100 || i >= 4103) assert_int_equal(file[i], 0x5a);
    vhu_log_free(l);
    /* what the front-end may not give */
    struct vhu_log *x;
    assert_int_equal(vhu_log_map(fd, 0, 0, &x), -EINVAL);
    assert_int_equal(vhu_log_map(fd, flen, 1, &x), -EINVAL);          /* past the file */
    assert_int_equal(vhu_log_map(fd, 16, UINT64_MAX - 8, &x), -EINVAL); /* wraps */
    assert_int_equal(vhu_log_map(fd, VHU_LOG_MAX_BYTES + 1, 0, &x), -EINVAL);
    assert_int_equal(vhu_log_map(-1, 16, 0, &x), -EBADF);
    munmap(file, flen);
    close(fd);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)
        T(test_simple_chain), T(test_indirect_chain), T(test_buffer_across_regions),
        T(test_loop), T(test_status_after_bad_buffer), T(test_next_out_of_table), T(test_indirect_hostile),
        T(test_bad_addresses), T(test_too_many_segments), T(test_wrong_direction),
        T(test_bad_head_breaks_ring), T(test_avail_index_jump), T(test_event_idx),
        T(test_no_event_idx), T(test_init_rejects), T(test_inflight_recovery),
        T(test_inflight_last_batch), T(test_mtab_rejects), T(test_iov_helpers),
        T(test_log_read), T(test_log_bounds),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Guest-controlled ring contents: the input becomes a guest's memory
 * (descriptor table, indirect tables, available ring) and the device side
 * pops and maps every chain it offers. Nothing may be read or written
 * outside the guest regions (ASan sees our own mapping only through the
 * table, so a stray translation shows as a crash), and every iovec mapped
 * must lie inside a region. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include "vmm-glue/virtq.h"

#define GPA0 0x10000ull
#define MEM  (64u * 1024)
#define GPA1 (GPA0 + MEM)          /* a second, adjacent region */
#define NUM  16

static struct vhu_mtab *mt;
static uint8_t *base[2];

static void init(void)
{
    mt = vhu_mtab_new();
    for (int i = 0; i < 2; i++) {
        int fd = memfd_create("fuzz-guest", 0);
        if (fd < 0 || ftruncate(fd, MEM) < 0) abort();
        struct vhu_region r = { i ? GPA1 : GPA0, MEM, 0x500000000ull + i * MEM, 0 };
        if (vhu_mtab_add(mt, fd, &r) < 0) abort();
        close(fd);
        base[i] = vhu_gpa(mt, r.gpa, MEM);
        if (!base[i]) abort();
    }
}

static int inside(const struct iovec *v)
{
    for (int i = 0; i < 2; i++) {
        uint8_t *p = v->iov_base;
        if (p >= base[i] && p + v->iov_len <= base[i] + MEM) return 1;
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!mt) init();
    /* region 0: [0, 4K) descriptor table, [4K, 8K) avail, [8K, 12K) used,
     * the rest (and region 1) buffers and indirect tables: all from input */
    for (int i = 0; i < 2; i++) memset(base[i], 0, MEM);
    size_t n0 = size < MEM ? size : MEM;
    memcpy(base[0], data, n0);
    if (size > MEM) memcpy(base[1], data + MEM, size - MEM < MEM ? size - MEM : MEM);
    uint8_t *used = base[0] + 8192;
    memset(used, 0, 4096);

    struct virtq q;
    if (virtq_init(&q, NUM, base[0], base[0] + 4096, used, mt, size & 1, 0) < 0) abort();
    struct vhu_inflight_queue *inf = calloc(1, vhu_inflight_queue_size(NUM));
    uint16_t heads[NUM];
    virtq_inflight_attach(&q, inf, 0, heads, NUM);
    /* dirty logging on for half the inputs: a bitmap of 64 pages, the
     * regions being pages 16 to 47 */
    static uint8_t bits[8];
    struct vhu_log log = { .bits = bits, .size = sizeof(bits) };
    memset(bits, 0, sizeof(bits));
    if (size & 2) {
        q.log = &log;
        q.log_used = true;
        q.log_used_gpa = GPA0 + 8192;
    }
    struct iovec iov[64];
    struct virtq_chain c = { .iov = iov, .cap = 64 };
    uint16_t head;
    int rounds = 0, r;
    while ((r = virtq_pop(&q, &head)) > 0 && rounds++ < 4 * NUM) {
        int m = virtq_map_chain(&q, head, &c);
        if (c.niov > c.cap || c.nout > c.niov) abort();
        for (unsigned i = 0; i < c.niov; i++)
            if (!inside(&iov[i])) abort();
        if (m == 0 && c.niov) {
            /* touch every mapped byte the way a request would */
            for (unsigned i = 0; i < c.niov; i++) {
                volatile uint8_t *p = iov[i].iov_base;
                p[0] = p[0];
                p[iov[i].iov_len - 1] = p[iov[i].iov_len - 1];
            }
        }
        if (c.status) *c.status = 1;
        if (q.log) {
            vhu_log_iov(q.log, mt, iov + c.nout, c.niov - c.nout);
            if (c.status) vhu_log_host(q.log, mt, c.status, 1);
        }
        virtq_push(&q, head, 0);
        virtq_should_notify(&q);
    }
    virtq_arm(&q);
    /* only guest pages can be marked, and nothing is dropped */
    if (bits[0] || bits[1] || bits[6] || bits[7] || log.dropped) abort();
    free(inf);
    return 0;
}

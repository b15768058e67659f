/* A hostile vhost-user-blk front-end: sets its rings up by hand and sends
 * malformed descriptor chains and messages. Every malformed request must
 * end with VIRTIO_BLK_S_IOERR (or UNSUPP) where a status byte can be
 * found, nothing outside the buffers the request named may change, a
 * broken ring stops only that queue, and the back-end keeps serving.
 *   vhost_hostile SOCKET     prints TAP lines; exit 0 when all passed */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include "vmm-glue/vhost_log.h"
#include "vmm-glue/vhost_proto.h"
#include "vmm-glue/virtio_blk.h"
#include "vmm-glue/virtq.h"

#define GPA   0x10000ull
#define MEMSZ (1u << 20)
#define NUM   8
#define NQ    2

static int sock, memfd, kick[NQ], call[NQ], tests, failed;
static uint64_t f;                /* the features set */
static uint8_t *mem;
static struct virtq_desc *desc[NQ];
static struct virtq_avail *avail[NQ];
static struct virtq_used *used[NQ];
static uint16_t avail_idx[NQ], last_used[NQ];

static void result(bool ok, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("%s %d - ", ok ? "ok" : "not ok", ++tests);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
    if (!ok) failed++;
}

static void *at(uint64_t off) { return mem + off; }

/* send a message; with ack, wait for the REPLY_ACK value */
static int msg(uint32_t req, const void *payload, uint32_t size, int *fds, int nfds, bool reply, struct vhu_msg *out)
{
    struct vhu_msg m;
    memset(&m.hdr, 0, sizeof(m.hdr));
    m.hdr.request = req;
    m.hdr.flags = VHU_VERSION | (reply ? 0 : VHU_FLAG_NEED_REPLY);
    m.hdr.size = size;
    if (size) memcpy(m.raw, payload, size);
    m.nfds = nfds;
    for (int i = 0; i < nfds; i++) m.fds[i] = fds[i];
    int rc = vhu_msg_send(sock, &m);
    if (rc < 0) return rc;
    rc = vhu_msg_recv(sock, &m);
    if (rc < 0) return rc;
    vhu_msg_close_fds(&m);
    if (out) *out = m;
    return reply ? 0 : (int)m.u64;
}

static int u64msg(uint32_t req, uint64_t v) { return msg(req, &v, 8, NULL, 0, false, NULL); }
static int state(uint32_t req, unsigned idx, unsigned num)
{
    struct vhu_vring_state s = { idx, num };
    return msg(req, &s, sizeof(s), NULL, 0, false, NULL);
}

static int connect_to(const char *path)
{
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) { close(fd); return -1; }
    return fd;
}

static int setup(const char *path)
{
    struct vhu_msg r;
    sock = connect_to(path);
    if (sock < 0) return -1;
    if (msg(VHU_GET_FEATURES, NULL, 0, NULL, 0, true, &r) < 0) return -1;
    uint64_t pf = VHU_BIT(VHU_PF_REPLY_ACK) | VHU_BIT(VHU_PF_MQ) | VHU_BIT(VHU_PF_CONFIG) |
                  VHU_BIT(VHU_PF_LOG_SHMFD);
    struct vhu_msg m = { .hdr = { VHU_SET_PROTOCOL_FEATURES, VHU_VERSION, 8 } };
    m.u64 = pf;
    if (vhu_msg_send(sock, &m) < 0) return -1;      /* no ack before it is negotiated */
    if (u64msg(VHU_SET_OWNER, 0) && 0) return -1;
    f = VHU_BIT(VIRTIO_F_VERSION_1) | VHU_BIT(VHOST_USER_F_PROTOCOL_FEATURES) |
                 VHU_BIT(VIRTIO_RING_F_INDIRECT_DESC) | VHU_BIT(VIRTIO_BLK_F_DISCARD) |
                 VHU_BIT(VIRTIO_BLK_F_FLUSH);
    if (u64msg(VHU_SET_FEATURES, f)) return -1;
    struct vhu_mem_table t = { 1, 0, { { GPA, MEMSZ, (uintptr_t)mem, 0 } } };
    if (msg(VHU_SET_MEM_TABLE, &t, 8 + sizeof(struct vhu_region), &memfd, 1, false, NULL)) return -1;
    for (int q = 0; q < NQ; q++) {
        memset(at(q * 0x4000), 0, 0x4000);
        desc[q] = at(q * 0x4000);
        avail[q] = at(q * 0x4000 + 0x1000);
        used[q] = at(q * 0x4000 + 0x2000);
        avail_idx[q] = last_used[q] = 0;
        struct vhu_vring_addr a = { q, 0, (uintptr_t)desc[q], (uintptr_t)used[q], (uintptr_t)avail[q], 0 };
        uint64_t v = q;
        if (state(VHU_SET_VRING_NUM, q, NUM) || state(VHU_SET_VRING_BASE, q, 0) ||
            msg(VHU_SET_VRING_ADDR, &a, sizeof(a), NULL, 0, false, NULL) ||
            msg(VHU_SET_VRING_CALL, &v, 8, &call[q], 1, false, NULL) ||
            msg(VHU_SET_VRING_KICK, &v, 8, &kick[q], 1, false, NULL) ||
            state(VHU_SET_VRING_ENABLE, q, 1))
            return -1;
    }
    return 0;
}

/* Offer head on queue q and wait for it to come back: 1 done, 0 not. */
static int run(int q, uint16_t head, uint32_t *len)
{
    avail[q]->ring[avail_idx[q] % NUM] = head;
    avail_idx[q]++;
    __atomic_store_n(&avail[q]->idx, avail_idx[q], __ATOMIC_RELEASE);
    eventfd_write(kick[q], 1);
    for (int i = 0; i < 100; i++) {
        if (__atomic_load_n(&used[q]->idx, __ATOMIC_ACQUIRE) != last_used[q]) {
            struct virtq_used_elem e = used[q]->ring[last_used[q] % NUM];
            last_used[q]++;
            if (len) *len = e.len;
            return e.id == head;
        }
        struct pollfd p = { call[q], POLLIN, 0 };
        poll(&p, 1, 20);
        eventfd_t v;
        if (p.revents) eventfd_read(call[q], &v);
    }
    return 0;
}

#define HDR    0x10000   /* offsets in mem */
#define DATA   0x20000
#define STATUS 0x30000
#define GUARD  0x31000   /* must never change */
#define ITAB   0x40000

static void hdr(uint32_t type, uint64_t sector)
{
    struct virtio_blk_outhdr h = { type, 0, sector };
    memcpy(at(HDR), &h, sizeof(h));
}
static void d(int q, int i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
    desc[q][i] = (struct virtq_desc){ addr, len, flags, next };
}
static uint8_t status(void) { return *(volatile uint8_t *)at(STATUS); }

/* A well-formed read of 4 KiB at sector s: status (or 0xee if none). */
static int good_read(int q, uint64_t s)
{
    hdr(VIRTIO_BLK_T_IN, s);
    *(uint8_t *)at(STATUS) = 0xee;
    d(q, 0, GPA + HDR, 16, VIRTQ_DESC_F_NEXT, 1);
    d(q, 1, GPA + DATA, 4096, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
    d(q, 2, GPA + STATUS, 1, VIRTQ_DESC_F_WRITE, 0);
    return run(q, 0, NULL) ? status() : -1;
}

static void expect_status(const char *what, int q, uint8_t want)
{
    uint32_t len = 0;
    *(uint8_t *)at(STATUS) = 0xee;
    int done = run(q, 0, &len);
    result(done && status() == want, "%s: status %d (want %d)", what, done ? status() : -1, want);
}

int main(int argc, char **argv)
{
    if (argc != 2) { fprintf(stderr, "usage: vhost_hostile SOCKET\n"); return 2; }
    memfd = memfd_create("hostile", 0);
    if (ftruncate(memfd, MEMSZ) < 0) return 1;
    mem = mmap(NULL, MEMSZ, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    for (int q = 0; q < NQ; q++) {
        kick[q] = eventfd(0, EFD_NONBLOCK);
        call[q] = eventfd(0, EFD_NONBLOCK);
    }
    if (setup(argv[1]) < 0) { printf("not ok 1 - set-up\n"); return 1; }
    memset(at(GUARD), 0x5a, 4096);

    result(good_read(0, 0) == VIRTIO_BLK_S_OK, "a well-formed read works");

    /* loops: status -> itself */
    hdr(VIRTIO_BLK_T_IN, 0);
    d(0, 0, GPA + HDR, 16, VIRTQ_DESC_F_NEXT, 1);
    d(0, 1, GPA + STATUS, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1);
    expect_status("a chain that loops", 0, VIRTIO_BLK_S_IOERR);
    /* next index outside the table */
    d(0, 1, GPA + DATA, 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
    d(0, 2, GPA + STATUS, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 200);
    expect_status("a next index outside the table", 0, VIRTIO_BLK_S_IOERR);
    /* data outside guest memory (below, above, wrapping) */
    uint64_t bad[] = { 0x1000, GPA + MEMSZ - 100, 0xffffffffffffff00ull };
    for (int i = 0; i < 3; i++) {
        d(0, 0, GPA + HDR, 16, VIRTQ_DESC_F_NEXT, 1);
        d(0, 1, bad[i], 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
        d(0, 2, GPA + STATUS, 1, VIRTQ_DESC_F_WRITE, 0);
        expect_status(i == 0 ? "read buffer below guest memory" : i == 1 ? "read buffer past the end of guest memory"
                      : "read buffer wrapping the address space", 0, VIRTIO_BLK_S_IOERR);
    }
    /* header outside guest memory */
    d(0, 0, 0x100, 16, VIRTQ_DESC_F_NEXT, 1);
    d(0, 1, GPA + STATUS, 1, VIRTQ_DESC_F_WRITE, 0);
    expect_status("header outside guest memory", 0, VIRTIO_BLK_S_IOERR);
    /* short header */
    d(0, 0, GPA + HDR, 8, VIRTQ_DESC_F_NEXT, 1);
    expect_status("an 8-byte header", 0, VIRTIO_BLK_S_IOERR);
    /* wrong directions: read into a device-readable buffer, write from a writable one */
    hdr(VIRTIO_BLK_T_IN, 0);
    d(0, 0, GPA + HDR, 16, VIRTQ_DESC_F_NEXT, 1);
    d(0, 1, GPA + DATA, 512, VIRTQ_DESC_F_NEXT, 2);
    d(0, 2, GPA + STATUS, 1, VIRTQ_DESC_F_WRITE, 0);
    expect_status("a read whose buffer is device-readable", 0, VIRTIO_BLK_S_IOERR);
    hdr(VIRTIO_BLK_T_OUT, 0);
    d(0, 1, GPA + DATA, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
    expect_status("a write whose buffer is device-writable", 0, VIRTIO_BLK_S_IOERR);
    /* readable after writable */
    hdr(VIRTIO_BLK_T_OUT, 0);
    d(0, 0, GPA + HDR, 16, VIRTQ_DESC_F_NEXT, 1);
    d(0, 1, GPA + STATUS, 1, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
    d(0, 2, GPA + DATA, 512, 0, 0);
    expect_status("a device-readable descriptor after a writable one", 0, VIRTIO_BLK_S_IOERR);
    /* a read-only status: nothing may be written there */
    hdr(VIRTIO_BLK_T_IN, 0);
    d(0, 0, GPA + HDR, 16, VIRTQ_DESC_F_NEXT, 1);
    d(0, 1, GPA + STATUS, 1, 0, 0);
    *(uint8_t *)at(STATUS) = 0xee;
    uint32_t len = 99;
    int done = run(0, 0, &len);
    result(done && status() == 0xee && len == 0, "no writable status: returned unwritten (len %u)", len);
    /* ranges */
    d(0, 0, GPA + HDR, 16, VIRTQ_DESC_F_NEXT, 1);
    d(0, 1, GPA + DATA, 4096, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
    d(0, 2, GPA + STATUS, 1, VIRTQ_DESC_F_WRITE, 0);
    hdr(VIRTIO_BLK_T_IN, 1ull << 62);
    expect_status("sector far past the end", 0, VIRTIO_BLK_S_IOERR);
    hdr(VIRTIO_BLK_T_IN, 0xffffffffffffffffull);
    expect_status("sector that overflows in bytes", 0, VIRTIO_BLK_S_IOERR);
    d(0, 1, GPA + DATA, 100, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
    hdr(VIRTIO_BLK_T_IN, 0);
    expect_status("a length that is not whole sectors", 0, VIRTIO_BLK_S_IOERR);
    hdr(77, 0);
    expect_status("an unknown request type", 0, VIRTIO_BLK_S_UNSUPP);
    /* discard: unknown flags, two segments */
    struct virtio_blk_dwz_seg seg[2] = { { 0, 8, 1 }, { 8, 8, 0 } };
    memcpy(at(DATA), seg, sizeof(seg));
    hdr(VIRTIO_BLK_T_DISCARD, 0);
    d(0, 1, GPA + DATA, 16, VIRTQ_DESC_F_NEXT, 2);
    expect_status("discard with the unmap flag", 0, VIRTIO_BLK_S_UNSUPP);
    d(0, 1, GPA + DATA, 32, VIRTQ_DESC_F_NEXT, 2);
    expect_status("discard with two segments (one offered)", 0, VIRTIO_BLK_S_IOERR);
    /* indirect: nested, bad length, too many segments */
    struct virtq_desc *it = at(ITAB);
    it[0] = (struct virtq_desc){ GPA + HDR, 16, VIRTQ_DESC_F_NEXT, 1 };
    it[1] = (struct virtq_desc){ GPA + ITAB, 32, VIRTQ_DESC_F_INDIRECT, 0 };
    d(0, 0, GPA + STATUS, 0, 0, 0);
    d(0, 0, GPA + ITAB, 32, VIRTQ_DESC_F_INDIRECT, 0);
    *(uint8_t *)at(STATUS) = 0xee;
    done = run(0, 0, &len);
    result(done && status() == 0xee, "nested indirect table: returned, nothing written");
    d(0, 0, GPA + ITAB, 24, VIRTQ_DESC_F_INDIRECT, 0);
    done = run(0, 0, &len);
    result(done, "indirect table of 24 bytes: returned");
    hdr(VIRTIO_BLK_T_IN, 0);
    for (int i = 0; i < 400; i++)
        it[i] = (struct virtq_desc){ i ? GPA + DATA + (i % 64) * 512 : GPA + HDR, i ? 512 : 16,
                                     (uint16_t)((i ? VIRTQ_DESC_F_WRITE : 0) | VIRTQ_DESC_F_NEXT), (uint16_t)(i + 1) };
    it[400] = (struct virtq_desc){ GPA + STATUS, 1, VIRTQ_DESC_F_WRITE, 0 };
    d(0, 0, GPA + ITAB, 401 * 16, VIRTQ_DESC_F_INDIRECT, 0);
    *(uint8_t *)at(STATUS) = 0xee;
    done = run(0, 0, &len);
    result(done && status() == VIRTIO_BLK_S_IOERR, "a 401-descriptor chain: status %d (want 1)", status());
    /* guard page untouched, and the queue still works */
    bool clean = true;
    for (int i = 0; i < 4096; i++) if (((uint8_t *)at(GUARD))[i] != 0x5a) clean = false;
    result(clean, "memory outside the named buffers untouched");
    result(good_read(0, 0) == VIRTIO_BLK_S_OK, "queue 0 still serves well-formed requests");

    /* a head outside the table breaks queue 1 only */
    avail[1]->ring[avail_idx[1] % NUM] = NUM + 3;
    avail_idx[1]++;
    __atomic_store_n(&avail[1]->idx, avail_idx[1], __ATOMIC_RELEASE);
    eventfd_write(kick[1], 1);
    usleep(100000);
    result(used[1]->idx == 0, "queue 1 with a bad head: nothing returned");
    result(good_read(0, 8) == VIRTIO_BLK_S_OK, "queue 0 unaffected by queue 1's bad head");

    /* malformed messages: refused with an error, the connection survives */
    struct vhu_mem_table t = { 1, 0, { { GPA, MEMSZ * 4, (uintptr_t)mem, 0 } } };
    result(msg(VHU_SET_MEM_TABLE, &t, 8 + sizeof(struct vhu_region), &memfd, 1, false, NULL) > 0,
           "SET_MEM_TABLE with a region past the end of its fd: refused");
    struct vhu_mem_table t2 = { 9, 0, { { 0 } } };
    result(msg(VHU_SET_MEM_TABLE, &t2, 8, NULL, 0, false, NULL) > 0, "SET_MEM_TABLE with 9 regions and no fds: refused");
    result(state(VHU_SET_VRING_NUM, 40, 8) > 0, "SET_VRING_NUM for queue 40: refused");
    result(state(VHU_SET_VRING_NUM, 0, 70000) > 0, "SET_VRING_NUM of 70000: refused");
    struct vhu_msg cfg;
    struct vhu_config c = { 1000, 8, 0, { 0 } };
    msg(VHU_GET_CONFIG, &c, 12 + 8, NULL, 0, true, &cfg);
    result(cfg.hdr.size == 0, "GET_CONFIG past the config space: empty reply");
    result(good_read(0, 16) == VIRTIO_BLK_S_OK, "queue 0 still works after refused messages");

    /* dirty logging with bad parameters: refused, or nothing written
     * outside the log */
    int lfd = memfd_create("log", 0);
    if (ftruncate(lfd, 8192) < 0) return 1;
    uint8_t *lm = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, lfd, 0);
    memset(lm, 0x5a, 8192);
    struct vhu_log_desc ld = { 1 << 20, 0 };
    result(msg(VHU_SET_LOG_BASE, &ld, sizeof(ld), &lfd, 1, false, NULL) > 0, "SET_LOG_BASE past the end of its fd: refused");
    ld = (struct vhu_log_desc){ 16, UINT64_MAX - 8 };
    result(msg(VHU_SET_LOG_BASE, &ld, sizeof(ld), &lfd, 1, false, NULL) > 0, "SET_LOG_BASE at an offset that wraps: refused");
    ld = (struct vhu_log_desc){ 1, 100 };
    result(msg(VHU_SET_LOG_BASE, &ld, sizeof(ld), NULL, 0, false, NULL) > 0, "SET_LOG_BASE without an fd: refused");
    result(msg(VHU_SET_LOG_BASE, &ld, 4, &lfd, 1, false, NULL) > 0, "SET_LOG_BASE with a short payload: refused");
    /* a log of one byte (pages below 0x8000): every guest page is past it */
    result(msg(VHU_SET_LOG_BASE, &ld, sizeof(ld), &lfd, 1, false, NULL) == 0, "SET_LOG_BASE of 1 byte at offset 100");
    result(u64msg(VHU_SET_FEATURES, f | VHU_BIT(VHOST_F_LOG_ALL)) == 0, "SET_FEATURES with VHOST_F_LOG_ALL while running");
    struct vhu_vring_addr la = { 0, VHU_VRING_F_LOG, (uintptr_t)desc[0], (uintptr_t)used[0], (uintptr_t)avail[0],
                                 UINT64_MAX - 100 };
    result(msg(VHU_SET_VRING_ADDR, &la, sizeof(la), NULL, 0, false, NULL) == 0,
           "SET_VRING_ADDR turning on used-ring logging at a wrapping address");
    la.used += 0x100;
    result(msg(VHU_SET_VRING_ADDR, &la, sizeof(la), NULL, 0, false, NULL) > 0,
           "SET_VRING_ADDR moving a running ring: refused");
    result(good_read(0, 24) == VIRTIO_BLK_S_OK, "a read with logging past the log's end");
    bool lclean = true;
    for (int i = 0; i < 8192; i++) lclean &= lm[i] == 0x5a;
    result(lclean, "nothing written to the log file outside its byte");
    result(u64msg(VHU_SET_FEATURES, f) == 0 && good_read(0, 32) == VIRTIO_BLK_S_OK, "logging off again");
    munmap(lm, 8192);
    close(lfd);

    /* garbage on the socket drops this front-end; a new one is served */
    uint8_t junk[64];
    memset(junk, 0xab, sizeof(junk));
    if (write(sock, junk, sizeof(junk)) < 0) {}
    struct pollfd p = { sock, POLLIN, 0 };
    poll(&p, 1, 2000);
    char ch;
    result(p.revents && recv(sock, &ch, 1, MSG_DONTWAIT) <= 0, "garbage message: connection dropped");
    close(sock);
    if (setup(argv[1]) < 0) { result(false, "reconnect after being dropped"); return 1; }
    result(good_read(0, 0) == VIRTIO_BLK_S_OK && good_read(1, 0) == VIRTIO_BLK_S_OK,
           "a new connection is served on both queues");
    close(sock);
    printf("1..%d\n", tests);
    return failed ? 1 : 0;
}

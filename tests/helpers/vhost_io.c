/* Drive a vhost-user-blk back-end through the front-end library, without
 * a VM: pattern write/verify, random or sequential I/O at a queue depth
 * over N queues, and a functional check of every request type.
 *   vhost_io [options] SOCKET
 *   --mode fill|verify|check|randread|randwrite|seqread|seqwrite|resize-wait|dirty-log   (default check)
 *          resize-wait: print the capacity, wait (--runtime) for a config change
 *          from the back-end, print the new capacity, read its last 4 KiB
 *          dirty-log: with dirty logging on, fill then verify --size, checking
 *          after each that exactly the pages the back-end wrote are marked
 *          (read buffers, status bytes, used rings); then with it off, that
 *          a verify marks nothing
 *   --queues N  --qd N (per queue)  --bs SIZE  --size SIZE (of the device used)
 *   --runtime SEC (random/seq modes)  --seed N (pattern)  --json
 *   --no-indirect --no-event-idx --no-inflight --split-memory
 *   --reconnect MS   survive back-end restarts (reconnect within MS)
 *   --expect FILE    write the image content `check` leaves (for qemu-img compare)
 *   --rate N         at most N requests a second (keeps a job running for a while)
 *   --threads        random/sequential modes: one thread per queue (default: one
 *                    thread drives every queue)
 * Exit status 0 when every request succeeded and every byte read was right. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/socket.h>
#include "vdisk/error.h"
#include "vdisk/opts.h"
#include "vmm-glue/vhost_front.h"

#define ADD(v, n) __atomic_add_fetch(&(v), (n), __ATOMIC_RELAXED)

enum mode { M_FILL, M_VERIFY, M_CHECK, M_RANDREAD, M_RANDWRITE, M_SEQREAD, M_SEQWRITE, M_RESIZE,
            M_DIRTY };

static struct {
    enum mode mode;
    unsigned queues, qd;
    uint64_t bs, size, seed;
    double runtime, rate;
    bool json, threads;
    int reconnect_ms;
    const char *expect;
    struct vd_vhu_opts fo;
} cfg = { M_CHECK, 1, 16, 65536, 0, 1, 5.0, 0, false, false, 0, NULL, { 0 } };

static struct vd_vhu *f;
static uint8_t *bufs;
static uint64_t errors, mismatches, reconnects;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* The pattern: every 8-byte word depends on the seed and its disk offset. */
static void pattern(uint64_t off, uint64_t len, uint8_t *p)
{
    for (uint64_t i = 0; i < len; i += 8) {
        uint64_t w = mix(cfg.seed * 0x100000001b3ull ^ ((off + i) >> 3));
        memcpy(p + i, &w, 8);
    }
}

static bool check_pattern(uint64_t off, uint64_t len, const uint8_t *p)
{
    uint8_t want[8];
    for (uint64_t i = 0; i < len; i += 8) {
        pattern(off + i, 8, want);
        if (memcmp(want, p + i, 8)) {
            if (ADD(mismatches, 1) <= 5)
                fprintf(stderr, "vhost_io: mismatch at offset %" PRIu64 "\n", off + i);
            return false;
        }
    }
    return true;
}

/* ---- the job engine: slots per queue, each with a buffer ---- */

struct slot { enum vd_vhu_op op; uint64_t off; uint32_t len; uint8_t *buf; bool verify, busy, zero, filled; };
static struct slot *slots;            /* queues * qd */
static uint64_t cursor, end, issued, done_ops, done_bytes;
static double deadline;
static __thread uint64_t rng = 88172645463325252ull;
static uint64_t lat_sum_ns;

static uint64_t xorshift(void)
{
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return rng;
}

/* Next request of the job, false when the job has issued everything. */
static bool next_req(struct slot *s)
{
    bool timed = cfg.mode >= M_RANDREAD && cfg.mode <= M_SEQWRITE;
    if (timed && now() >= deadline) return false;
    s->len = cfg.bs;
    switch (cfg.mode) {
    case M_RANDREAD: case M_RANDWRITE:
        s->off = (xorshift() % (cfg.size / cfg.bs)) * cfg.bs;
        s->op = cfg.mode == M_RANDREAD ? VD_VHU_READ : VD_VHU_WRITE;
        break;
    default:
        if (timed) {            /* shared by the threads: wrap around */
            s->off = __atomic_fetch_add(&cursor, cfg.bs, __ATOMIC_RELAXED) % (end / cfg.bs) * cfg.bs;
        } else {
            if (cursor >= end) return false;
            s->off = cursor;
            if (s->len > end - cursor) s->len = end - cursor;
            cursor += s->len;
        }
        s->op = cfg.mode == M_FILL || cfg.mode == M_SEQWRITE ? VD_VHU_WRITE : VD_VHU_READ;
        break;
    }
    s->verify = cfg.mode == M_VERIFY;
    /* Timed writes are never read back: fill each buffer once, as fio does
     * (no refill_buffers), so that generating data is not on the path
     * between a completion and the next submission. */
    if (s->op == VD_VHU_WRITE && !(timed && s->filled)) {
        pattern(s->off, s->len, s->buf);
        s->filled = timed;
    }
    return true;
}

static int submit_slot(unsigned q, struct slot *s)
{
    struct vd_vhu_io io = { s->op, s->off, s->len, s->buf, false, s };
    int rc = vd_vhu_submit(f, q, &io);
    if (rc == 0) { s->busy = true; ADD(issued, 1); }
    return rc;
}

static void finish(struct slot *s, int status)
{
    s->busy = false;
    if (status != 0) {
        if (ADD(errors, 1) <= 5)
            fprintf(stderr, "vhost_io: op %d at %" PRIu64 " len %u: status %d\n",
                    s->op, s->off, s->len, status);
        return;
    }
    ADD(done_ops, 1);
    ADD(done_bytes, s->len);
    if (s->verify) check_pattern(s->off, s->len, s->buf);
}

static int handle_loss(void)
{
    if (!cfg.reconnect_ms) {
        fprintf(stderr, "vhost_io: the back-end went away\n");
        return -EPIPE;
    }
    int rc = vd_vhu_reconnect(f, cfg.reconnect_ms);
    if (rc < 0) { fprintf(stderr, "vhost_io: %s\n", vd_errmsg(rc)); return rc; }
    reconnects++;
    return 0;
}

/* Run the current job to the end over queues [q0, q0 + nq). */
static int run_queues(unsigned q0, unsigned nq)
{
    struct vd_vhu_done d[64];
    bool more = true;
    unsigned qend = q0 + nq;
    double t_start = now();
    for (unsigned q = q0; q < qend && more; q++) {
        for (unsigned i = 0; i < cfg.qd && more; i++) {
            struct slot *s = &slots[q * cfg.qd + i];
            if ((more = next_req(s))) submit_slot(q, s);
        }
        vd_vhu_kick(f, q);
    }
    for (;;) {
        int got = 0;
        unsigned pending = 0;
        if (cfg.rate > 0) {      /* ahead of the rate: let the requests sit a while */
            double ahead = issued / cfg.rate - (now() - t_start);
            if (ahead > 0) usleep(ahead * 1e6 < 20000 ? ahead * 1e6 : 20000);
        }
        for (unsigned q = q0; q < qend; q++) {
            int n = vd_vhu_reap(f, q, d, 64);
            got += n;
            for (int i = 0; i < n; i++) {
                struct slot *s = d[i].cookie;
                finish(s, d[i].status);
                if (more && (more = next_req(s))) submit_slot(q, s);
            }
            if (n) vd_vhu_kick(f, q);
            pending += vd_vhu_pending(f, q);
        }
        if (!pending && !more) return 0;
        if (got) continue;
        /* sleep until a queue has completions or the back-end goes away */
        struct pollfd p[65];
        bool ready = false;
        for (unsigned q = q0; q < qend; q++) {
            if (vd_vhu_arm(f, q)) ready = true;
            p[q - q0] = (struct pollfd){ vd_vhu_call_fd(f, q), POLLIN, 0 };
        }
        if (ready) continue;
        p[nq] = (struct pollfd){ vd_vhu_sock_fd(f), POLLIN, 0 };
        int rc = poll(p, nq + 1, 10000);
        if (rc == 0) { fprintf(stderr, "vhost_io: no completion for 10 s\n"); return -ETIMEDOUT; }
        for (unsigned q = 0; q < nq; q++)
            if (p[q].revents) { uint64_t v; if (read(p[q].fd, &v, 8) < 0) {} }
        if (p[nq].revents) {
            char c;
            if (recv(p[nq].fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) <= 0) {
                if (nq != cfg.queues) { fprintf(stderr, "vhost_io: the back-end went away\n"); return -EPIPE; }
                if ((rc = handle_loss()) < 0) return rc;
            }
        }
    }
}

struct thr { pthread_t t; unsigned q; int rc; };

static void *thr_main(void *arg)
{
    struct thr *t = arg;
    rng ^= 0x9e3779b97f4a7c15ull * (t->q + 1);
    t->rc = run_queues(t->q, 1);
    return NULL;
}

static int run_job(void)
{
    if (!cfg.threads || cfg.mode < M_RANDREAD || cfg.queues == 1) return run_queues(0, cfg.queues);
    struct thr t[64];
    int rc = 0;
    for (unsigned q = 0; q < cfg.queues; q++) {
        t[q].q = q;
        if (pthread_create(&t[q].t, NULL, thr_main, &t[q]) != 0) return -EAGAIN;
    }
    for (unsigned q = 0; q < cfg.queues; q++) {
        pthread_join(t[q].t, NULL);
        if (t[q].rc < 0) rc = t[q].rc;
    }
    return rc;
}

/* One request, synchronously, on queue q. */
static int one(unsigned q, enum vd_vhu_op op, uint64_t off, uint32_t len, uint8_t *buf, bool unmap,
               uint32_t *used)
{
    struct vd_vhu_io io = { op, off, len, buf, unmap, NULL };
    struct vd_vhu_done d;
    int rc = vd_vhu_submit(f, q, &io);
    if (rc < 0) return rc;
    vd_vhu_kick(f, q);
    for (;;) {
        if (vd_vhu_reap(f, q, &d, 1) == 1) break;
        rc = vd_vhu_wait(f, q, 10000);
        if (rc == 0) return -ETIMEDOUT;
        if (rc < 0 && (rc = handle_loss()) < 0) return rc;
    }
    if (used) *used = d.used_len;
    return d.status;
}

static int expect_failed(const char *what, int got, int want)
{
    fprintf(stderr, "vhost_io: %s: status %d, expected %d\n", what, got, want);
    errors++;
    return -1;
}

#define WZ_OFF(sz)  ((sz) / 4)
#define DIS_OFF(sz) ((sz) / 2)
#define DWZ_LEN     (1u << 20)

static int do_check(void)
{
    uint8_t *b = bufs;
    uint32_t used;
    int st;
    /* fill and verify the whole range, using every queue */
    cfg.mode = M_FILL; cursor = 0; end = cfg.size;
    if (run_job() < 0) return -1;
    for (unsigned q = 0; q < cfg.queues; q++)
        if ((st = one(q, VD_VHU_FLUSH, 0, 0, NULL, false, NULL)) != 0) return expect_failed("flush", st, 0);
    cfg.mode = M_VERIFY; cursor = 0; end = cfg.size;
    if (run_job() < 0) return -1;
    /* write zeroes (may unmap) and discard, then read back */
    uint64_t wz = WZ_OFF(cfg.size) & ~4095ull, dis = DIS_OFF(cfg.size) & ~4095ull;
    if ((st = one(0, VD_VHU_WRITE_ZEROES, wz, DWZ_LEN, NULL, true, NULL)) != 0)
        return expect_failed("write-zeroes", st, 0);
    if ((st = one(cfg.queues - 1, VD_VHU_DISCARD, dis, DWZ_LEN, NULL, false, NULL)) != 0)
        return expect_failed("discard", st, 0);
    memset(b, 0xaa, DWZ_LEN);
    if ((st = one(0, VD_VHU_READ, wz, DWZ_LEN, b, false, &used)) != 0) return expect_failed("read zeroes", st, 0);
    for (uint32_t i = 0; i < DWZ_LEN; i++)
        if (b[i]) { fprintf(stderr, "vhost_io: write-zeroes range not zero at %u\n", i); mismatches++; break; }
    if (used != DWZ_LEN + 1) { fprintf(stderr, "vhost_io: read used length %u\n", used); errors++; }
    /* the data around the zeroed range is intact */
    if ((st = one(0, VD_VHU_READ, wz - 4096, 4096, b, false, NULL)) != 0 || !check_pattern(wz - 4096, 4096, b))
        return expect_failed("read before zeroes", st, 0);
    /* serial */
    memset(b, 0, 21);
    if ((st = one(0, VD_VHU_GET_ID, 0, 20, b, false, NULL)) != 0) return expect_failed("get-id", st, 0);
    printf("serial: %s\n", (char *)b);
    /* out of range: IOERR, and the device still works afterwards */
    uint64_t cap = vd_vhu_capacity(f);
    if ((st = one(0, VD_VHU_READ, cap, 4096, b, false, NULL)) != 1) return expect_failed("read past the end", st, 1);
    if ((st = one(0, VD_VHU_WRITE, cap - 512, 4096, b, false, NULL)) != 1) return expect_failed("write across the end", st, 1);
    if ((st = one(0, VD_VHU_READ, 0, 4096, b, false, NULL)) != 0 || !check_pattern(0, 4096, b))
        return expect_failed("read after errors", st, 0);
    /* an unaligned length */
    if ((st = one(0, VD_VHU_READ, 0, 100, b, false, NULL)) != 1) return expect_failed("unaligned read", st, 1);
    return errors || mismatches ? -1 : 0;
}

static int do_resize_wait(void)
{
    int bfd = vd_vhu_backend_fd(f);
    printf("capacity %" PRIu64 "\n", vd_vhu_capacity(f));
    fflush(stdout);
    if (bfd < 0) { fprintf(stderr, "vhost_io: no back-end channel\n"); return -1; }
    for (;;) {
        int left = (int)((deadline - now()) * 1000);
        if (left <= 0) { fprintf(stderr, "vhost_io: no config change\n"); return -1; }
        struct pollfd p = { bfd, POLLIN, 0 };
        if (poll(&p, 1, left) <= 0) continue;
        int rc = vd_vhu_backend_msg(f);
        if (rc < 0) { fprintf(stderr, "vhost_io: back-end channel: %s\n", strerror(-rc)); return -1; }
        if (rc == 1) break;
    }
    uint64_t cap = vd_vhu_capacity(f);
    printf("capacity %" PRIu64 "\n", cap);
    int st = one(0, VD_VHU_READ, cap - 4096, 4096, bufs, false, NULL);
    if (st != 0) return expect_failed("read at the new end", st, 0);
    return 0;
}

/* ---- dirty log ---- */

static bool in_range(uint64_t page, uint64_t gpa, uint64_t len)
{
    return len && page >= gpa / 4096 && page <= (gpa + len - 1) / 4096;
}

/* Check the log after a job: the pages of every slot buffer are set when
 * reads filled them (data_set) and clear otherwise; each used ring's first
 * page is set; status areas may be set; nothing else is. Clears the log. */
static int check_log(const char *what, bool data_set, bool any)
{
    size_t size;
    uint8_t *bits = vd_vhu_log_bits(f, &size);
    uint64_t nslots = (uint64_t)cfg.queues * cfg.qd, bad = 0, set = 0;
    struct vd_vhu_qlayout ql[64];
    for (unsigned q = 0; q < cfg.queues; q++) vd_vhu_queue_layout(f, q, &ql[q]);
    uint64_t b0 = vd_vhu_gpa(f, slots[0].buf), blen = nslots * cfg.bs;
    for (uint64_t page = 0; page < size * 8; page++) {
        bool on = bits[page / 8] & (1u << (page % 8)), want = false, may = false;
        if (in_range(page, b0, blen)) want = data_set;
        for (unsigned q = 0; q < cfg.queues; q++) {
            if (page == ql[q].used / 4096) want = any;
            else if (in_range(page, ql[q].used, ql[q].used_len) || in_range(page, ql[q].slots, ql[q].slots_len))
                may = any;
        }
        set += on;
        if (on != want && !(on && may)) {
            if (++bad <= 5)
                fprintf(stderr, "vhost_io: dirty log after %s: page at 0x%" PRIx64 " is %s\n", what,
                        page * 4096, on ? "marked" : "not marked");
        }
    }
    memset(bits, 0, size);
    printf("dirty-log %s: %" PRIu64 " pages marked, %" PRIu64 " wrong\n", what, set, bad);
    if (bad) mismatches++;
    return bad ? -1 : 0;
}

static int do_dirty_log(void)
{
    int rc = vd_vhu_log_enable(f, true);
    if (rc < 0) { fprintf(stderr, "vhost_io: %s\n", vd_errmsg(rc)); return rc; }
    cfg.mode = M_FILL; cursor = 0; end = cfg.size;
    if ((rc = run_job()) < 0) return rc;
    rc = check_log("writes", false, true);
    cfg.mode = M_VERIFY; cursor = 0; end = cfg.size;
    if (run_job() < 0 || check_log("reads", true, true) < 0) rc = -1;
    if ((rc |= vd_vhu_log_enable(f, false)) < 0) return rc;
    cursor = 0;
    if (run_job() < 0 || check_log("reads, logging off", false, false) < 0) rc = -1;
    return rc;
}

static int write_expect(const char *path)
{
    uint64_t cap = vd_vhu_capacity(f);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { perror(path); return -1; }
    uint8_t *b = malloc(1 << 20);
    uint64_t wz = WZ_OFF(cfg.size) & ~4095ull, dis = DIS_OFF(cfg.size) & ~4095ull;
    for (uint64_t off = 0; off < cfg.size; off += 1 << 20) {
        uint64_t n = cfg.size - off < (1u << 20) ? cfg.size - off : 1u << 20;
        pattern(off, n, b);
        for (uint64_t i = 0; i < n; i++) {
            uint64_t o = off + i;
            if ((o >= wz && o < wz + DWZ_LEN) || (o >= dis && o < dis + DWZ_LEN)) b[i] = 0;
        }
        if (pwrite(fd, b, n, off) != (ssize_t)n) { perror(path); return -1; }
    }
    if (ftruncate(fd, cap) < 0) { perror(path); return -1; }
    free(b);
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        { "mode", 1, 0, 'm' }, { "queues", 1, 0, 'q' }, { "qd", 1, 0, 'd' }, { "bs", 1, 0, 'b' },
        { "size", 1, 0, 's' }, { "runtime", 1, 0, 't' }, { "seed", 1, 0, 'S' }, { "json", 0, 0, 'j' },
        { "no-indirect", 0, 0, 'I' }, { "no-event-idx", 0, 0, 'E' }, { "no-inflight", 0, 0, 'F' },
        { "split-memory", 0, 0, 'M' }, { "reconnect", 1, 0, 'r' }, { "expect", 1, 0, 'x' },
        { "queue-size", 1, 0, 'Q' }, { "rate", 1, 0, 'R' }, { "threads", 0, 0, 'T' }, { 0 } };
    static const char *modes[] = { "fill", "verify", "check", "randread", "randwrite", "seqread", "seqwrite", "resize-wait", "dirty-log" };
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'm': {
            unsigned i;
            for (i = 0; i < sizeof(modes) / sizeof(*modes) && strcmp(modes[i], optarg); i++) {}
            if (i == sizeof(modes) / sizeof(*modes)) { fprintf(stderr, "vhost_io: unknown mode %s\n", optarg); return 2; }
            cfg.mode = i;
            break;
        }
        case 'q': cfg.queues = atoi(optarg); break;
        case 'd': cfg.qd = atoi(optarg); break;
        case 'b': if (vd_parse_size(optarg, &cfg.bs) < 0) return 2; break;
        case 's': if (vd_parse_size(optarg, &cfg.size) < 0) return 2; break;
        case 't': cfg.runtime = atof(optarg); break;
        case 'S': cfg.seed = strtoull(optarg, NULL, 0); break;
        case 'j': cfg.json = true; break;
        case 'I': cfg.fo.no_indirect = true; break;
        case 'E': cfg.fo.no_event_idx = true; break;
        case 'F': cfg.fo.no_inflight = true; break;
        case 'M': cfg.fo.split_memory = true; break;
        case 'r': cfg.reconnect_ms = atoi(optarg); break;
        case 'x': cfg.expect = optarg; break;
        case 'Q': cfg.fo.queue_size = atoi(optarg); break;
        case 'R': cfg.rate = atof(optarg); break;
        case 'T': cfg.threads = true; break;
        default: return 2;
        }
    }
    if (argc - optind != 1 || !cfg.queues || !cfg.qd || !cfg.bs || cfg.bs % 512 || cfg.queues > 64) {
        fprintf(stderr, "usage: vhost_io [options] SOCKET (see the source)\n");
        return 2;
    }
    cfg.fo.num_queues = cfg.queues;
    cfg.fo.buf_size = (size_t)cfg.queues * cfg.qd * cfg.bs + (2u << 20);
    if (!cfg.fo.queue_size) {
        unsigned need = cfg.fo.no_indirect ? 3 * cfg.qd : cfg.qd, qs = 128;
        while (qs < need) qs *= 2;
        cfg.fo.queue_size = qs;
    }
    int rc = vd_vhu_connect(argv[optind], &cfg.fo, &f);
    if (rc < 0) { fprintf(stderr, "vhost_io: %s\n", vd_errmsg(rc)); return 1; }
    uint64_t cap = vd_vhu_capacity(f);
    if (!cfg.size || cfg.size > cap) cfg.size = cap;
    cfg.size &= ~4095ull;
    if (cfg.mode == M_CHECK && cfg.size < 4 * DWZ_LEN) { fprintf(stderr, "vhost_io: device too small\n"); return 1; }
    bufs = vd_vhu_buf(f, NULL);
    slots = calloc((size_t)cfg.queues * cfg.qd, sizeof(*slots));
    for (unsigned i = 0; i < cfg.queues * cfg.qd; i++) slots[i].buf = bufs + (2u << 20) + (size_t)i * cfg.bs;
    /* the first 2 MiB of the buffer area: the single requests of check */

    enum mode asked = cfg.mode;
    double t0 = now();
    deadline = t0 + cfg.runtime;
    end = cfg.size;
    if (cfg.mode == M_CHECK) rc = do_check();
    else if (cfg.mode == M_RESIZE) rc = do_resize_wait();
    else if (cfg.mode == M_DIRTY) rc = do_dirty_log();
    else rc = run_job();
    double el = now() - t0;
    if (rc == 0 && cfg.expect) rc = write_expect(cfg.expect);
    if (cfg.json)
        printf("{\"mode\":\"%s\",\"queues\":%u,\"qd\":%u,\"bs\":%" PRIu64 ",\"ops\":%" PRIu64
               ",\"seconds\":%.3f,\"iops\":%.0f,\"mib_s\":%.1f,\"errors\":%" PRIu64
               ",\"mismatches\":%" PRIu64 ",\"reconnects\":%" PRIu64 "}\n",
               modes[asked], cfg.queues, cfg.qd, cfg.bs, done_ops, el, done_ops / el,
               done_bytes / el / 1048576, errors, mismatches, reconnects);
    else
        printf("%s: %" PRIu64 " ops in %.2f s: %.0f IOPS, %.1f MiB/s, %" PRIu64 " errors, %" PRIu64
               " mismatches, %" PRIu64 " reconnects\n", modes[asked], done_ops, el, done_ops / el,
               done_bytes / el / 1048576, errors, mismatches, reconnects);
    vd_vhu_close(f);
    free(slots);
    (void)lat_sum_ns;
    return rc == 0 && !errors && !mismatches ? 0 : 1;
}

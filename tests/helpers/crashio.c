/* crashio: the writer and the checker of the crash-consistency harness
 * (tests/crash/crash.sh).
 *
 *   crashio write  [-f fmt] [-t cache] [-s seed] [-b max_blocks] [-k flush_every]
 *                  [-q inflight] [-n count] [-a] IMAGE JOURNAL
 *   crashio verify [-f fmt] IMAGE JOURNAL
 *
 * The writer opens IMAGE through the block layer and writes a deterministic
 * sequence of writes (from the seed): write #s covers 1..max_blocks 4 KiB
 * blocks at a random place, and every block it writes describes itself:
 * magic, block number, sequence number, a checksum, and a fill derived
 * from (block, sequence). Up to `inflight` writes that do not overlap are
 * in flight at once. After every `flush_every` writes it flushes, and once
 * the flush has completed it appends the newest acknowledged sequence
 * number to JOURNAL and fsyncs it: everything up to that number is durable.
 *
 * With -a the writer appends a new round to JOURNAL instead of starting
 * one: the image already holds an earlier (crashed) round's blocks, and the
 * new round (its own seed) writes over them, exercising recovery.
 *
 * The checker replays every round's sequence and reads every block: each
 * must be zeros or a valid block of a write that covered it, and never
 * older than the last durable write that covered it (in any round). Exit status 0 when every block
 * passes, 1 otherwise (the first failures are printed), 2 on errors. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "vdisk/block.h"
#include "vdisk/error.h"

#define UNIT  4096u
#define MAGIC 0x7664637261736821ull    /* "vdcrash!" */

struct hdr {
    uint64_t magic, blk, seq, seed;
    uint64_t sum;                      /* FNV-1a of the block with sum = 0 */
};

struct params {
    uint64_t seed, size;
    unsigned maxb, flush_every, inflight;
};

struct wr {
    uint64_t blk;
    uint32_t n;
};

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The next write of the sequence. */
static struct wr next_write(uint64_t *rng, const struct params *p)
{
    uint64_t nblocks = p->size / UNIT;
    struct wr w;
    w.n = (uint32_t)(1 + splitmix(rng) % p->maxb);
    if (w.n > nblocks)
        w.n = (uint32_t)nblocks;
    w.blk = splitmix(rng) % (nblocks - w.n + 1);
    return w;
}

static uint64_t fnv(const uint8_t *b, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static void fill_block(uint8_t *b, uint64_t blk, uint64_t seq, uint64_t seed)
{
    uint64_t s = blk * 0x9e3779b97f4a7c15ull ^ seq ^ (seed << 17);
    for (size_t i = sizeof(struct hdr); i < UNIT; i += 8) {
        uint64_t v = splitmix(&s);
        memcpy(b + i, &v, 8);
    }
    struct hdr h = { MAGIC, blk, seq, seed, 0 };
    memcpy(b, &h, sizeof(h));
    h.sum = fnv(b, UNIT);
    memcpy(b, &h, sizeof(h));
}

static int die(const char *what, int err)
{
    fprintf(stderr, "crashio: %s: %s\n", what, vd_errmsg(err));
    return 2;
}

/* ---- writer ---- */

struct slot {
    struct vd_req req;
    struct iovec iov;
    uint8_t *buf;
    struct wr w;
    uint64_t seq;
    bool busy;
};

static int failed;
static int pending;

static void write_done(struct vd_req *r, int res)
{
    struct slot *s = r->opaque;
    if (res < 0) {
        fprintf(stderr, "crashio: write #%" PRIu64 " failed: %s\n", s->seq, strerror(-res));
        failed = 1;
    }
    s->busy = false;
    pending--;
}

static int journal_append(int fd, const char *line)
{
    size_t n = strlen(line);
    if (write(fd, line, n) != (ssize_t)n || fsync(fd) < 0) {
        perror("crashio: journal");
        return -1;
    }
    return 0;
}

static bool overlaps(const struct wr *a, const struct wr *b)
{
    return a->blk < b->blk + b->n && b->blk < a->blk + a->n;
}

static int do_write(const char *image, const char *journal, const char *fmt, enum vd_cache cache,
                    struct params p, uint64_t count, bool append)
{
    struct vd_open_opts o = { .format = fmt, .cache = cache };
    struct vd_disk *d;
    int r = vd_disk_open(image, &o, &d);
    if (r < 0)
        return die(image, r);
    p.size = vd_disk_size(d) / UNIT * UNIT;
    if (p.size < UNIT * (uint64_t)p.maxb) {
        fprintf(stderr, "crashio: %s is too small\n", image);
        return 2;
    }
    int jfd = open(journal, O_WRONLY | O_CREAT | (append ? 0 : O_TRUNC) | O_APPEND | O_CLOEXEC, 0644);
    if (jfd < 0) {
        perror(journal);
        return 2;
    }
    char line[256];
    snprintf(line, sizeof(line), "crashio seed=%" PRIu64 " size=%" PRIu64 " maxb=%u flush=%u inflight=%u\n",
             p.seed, p.size, p.maxb, p.flush_every, p.inflight);
    if (journal_append(jfd, line) < 0)
        return 2;

    struct slot *slots = calloc(p.inflight, sizeof(*slots));
    for (unsigned i = 0; i < p.inflight; i++)
        slots[i].buf = vd_alloc_aligned((size_t)UNIT * p.maxb);
    struct vd_loop *loop = vd_loop_current();
    uint64_t rng = p.seed, seq = 0, since_flush = 0;
    struct wr pend = next_write(&rng, &p);

    while (!failed && (count == 0 || seq < count)) {
        /* Start the next write once it overlaps nothing in flight. */
        bool clash = false;
        struct slot *free_slot = NULL;
        for (unsigned i = 0; i < p.inflight; i++) {
            if (slots[i].busy && overlaps(&slots[i].w, &pend))
                clash = true;
            if (!slots[i].busy && !free_slot)
                free_slot = &slots[i];
        }
        if (clash || !free_slot) {
            vd_loop_run_once(loop, -1);
            continue;
        }
        struct slot *s = free_slot;
        s->w = pend;
        s->seq = seq;
        for (uint32_t i = 0; i < pend.n; i++)
            fill_block(s->buf + (size_t)i * UNIT, pend.blk + i, seq, p.seed);
        s->iov = (struct iovec){ s->buf, (size_t)pend.n * UNIT };
        s->req = (struct vd_req){ .op = VD_OP_WRITE, .off = pend.blk * UNIT, .len = (uint64_t)pend.n * UNIT,
                                  .iov = &s->iov, .iovcnt = 1, .done = write_done, .opaque = s };
        s->busy = true;
        pending++;
        vd_disk_submit(d, &s->req);
        seq++;
        pend = next_write(&rng, &p);
        if (++since_flush >= p.flush_every || (count && seq == count)) {
            /* everything submitted so far is acknowledged, then flushed */
            while (pending)
                vd_loop_run_once(loop, -1);
            if (failed)
                break;
            r = vd_disk_flush(d);
            if (r < 0) {
                die("flush", r);
                failed = 1;
                break;
            }
            snprintf(line, sizeof(line), "%" PRIu64 "\n", seq - 1);
            if (journal_append(jfd, line) < 0) {
                failed = 1;
                break;
            }
            since_flush = 0;
        }
    }
    while (pending)
        vd_loop_run_once(loop, -1);
    for (unsigned i = 0; i < p.inflight; i++)
        free(slots[i].buf);
    free(slots);
    close(jfd);
    r = vd_disk_close(d);
    if (r < 0)
        return die("close", r);
    return failed ? 2 : 0;
}

/* ---- checker ---- */

#define MAX_EPOCHS 64

/* One writer run on the image (a "round"): its parameters and what it made
 * durable. Later rounds write over earlier ones. */
struct epoch {
    struct params p;
    int64_t durable;
    uint64_t horizon;
    struct wr *ws;
};

static int read_journal(const char *journal, struct epoch *ep, int *nep)
{
    FILE *f = fopen(journal, "r");
    if (!f) {
        perror(journal);
        return -1;
    }
    char line[256];
    *nep = 0;
    while (fgets(line, sizeof(line), f)) {
        /* a line cut short by the kill has no newline: not durable */
        if (!strchr(line, '\n'))
            break;
        if (!strncmp(line, "crashio ", 8)) {
            if (*nep == MAX_EPOCHS)
                break;
            struct epoch *e = &ep[(*nep)++];
            memset(e, 0, sizeof(*e));
            if (sscanf(line, "crashio seed=%" SCNu64 " size=%" SCNu64 " maxb=%u flush=%u inflight=%u", &e->p.seed,
                       &e->p.size, &e->p.maxb, &e->p.flush_every, &e->p.inflight) != 5 ||
                e->p.maxb == 0 || e->p.size < UNIT || (*nep > 1 && e->p.size != ep[0].p.size)) {
                fprintf(stderr, "crashio: %s: bad header: %s", journal, line);
                fclose(f);
                return -1;
            }
            e->durable = -1;
        } else if (*nep > 0) {
            ep[*nep - 1].durable = (int64_t)strtoull(line, NULL, 10);
        }
    }
    fclose(f);
    if (*nep == 0) {
        fprintf(stderr, "crashio: %s: no valid header\n", journal);
        return -1;
    }
    return 0;
}

static int do_verify(const char *image, const char *journal, const char *fmt)
{
    struct epoch ep[MAX_EPOCHS];
    int nep;
    if (read_journal(journal, ep, &nep) < 0)
        return 2;
    uint64_t size = ep[0].p.size, nblocks = size / UNIT;
    /* Per block, the newest durable write: (epoch, sequence); -1 for none. */
    int *min_ep = malloc(nblocks * sizeof(*min_ep));
    int64_t *minreq = malloc(nblocks * sizeof(*minreq));
    if (!min_ep || !minreq)
        return 2;
    for (uint64_t b = 0; b < nblocks; b++) {
        min_ep[b] = -1;
        minreq[b] = -1;
    }
    for (int e = 0; e < nep; e++) {
        struct epoch *x = &ep[e];
        /* A writer may have gone past its last durable number by up to two
         * flush intervals (killed between flush and journal) plus what was
         * in flight; replay well beyond that. */
        x->horizon = (uint64_t)(x->durable + 1) + 4ull * (x->p.flush_every + x->p.inflight) + 64;
        x->ws = malloc(x->horizon * sizeof(*x->ws));
        if (!x->ws)
            return 2;
        uint64_t rng = x->p.seed;
        for (uint64_t s = 0; s < x->horizon; s++) {
            x->ws[s] = next_write(&rng, &x->p);
            if ((int64_t)s <= x->durable)
                for (uint32_t i = 0; i < x->ws[s].n; i++) {
                    min_ep[x->ws[s].blk + i] = e;
                    minreq[x->ws[s].blk + i] = (int64_t)s;
                }
        }
    }

    struct vd_open_opts o = { .format = fmt, .readonly = true };
    struct vd_disk *d;
    int r = vd_disk_open(image, &o, &d);
    if (r < 0)
        return die(image, r);
    if (vd_disk_size(d) < size) {
        fprintf(stderr, "crashio: %s shrank to %" PRIu64 " bytes\n", image, vd_disk_size(d));
        return 1;
    }
    const size_t chunk = 256;
    uint8_t *buf = vd_alloc_aligned(chunk * UNIT), *want = vd_alloc_aligned(UNIT);
    uint64_t nzero = 0, ndata = 0, nbad = 0, newest = 0;
    for (uint64_t b0 = 0; b0 < nblocks; b0 += chunk) {
        size_t n = nblocks - b0 < chunk ? (size_t)(nblocks - b0) : chunk;
        r = vd_disk_pread(d, buf, n * UNIT, b0 * UNIT);
        if (r < 0)
            return die("read", r);
        for (size_t i = 0; i < n; i++) {
            uint64_t b = b0 + i;
            const uint8_t *blk = buf + i * UNIT;
            struct hdr h;
            memcpy(&h, blk, sizeof(h));
            const char *why = NULL;
            bool zero = true;
            int e = -1;
            for (size_t j = 0; j < UNIT && zero; j++)
                zero = !blk[j];
            if (!zero)
                for (int k = 0; k < nep; k++)
                    if (ep[k].p.seed == h.seed)
                        e = k;
            if (zero) {
                nzero++;
                if (minreq[b] >= 0)
                    why = "reads as zeros but a flushed write covered it";
            } else if (h.magic != MAGIC || h.blk != b || e < 0) {
                why = "not a block written here (bad magic, block number or seed)";
            } else if (h.seq >= ep[e].horizon || ep[e].ws[h.seq].blk > b ||
                       ep[e].ws[h.seq].blk + ep[e].ws[h.seq].n <= b) {
                why = "its sequence number never wrote this block";
            } else {
                fill_block(want, b, h.seq, h.seed);
                if (memcmp(want, blk, UNIT))
                    why = "content or checksum does not match its header";
                else if (e < min_ep[b] || (e == min_ep[b] && (int64_t)h.seq < minreq[b]))
                    why = "older than the last flushed write to it";
                else {
                    ndata++;
                    if (e == nep - 1 && h.seq > newest)
                        newest = h.seq;
                }
            }
            if (why) {
                if (nbad < 10)
                    printf("block %" PRIu64 " (offset %" PRIu64 "): %s (holds round %d #%" PRIu64
                           ", flushed round %d #%" PRId64 ")\n",
                           b, b * UNIT, why, e + 1, zero ? 0 : h.seq, min_ep[b] + 1, minreq[b]);
                nbad++;
            }
        }
    }
    printf("crashio: %" PRIu64 " blocks: %" PRIu64 " data, %" PRIu64 " zero, %" PRIu64 " bad; %d round%s, "
           "durable up to #%" PRId64 ", newest seen #%" PRIu64 "\n", nblocks, ndata, nzero, nbad, nep,
           nep > 1 ? "s" : "", ep[nep - 1].durable, newest);
    free(buf);
    free(want);
    for (int e = 0; e < nep; e++)
        free(ep[e].ws);
    free(min_ep);
    free(minreq);
    vd_disk_close(d);
    return nbad ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (argc < 2 || (strcmp(argv[1], "write") && strcmp(argv[1], "verify"))) {
        fprintf(stderr, "usage: crashio write|verify [-f fmt] [-t cache] [-s seed] [-b max_blocks] "
                        "[-k flush_every] [-q inflight] [-n count] [-a] IMAGE JOURNAL\n");
        return 2;
    }
    bool writer = argv[1][0] == 'w';
    struct params p = { .seed = 1, .maxb = 16, .flush_every = 8, .inflight = 4 };
    const char *fmt = NULL;
    enum vd_cache cache = VD_CACHE_WRITEBACK;
    uint64_t count = 0;
    bool append = false;
    int c;
    optind = 2;
    while ((c = getopt(argc, argv, "f:t:s:b:k:q:n:a")) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 't':
            if (vd_cache_parse(optarg, &cache) < 0) {
                fprintf(stderr, "crashio: bad cache mode %s\n", optarg);
                return 2;
            }
            break;
        case 's': p.seed = strtoull(optarg, NULL, 0); break;
        case 'b': p.maxb = (unsigned)atoi(optarg); break;
        case 'k': p.flush_every = (unsigned)atoi(optarg); break;
        case 'q': p.inflight = (unsigned)atoi(optarg); break;
        case 'n': count = strtoull(optarg, NULL, 0); break;
        case 'a': append = true; break;
        default: return 2;
        }
    }
    if (argc - optind != 2 || p.maxb < 1 || p.maxb > 256 || p.flush_every < 1 || p.inflight < 1 ||
        p.inflight > 64) {
        fprintf(stderr, "crashio: bad arguments\n");
        return 2;
    }
    if (writer)
        return do_write(argv[optind], argv[optind + 1], fmt, cache, p, count, append);
    return do_verify(argv[optind], argv[optind + 1], fmt);
}

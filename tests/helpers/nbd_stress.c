/* NBD stress client: N connections (threads), each keeping DEPTH requests
 * in flight: random unaligned writes into its own region of the export,
 * mirrored into a shadow copy, then a flush and a full read-back compared
 * with the shadow. Exit 0 only when every byte matches and no request
 * failed.   usage: nbd_stress URI CONNECTIONS DEPTH WRITES_PER_CONNECTION */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libnbd.h>

#define SLOT 65536u

static const char *uri;
static unsigned nconn, depth, nwrites;
static uint64_t region;

struct op {
    struct worker *w;
    unsigned slot;
    uint64_t off;
    size_t len;
    uint8_t *buf;
};

struct worker {
    unsigned id;
    struct nbd_handle *h;
    uint8_t *shadow;
    uint8_t *busy;
    uint64_t base;
    int failed;
    uint64_t mismatches;
    uint64_t seed;
};

static uint64_t rnd(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static int write_done(void *opaque, int *error)
{
    struct op *o = opaque;
    if (*error) {
        fprintf(stderr, "conn %u: write at %" PRIu64 " failed: %s\n", o->w->id, o->off, strerror(*error));
        o->w->failed = 1;
    }
    o->w->busy[o->slot] = 0;
    free(o->buf);
    free(o);
    return 1;
}

static int read_done(void *opaque, int *error)
{
    struct op *o = opaque;
    struct worker *w = o->w;
    if (*error) {
        fprintf(stderr, "conn %u: read at %" PRIu64 " failed: %s\n", w->id, o->off, strerror(*error));
        w->failed = 1;
    } else if (memcmp(o->buf, w->shadow + (o->off - w->base), o->len)) {
        for (size_t i = 0; i < o->len; i++)
            if (o->buf[i] != w->shadow[o->off - w->base + i]) {
                fprintf(stderr, "conn %u: mismatch at %" PRIu64 "\n", w->id, o->off + i);
                break;
            }
        w->mismatches++;
    }
    free(o->buf);
    free(o);
    return 1;
}

static void *run(void *opaque)
{
    struct worker *w = opaque;
    unsigned nslots = (unsigned)(region / SLOT);
    w->h = nbd_create();
    if (!w->h || nbd_connect_uri(w->h, uri) < 0) {
        fprintf(stderr, "conn %u: %s\n", w->id, nbd_get_error());
        w->failed = 1;
        return NULL;
    }
    /* The shadow starts as the current content of the region. */
    if (nbd_pread(w->h, w->shadow, region, w->base, 0) < 0) {
        fprintf(stderr, "conn %u: initial read: %s\n", w->id, nbd_get_error());
        w->failed = 1;
        return NULL;
    }
    unsigned submitted = 0;
    while (submitted < nwrites || nbd_aio_in_flight(w->h) > 0) {
        while (submitted < nwrites && (unsigned)nbd_aio_in_flight(w->h) < depth) {
            unsigned slot = (unsigned)(rnd(&w->seed) % nslots);
            if (w->busy[slot])
                break;   /* never two writes to one slot at once: order is not defined */
            struct op *o = calloc(1, sizeof *o);
            o->w = w;
            o->slot = slot;
            uint64_t in = rnd(&w->seed) % SLOT;
            o->len = 1 + rnd(&w->seed) % (SLOT - in);
            o->off = w->base + (uint64_t)slot * SLOT + in;
            o->buf = malloc(o->len);
            for (size_t i = 0; i < o->len; i++)
                o->buf[i] = (uint8_t)rnd(&w->seed);
            memcpy(w->shadow + (o->off - w->base), o->buf, o->len);
            w->busy[slot] = 1;
            nbd_completion_callback cb = { .callback = write_done, .user_data = o };
            if (nbd_aio_pwrite(w->h, o->buf, o->len, o->off, cb, 0) < 0) {
                fprintf(stderr, "conn %u: submit: %s\n", w->id, nbd_get_error());
                w->failed = 1;
                return NULL;
            }
            submitted++;
        }
        if (nbd_aio_in_flight(w->h) > 0 && nbd_poll(w->h, -1) < 0) {
            fprintf(stderr, "conn %u: poll: %s\n", w->id, nbd_get_error());
            w->failed = 1;
            return NULL;
        }
    }
    if (nbd_flush(w->h, 0) < 0) {
        fprintf(stderr, "conn %u: flush: %s\n", w->id, nbd_get_error());
        w->failed = 1;
    }
    /* Read everything back, depth at a time, in 64 KiB pieces. */
    for (uint64_t off = 0; off < region || nbd_aio_in_flight(w->h) > 0;) {
        while (off < region && (unsigned)nbd_aio_in_flight(w->h) < depth) {
            struct op *o = calloc(1, sizeof *o);
            o->w = w;
            o->off = w->base + off;
            o->len = SLOT;
            o->buf = malloc(SLOT);
            nbd_completion_callback cb = { .callback = read_done, .user_data = o };
            if (nbd_aio_pread(w->h, o->buf, o->len, o->off, cb, 0) < 0) {
                w->failed = 1;
                return NULL;
            }
            off += SLOT;
        }
        if (nbd_aio_in_flight(w->h) > 0 && nbd_poll(w->h, -1) < 0) {
            w->failed = 1;
            return NULL;
        }
    }
    nbd_shutdown(w->h, 0);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s URI CONNECTIONS DEPTH WRITES\n", argv[0]);
        return 2;
    }
    uri = argv[1];
    nconn = (unsigned)atoi(argv[2]);
    depth = (unsigned)atoi(argv[3]);
    nwrites = (unsigned)atoi(argv[4]);
    struct nbd_handle *h = nbd_create();
    if (!h || nbd_connect_uri(h, uri) < 0) {
        fprintf(stderr, "%s\n", nbd_get_error());
        return 1;
    }
    int64_t size = nbd_get_size(h);
    nbd_close(h);
    region = ((uint64_t)size / nconn) / SLOT * SLOT;
    if (region < SLOT * 4) {
        fprintf(stderr, "export too small\n");
        return 1;
    }
    struct worker *w = calloc(nconn, sizeof *w);
    pthread_t *t = calloc(nconn, sizeof *t);
    for (unsigned i = 0; i < nconn; i++) {
        w[i].id = i;
        w[i].base = region * i;
        w[i].shadow = malloc(region);
        w[i].busy = calloc(region / SLOT, 1);
        w[i].seed = 0x9e3779b97f4a7c15ull * (i + 1);
        pthread_create(&t[i], NULL, run, &w[i]);
    }
    int bad = 0;
    for (unsigned i = 0; i < nconn; i++) {
        pthread_join(t[i], NULL);
        if (w[i].h)
            nbd_close(w[i].h);
        if (w[i].failed || w[i].mismatches) {
            fprintf(stderr, "conn %u: %s, %" PRIu64 " mismatching reads\n", i,
                    w[i].failed ? "failed" : "ok", w[i].mismatches);
            bad = 1;
        }
        free(w[i].shadow);
        free(w[i].busy);
    }
    free(w);
    free(t);
    if (!bad)
        printf("%u connections x %u writes at depth %u: data verified\n", nconn, nwrites, depth);
    return bad;
}

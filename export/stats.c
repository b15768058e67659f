/* Per-export statistics: lock-free counters and a log-linear latency
 * histogram (8 buckets per power of two, so percentiles are within ~6%). */
#include <time.h>
#include "vdisk/export.h"

static const char *const op_names[VD_STAT_NOPS] = {
    "read", "write", "flush", "discard", "write-zeroes", "cache", "block-status",
};

uint64_t vd_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static unsigned bucket_of(uint64_t ns)
{
    if (ns < 8)
        return (unsigned)ns;
    unsigned msb = 63u - (unsigned)__builtin_clzll(ns);
    unsigned idx = (msb - 2) * 8 + (unsigned)((ns >> (msb - 3)) & 7);
    return idx < VD_STAT_BUCKETS ? idx : VD_STAT_BUCKETS - 1;
}

/* Middle of a bucket's range. */
static uint64_t bucket_value(unsigned idx)
{
    if (idx < 8)
        return idx;
    unsigned msb = idx / 8 + 2, sub = idx % 8;
    uint64_t lo = (uint64_t)(8 + sub) << (msb - 3);
    uint64_t hi = (uint64_t)(9 + sub) << (msb - 3);
    return lo + (hi - lo) / 2;
}

void vd_export_stat(struct vd_export *e, enum vd_stat_op op, uint64_t bytes, uint64_t ns, int res)
{
    if (!e || op >= VD_STAT_NOPS)
        return;
    struct vd_stat_slot *s = &e->stats[op];
    atomic_fetch_add_explicit(&s->ops, 1, memory_order_relaxed);
    if (res < 0)
        atomic_fetch_add_explicit(&s->errors, 1, memory_order_relaxed);
    else
        atomic_fetch_add_explicit(&s->bytes, bytes, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->lat[bucket_of(ns)], 1, memory_order_relaxed);
}

uint64_t vd_stat_percentile(const struct vd_stat_slot *s, double p)
{
    uint64_t counts[VD_STAT_BUCKETS], total = 0;
    for (unsigned i = 0; i < VD_STAT_BUCKETS; i++) {
        counts[i] = atomic_load_explicit(&s->lat[i], memory_order_relaxed);
        total += counts[i];
    }
    if (!total)
        return 0;
    uint64_t rank = (uint64_t)(p / 100.0 * (double)total + 0.999999);
    if (rank < 1)
        rank = 1;
    uint64_t cum = 0;
    for (unsigned i = 0; i < VD_STAT_BUCKETS; i++) {
        cum += counts[i];
        if (cum >= rank)
            return bucket_value(i);
    }
    return bucket_value(VD_STAT_BUCKETS - 1);
}

json_t *vd_export_stats_json(struct vd_export *e)
{
    json_t *o = json_object();
    uint64_t total = 0;
    json_object_set_new(o, "name", json_string(e->name));
    for (int i = 0; i < VD_STAT_NOPS; i++) {
        const struct vd_stat_slot *s = &e->stats[i];
        json_t *x = json_object();
        uint64_t ops = atomic_load(&s->ops);
        total += ops;
        json_object_set_new(x, "operations", json_integer((json_int_t)ops));
        json_object_set_new(x, "bytes", json_integer((json_int_t)atomic_load(&s->bytes)));
        json_object_set_new(x, "errors", json_integer((json_int_t)atomic_load(&s->errors)));
        json_t *lat = json_object();
        json_object_set_new(lat, "p50", json_integer((json_int_t)(vd_stat_percentile(s, 50) / 1000)));
        json_object_set_new(lat, "p99", json_integer((json_int_t)(vd_stat_percentile(s, 99) / 1000)));
        json_object_set_new(x, "latency-us", lat);
        json_object_set_new(o, op_names[i], x);
    }
    json_object_set_new(o, "operations", json_integer((json_int_t)total));
    if (e->type->stats)
        e->type->stats(e, o);
    return o;
}

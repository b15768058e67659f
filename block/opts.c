/* qemu-style option strings and sizes (include/vdisk/opts.h). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include "vdisk/error.h"
#include "vdisk/opts.h"

int vd_opts_set(struct vd_opts *o, const char *key, const char *val)
{
    if (o->n == o->cap) {
        size_t cap = o->cap ? o->cap * 2 : 8;
        struct vd_kv *kv = realloc(o->kv, cap * sizeof(*kv));
        if (!kv)
            return -ENOMEM;
        o->kv = kv;
        o->cap = cap;
    }
    o->kv[o->n].key = strdup(key);
    o->kv[o->n].val = strdup(val ? val : "");
    o->kv[o->n].used = false;
    if (!o->kv[o->n].key || !o->kv[o->n].val)
        return -ENOMEM;
    o->n++;
    return 0;
}

/* Split on ',' (",," is a literal comma); each part is key[=value]. */
int vd_opts_parse(struct vd_opts *o, const char *s)
{
    size_t n = strlen(s);
    char *buf = malloc(n + 1);
    if (!buf)
        return -ENOMEM;
    size_t i = 0;
    while (i <= n) {
        size_t j = 0;
        while (i < n) {
            if (s[i] == ',') {
                if (i + 1 < n && s[i + 1] == ',') {
                    buf[j++] = ',';
                    i += 2;
                    continue;
                }
                break;
            }
            buf[j++] = s[i++];
        }
        buf[j] = 0;
        i++;                         /* skip the separator (or the end) */
        if (j == 0) {
            if (i > n)
                break;
            free(buf);
            return vd_err(-EINVAL, "Invalid option string '%s': empty option", s);
        }
        char *eq = strchr(buf, '=');
        if (eq)
            *eq = 0;
        if (!buf[0]) {
            free(buf);
            return vd_err(-EINVAL, "Invalid option string '%s': option without a name", s);
        }
        int r = vd_opts_set(o, buf, eq ? eq + 1 : "");
        if (r < 0) {
            free(buf);
            return r;
        }
    }
    free(buf);
    return 0;
}

void vd_opts_free(struct vd_opts *o)
{
    for (size_t i = 0; i < o->n; i++) {
        free(o->kv[i].key);
        free(o->kv[i].val);
    }
    free(o->kv);
    memset(o, 0, sizeof(*o));
}

const char *vd_opts_get(struct vd_opts *o, const char *key)
{
    const char *v = NULL;
    if (!o)
        return NULL;
    for (size_t i = 0; i < o->n; i++)
        if (!strcmp(o->kv[i].key, key)) {
            o->kv[i].used = true;
            v = o->kv[i].val;
        }
    return v;
}

int vd_opts_get_size(struct vd_opts *o, const char *key, uint64_t *out)
{
    const char *v = vd_opts_get(o, key);
    if (!v)
        return 0;
    if (vd_parse_size(v, out) < 0)
        return vd_err(-EINVAL, "Parameter '%s' expects a size (e.g. 64K, 1G), not '%s'", key, v);
    return 0;
}

int vd_opts_get_u64(struct vd_opts *o, const char *key, uint64_t *out)
{
    const char *v = vd_opts_get(o, key);
    if (!v)
        return 0;
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 0);
    if (!*v || *end || errno || v[0] == '-')
        return vd_err(-EINVAL, "Parameter '%s' expects a number, not '%s'", key, v);
    *out = x;
    return 0;
}

int vd_opts_get_bool(struct vd_opts *o, const char *key, bool *out)
{
    const char *v = vd_opts_get(o, key);
    if (!v)
        return 0;
    if (!strcasecmp(v, "on") || !strcasecmp(v, "true") || !strcasecmp(v, "yes") || !*v)
        *out = true;
    else if (!strcasecmp(v, "off") || !strcasecmp(v, "false") || !strcasecmp(v, "no"))
        *out = false;
    else
        return vd_err(-EINVAL, "Parameter '%s' expects 'on' or 'off', not '%s'", key, v);
    return 0;
}

int vd_opts_check_unused(const struct vd_opts *o)
{
    for (size_t i = 0; o && i < o->n; i++)
        if (!o->kv[i].used)
            return vd_err(-EINVAL, "Invalid parameter '%s'", o->kv[i].key);
    return 0;
}

int vd_parse_size(const char *s, uint64_t *out)
{
    static const char units[] = "bkmgtpe";
    if (!s || *s < '0' || *s > '9')
        return -EINVAL;             /* no sign, no space, no exponent forms */
    char *end;
    errno = 0;
    unsigned long long ip = strtoull(s, &end, 10);
    if (errno)
        return -ERANGE;
    /* a fraction only with a unit, as qemu accepts "1.5G": plain digits */
    uint64_t frac_num = 0, frac_den = 1;
    if (*end == '.') {
        end++;
        if (*end < '0' || *end > '9')
            return -EINVAL;
        while (*end >= '0' && *end <= '9') {
            if (frac_den < 1000000000000ULL) {    /* 12 digits are plenty */
                frac_num = frac_num * 10 + (uint64_t)(*end - '0');
                frac_den *= 10;
            }
            end++;
        }
    }
    int shift = 0;
    if (*end) {
        const char *u = strchr(units, (char)(*end | 0x20));
        if (!u || end[1])
            return -EINVAL;
        shift = 10 * (int)(u - units);
    } else if (frac_den > 1) {
        return -EINVAL;
    }
    if (shift && ip > (UINT64_MAX >> shift))
        return -ERANGE;
    uint64_t v = (uint64_t)ip << shift;
    if (frac_num) {
        /* frac_num / frac_den < 1, so this part is below 1 << shift */
        unsigned __int128 f = ((unsigned __int128)frac_num << shift) / frac_den;
        if (v > UINT64_MAX - (uint64_t)f)
            return -ERANGE;
        v += (uint64_t)f;
    }
    if (v > (uint64_t)INT64_MAX)
        return -ERANGE;
    *out = v;
    return 0;
}

void vd_format_size(uint64_t bytes, char *buf, size_t len)
{
    /* As qemu-img prints sizes: three significant digits, and the next unit
     * up once the number reaches 1000 (so 1000 KiB shows as 0.977 MiB). */
    static const char *suffix[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    int i = 0;
    double v = (double)bytes;
    while (v >= 1000 && i < 6) {
        v /= 1024;
        i++;
    }
    snprintf(buf, len, "%0.3g %s", v, suffix[i]);
}

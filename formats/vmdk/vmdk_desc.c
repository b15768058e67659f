/* VMDK descriptor: a small text file (or a text area inside a sparse
 * extent) of "key=value" lines and extent lines. Every line is kept as read
 * so that a rewrite (a new CID) changes only what it must. */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "vdisk/error.h"
#include "formats/vmdk/vmdk.h"

#define MAX_DESC_LINES   100000
#define MAX_DESC_EXTENTS 65536

static const char *const etype_names[] = {
    [VMDK_SPARSE] = "SPARSE", [VMDK_FLAT] = "FLAT", [VMDK_ZERO] = "ZERO",
    [VMDK_VMFS] = "VMFS", [VMDK_VMFSSPARSE] = "VMFSSPARSE",
};

const char *vd_vmdk_etype_name(enum vmdk_etype t) { return etype_names[t]; }

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    char *e = s + strlen(s);
    while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\r'))
        *--e = 0;
    return s;
}

static void free_line(struct vmdk_desc_line *l)
{
    free(l->text);
    free(l->key);
    free(l->val);
}

void vd_vmdk_desc_free(struct vmdk_desc *d)
{
    for (size_t i = 0; i < d->nlines; i++)
        free_line(&d->lines[i]);
    free(d->lines);
    for (size_t i = 0; i < d->next; i++)
        free(d->ext[i].file);
    free(d->ext);
    free(d->create_type);
    free(d->parent_hint);
    memset(d, 0, sizeof(*d));
}

const char *vd_vmdk_desc_get(const struct vmdk_desc *d, const char *key)
{
    const char *v = NULL;
    for (size_t i = 0; i < d->nlines; i++)
        if (d->lines[i].key && !strcmp(d->lines[i].key, key))
            v = d->lines[i].val;
    return v;
}

static int parse_u64(const char *s, uint64_t *out, int base)
{
    char *end;
    if (!*s || *s == '-' || *s == '+' || isspace((unsigned char)*s))
        return -EINVAL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, base);
    if (errno || *end)
        return -EINVAL;
    *out = v;
    return 0;
}

/* ACCESS SECTORS TYPE ["FILE" [OFFSET]] */
static int parse_extent(const char *name, char *s, size_t lineno, struct vmdk_desc_extent *e)
{
    char *tok[3], *p = s;
    memset(e, 0, sizeof(*e));
    for (int i = 0; i < 3; i++) {
        while (*p == ' ' || *p == '\t')
            p++;
        tok[i] = p;
        while (*p && *p != ' ' && *p != '\t')
            p++;
        if (*p)
            *p++ = 0;
        if (!*tok[i])
            return vd_err(-EINVAL, "%s: descriptor line %zu: extent line needs access, size and type",
                          name, lineno);
    }
    if (!strcmp(tok[0], "RW"))
        e->access = VMDK_RW;
    else if (!strcmp(tok[0], "RDONLY"))
        e->access = VMDK_RDONLY;
    else
        e->access = VMDK_NOACCESS;
    if (parse_u64(tok[1], &e->sectors, 10) < 0 || e->sectors == 0 || e->sectors > (1ull << 40))
        return vd_err(-EINVAL, "%s: descriptor line %zu: bad extent size '%s'", name, lineno, tok[1]);
    int t = -1;
    for (int i = 0; i < 5; i++)
        if (!strcmp(tok[2], etype_names[i]))
            t = i;
    if (t < 0)
        return vd_err(-ENOTSUP, "%s: descriptor line %zu: unsupported extent type '%s'", name,
                      lineno, tok[2]);
    e->type = (enum vmdk_etype)t;
    while (*p == ' ' || *p == '\t')
        p++;
    if (e->type == VMDK_ZERO)
        return 0;
    if (*p != '"')
        return vd_err(-EINVAL, "%s: descriptor line %zu: %s extent needs a quoted file name", name,
                      lineno, tok[2]);
    char *q = strchr(p + 1, '"');
    if (!q || q == p + 1)
        return vd_err(-EINVAL, "%s: descriptor line %zu: unterminated or empty file name", name, lineno);
    *q = 0;
    e->file = strdup(p + 1);
    if (!e->file)
        return -ENOMEM;
    p = q + 1;
    while (*p == ' ' || *p == '\t')
        p++;
    if (*p) {
        if ((e->type != VMDK_FLAT && e->type != VMDK_VMFS) || parse_u64(p, &e->offset, 10) < 0 ||
            e->offset > (1ull << 50)) {
            free(e->file);
            e->file = NULL;
            return vd_err(-EINVAL, "%s: descriptor line %zu: bad extent offset '%s'", name, lineno, p);
        }
    }
    return 0;
}

int vd_vmdk_desc_parse(const char *name, const char *text, size_t len, struct vmdk_desc *d)
{
    memset(d, 0, sizeof(*d));
    size_t n = strnlen(text, len);
    char *buf = malloc(n + 1);
    int r = 0;
    if (!buf)
        return -ENOMEM;
    memcpy(buf, text, n);
    buf[n] = 0;
    bool have_cid = false;
    d->parent_cid = 0xFFFFFFFFu;
    char *save = NULL, *line = buf;
    size_t lineno = 0;
    while (line && *line) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = 0;
        lineno++;
        if (d->nlines >= MAX_DESC_LINES) {
            r = vd_err(-EINVAL, "%s: descriptor has too many lines", name);
            goto out;
        }
        for (char *c = line; *c; c++)
            if ((unsigned char)*c < 0x20 && *c != '\t' && *c != '\r') {
                r = vd_err(-EINVAL, "%s: descriptor line %zu holds a control character (0x%02x): "
                           "not a text descriptor", name, lineno, (unsigned char)*c);
                goto out;
            }
        struct vmdk_desc_line *nlp = realloc(d->lines, (d->nlines + 1) * sizeof(*nlp));
        if (!nlp) {
            r = -ENOMEM;
            goto out;
        }
        d->lines = nlp;
        struct vmdk_desc_line *L = &d->lines[d->nlines++];
        memset(L, 0, sizeof(*L));
        char *raw = strdup(line);
        if (!raw) {
            r = -ENOMEM;
            goto out;
        }
        char *tl = strchr(raw, '\r');
        if (tl && tl[1] == 0)
            *tl = 0;
        L->text = raw;
        char *t = trim(line);
        if (!*t || *t == '#')
            goto next;
        if (!strncmp(t, "RW ", 3) || !strncmp(t, "RDONLY ", 7) || !strncmp(t, "NOACCESS ", 9) ||
            !strncmp(t, "RW\t", 3)) {
            if (d->next >= MAX_DESC_EXTENTS) {
                r = vd_err(-EINVAL, "%s: descriptor has too many extents", name);
                goto out;
            }
            struct vmdk_desc_extent *ne = realloc(d->ext, (d->next + 1) * sizeof(*ne));
            if (!ne) {
                r = -ENOMEM;
                goto out;
            }
            d->ext = ne;
            r = parse_extent(name, t, lineno, &d->ext[d->next]);
            if (r < 0)
                goto out;
            d->next++;
            goto next;
        }
        char *eq = strchr(t, '=');
        if (!eq) {
            r = vd_err(-EINVAL, "%s: descriptor line %zu is neither 'key = value' nor an extent: '%.40s'",
                       name, lineno, t);
            goto out;
        }
        *eq = 0;
        char *k = trim(t), *v = trim(eq + 1);
        size_t vl = strlen(v);
        if (vl >= 2 && v[0] == '"' && v[vl - 1] == '"') {
            v[vl - 1] = 0;
            v++;
            L->quoted = true;
        }
        L->key = strdup(k);
        L->val = strdup(v);
        if (!L->key || !L->val) {
            r = -ENOMEM;
            goto out;
        }
        uint64_t x;
        if (!strcmp(k, "CID")) {
            if (parse_u64(v, &x, 16) < 0 || x > 0xFFFFFFFFu) {
                r = vd_err(-EINVAL, "%s: descriptor line %zu: bad CID '%s'", name, lineno, v);
                goto out;
            }
            d->cid = (uint32_t)x;
            have_cid = true;
        } else if (!strcmp(k, "parentCID")) {
            if (parse_u64(v, &x, 16) < 0 || x > 0xFFFFFFFFu) {
                r = vd_err(-EINVAL, "%s: descriptor line %zu: bad parentCID '%s'", name, lineno, v);
                goto out;
            }
            d->parent_cid = (uint32_t)x;
        } else if (!strcmp(k, "createType")) {
            free(d->create_type);
            d->create_type = strdup(v);
        } else if (!strcmp(k, "parentFileNameHint")) {
            free(d->parent_hint);
            d->parent_hint = strdup(v);
        } else if (!strcmp(k, "version")) {
            if (parse_u64(v, &x, 10) < 0 || x < 1 || x > 3) {
                r = vd_err(-ENOTSUP, "%s: descriptor line %zu: unsupported descriptor version '%s'",
                           name, lineno, v);
                goto out;
            }
        }
next:
        line = nl ? nl + 1 : NULL;
    }
    (void)save;
    if (!d->create_type) {
        r = vd_err(-EINVAL, "%s: descriptor has no createType", name);
        goto out;
    }
    if (d->next == 0) {
        r = vd_err(-EINVAL, "%s: descriptor has no extent lines", name);
        goto out;
    }
    if (!have_cid)
        d->cid = 0xFFFFFFFEu;
out:
    free(buf);
    if (r < 0)
        vd_vmdk_desc_free(d);
    return r;
}

int vd_vmdk_desc_set(struct vmdk_desc *d, const char *key, const char *val, bool quoted)
{
    char *text;
    if (asprintf(&text, quoted ? "%s=\"%s\"" : "%s=%s", key, val) < 0)
        return -ENOMEM;
    char *k = strdup(key), *v = strdup(val);
    if (!k || !v) {
        free(text); free(k); free(v);
        return -ENOMEM;
    }
    for (size_t i = d->nlines; i-- > 0;) {
        struct vmdk_desc_line *L = &d->lines[i];
        if (L->key && !strcmp(L->key, key)) {
            /* Keep the line's own spacing style: "k = v" vs "k=v". */
            if (strstr(L->text, " = ")) {
                free(text);
                if (asprintf(&text, quoted ? "%s = \"%s\"" : "%s = %s", key, val) < 0) {
                    free(k); free(v);
                    return -ENOMEM;
                }
            }
            free_line(L);
            L->text = text; L->key = k; L->val = v; L->quoted = quoted;
            return 0;
        }
    }
    struct vmdk_desc_line *nl = realloc(d->lines, (d->nlines + 1) * sizeof(*nl));
    if (!nl) {
        free(text); free(k); free(v);
        return -ENOMEM;
    }
    d->lines = nl;
    /* Header keys go after the last header key before the extents; ddb keys at the end. */
    size_t at = d->nlines;
    if (strncmp(key, "ddb.", 4) != 0) {
        at = 0;
        for (size_t i = 0; i < d->nlines; i++) {
            const char *t = d->lines[i].text;
            while (*t == ' ')
                t++;
            if (!strncmp(t, "RW", 2) || !strncmp(t, "RDONLY", 6) || !strncmp(t, "NOACCESS", 8) ||
                !strncmp(t, "# Extent", 8))
                break;
            if (d->lines[i].key || t[0] == '#')
                at = i + 1;
        }
    }
    memmove(&d->lines[at + 1], &d->lines[at], (d->nlines - at) * sizeof(*nl));
    d->lines[at] = (struct vmdk_desc_line){ text, k, v, quoted };
    d->nlines++;
    return 0;
}

char *vd_vmdk_desc_text(const struct vmdk_desc *d, size_t *len)
{
    size_t n = 1;
    for (size_t i = 0; i < d->nlines; i++)
        n += strlen(d->lines[i].text) + 1;
    char *out = malloc(n), *p = out;
    if (!out)
        return NULL;
    for (size_t i = 0; i < d->nlines; i++) {
        size_t l = strlen(d->lines[i].text);
        memcpy(p, d->lines[i].text, l);
        p += l;
        *p++ = '\n';
    }
    *p = 0;
    *len = (size_t)(p - out);
    return out;
}

int vd_vmdk_desc_set_extent_sectors(struct vmdk_desc *d, size_t idx, uint64_t sectors)
{
    if (idx >= d->next)
        return -EINVAL;
    size_t seen = 0;
    for (size_t i = 0; i < d->nlines; i++) {
        struct vmdk_desc_line *L = &d->lines[i];
        const char *t = L->text;
        while (*t == ' ' || *t == '\t')
            t++;
        if (L->key || !(!strncmp(t, "RW", 2) || !strncmp(t, "RDONLY", 6) || !strncmp(t, "NOACCESS", 8)))
            continue;
        if (seen++ != idx)
            continue;
        /* ACCESS <spaces> SECTORS <rest>: replace the second token. */
        const char *a = t;
        while (*a && *a != ' ' && *a != '\t')
            a++;
        while (*a == ' ' || *a == '\t')
            a++;
        const char *b = a;
        while (*b && *b != ' ' && *b != '\t')
            b++;
        char *nt;
        if (asprintf(&nt, "%.*s%llu%s", (int)(a - L->text), L->text, (unsigned long long)sectors, b) < 0)
            return -ENOMEM;
        free(L->text);
        L->text = nt;
        d->ext[idx].sectors = sectors;
        return 0;
    }
    return -EINVAL;
}

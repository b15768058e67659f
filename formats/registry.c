/* The format table and probing. A format registers by defining its
 * `vd_format_NAME` and having one line here; formats that are not linked in
 * are weak and NULL. Raw is never probed: a file that no format claims is
 * raw only when the user says so (-f raw), so that a guest cannot turn its
 * raw disk into something else by writing a header into it. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "vdisk/error.h"
#include "vdisk/format.h"

extern const struct vd_format vd_format_raw;
extern const struct vd_format vd_format_qcow2 __attribute__((weak));
extern const struct vd_format vd_format_vmdk __attribute__((weak));
extern const struct vd_format vd_format_vhd __attribute__((weak));

static const struct vd_format *const table[] = {
    &vd_format_raw,
    &vd_format_qcow2,
    &vd_format_vmdk,
    &vd_format_vhd,
};
#define NFORMATS (sizeof(table) / sizeof(table[0]))

#define MAX_EXTRA 8
static const struct vd_format *extra[MAX_EXTRA];
static size_t nextra;

int vd_format_register(const struct vd_format *f)
{
    if (nextra == MAX_EXTRA)
        return -ENOSPC;
    extra[nextra++] = f;
    return 0;
}

const struct vd_format *vd_format_at(size_t i)
{
    for (size_t k = 0; k < NFORMATS; k++) {
        if (!table[k])
            continue;
        if (i-- == 0)
            return table[k];
    }
    return i < nextra ? extra[i] : NULL;
}

const struct vd_format *vd_format_find(const char *name)
{
    const struct vd_format *f;
    for (size_t i = 0; (f = vd_format_at(i)); i++) {
        if (!strcmp(f->name, name))
            return f;
        for (const char *const *a = f->aliases; a && *a; a++)
            if (!strcmp(*a, name))
                return f;
    }
    return NULL;
}

#define PROBE_LEN 65536

int vd_format_probe(struct vd_file *file, const struct vd_format **out)
{
    uint64_t size = 0;
    int r = vd_file_size(file, &size);
    if (r < 0)
        return r;
    size_t len = size < PROBE_LEN ? (size_t)size : PROBE_LEN;
    uint8_t *buf = vd_alloc_aligned(PROBE_LEN);
    if (!buf)
        return -ENOMEM;
    r = vd_file_pread(file, buf, len, 0);
    if (r < 0) {
        free(buf);
        return r;
    }
    const struct vd_format *f, *best = NULL;
    int best_score = 0;
    for (size_t i = 0; (f = vd_format_at(i)); i++) {
        if (!f->probe)
            continue;
        int s = f->probe(buf, len, file);
        if (s > best_score) {
            best_score = s;
            best = f;
        }
    }
    free(buf);
    if (!best) {
        /* Network and cluster exports are disks themselves, as qemu treats them. */
        if (strcmp(file->proto->name, "file") != 0) {
            *out = &vd_format_raw;
            return 0;
        }
        return vd_err(-EINVAL, "%s: unknown image format (no known header found); "
                      "if this is a raw image, say so (-f raw, or format=raw for an export)", file->name);
    }
    *out = best;
    return 0;
}

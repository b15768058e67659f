/* Option strings in qemu's spelling: "key=value,key2=value2" with ",," for a
 * literal comma, and sizes such as 512, 64K, 10G (binary units, k/K..E). */
#ifndef VDISK_OPTS_H
#define VDISK_OPTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct vd_kv {
    char *key;
    char *val;      /* "" for a bare key */
    bool used;      /* set by vd_opts_get*: what is never used is an unknown option */
};

struct vd_opts {
    struct vd_kv *kv;
    size_t n, cap;
};

/* Append the pairs of s (may be called several times, as for repeated -o). */
int  vd_opts_parse(struct vd_opts *o, const char *s);
int  vd_opts_set(struct vd_opts *o, const char *key, const char *val);
void vd_opts_free(struct vd_opts *o);
/* The value for key (last one wins), marking it used; NULL when absent. */
const char *vd_opts_get(struct vd_opts *o, const char *key);
/* Typed getters: 0 and *out untouched when absent, -EINVAL with a message
 * naming the key when malformed. */
int  vd_opts_get_size(struct vd_opts *o, const char *key, uint64_t *out);
int  vd_opts_get_bool(struct vd_opts *o, const char *key, bool *out);   /* on/off, true/false, yes/no */
int  vd_opts_get_u64(struct vd_opts *o, const char *key, uint64_t *out);
/* -EINVAL naming the first key that nobody used, or 0. */
int  vd_opts_check_unused(const struct vd_opts *o);

/* "10G", "512", "1.5M": bytes; -EINVAL for junk, -ERANGE past 2^63. */
int  vd_parse_size(const char *s, uint64_t *out);
/* "1 GiB", "512 KiB", "10 B" as qemu-img prints sizes (up to 3 significant digits). */
void vd_format_size(uint64_t bytes, char *buf, size_t len);

#endif

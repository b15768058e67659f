/* Helpers shared by the vdisk commands: messages, opening images, option
 * values, qemu-img-style JSON / human dumps and the progress line. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "cli.h"
#include "vdisk/error.h"
#include "vdisk/engine.h"

void vd_cli_err(const char *fmt, ...)
{
    va_list ap;
    fflush(stdout);
    fputs("vdisk: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

void vd_cli_err_file(const char *file, int err)
{
    const char *msg = vd_errmsg(err);
    if (file && !strstr(msg, file))
        vd_cli_err("%s: %s", file, msg);
    else
        vd_cli_err("%s", msg);
}

const char *vd_cli_strip(const char *msg, const char *file)
{
    size_t n = strlen(file);
    if (!strncmp(msg, file, n) && msg[n] == ':' && msg[n + 1] == ' ')
        return msg + n + 2;
    return msg;
}

int vd_cli_usage(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    fflush(stdout);
    fprintf(stderr, "vdisk: %s: ", cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nTry 'vdisk %s --help' for more information.\n", cmd);
    return 1;
}

int vd_cli_bad_option(const char *cmd, int c, char **argv)
{
    const char *arg = argv[optind - 1];
    if (c == ':')
        return vd_cli_usage(cmd, "option '%s' requires an argument", arg);
    if (optopt && arg && arg[0] == '-' && arg[1] != '-')
        return vd_cli_usage(cmd, "invalid option -- '%c'", optopt);
    return vd_cli_usage(cmd, "unrecognized option '%s'", arg ? arg : "?");
}

int vd_cli_open(const char *file, const struct vd_cli_open *o, struct vd_disk **out)
{
    struct vd_open_opts oo = {
        .format = o->format,
        .readonly = o->readonly,
        .cache = o->cache,
        .aio = o->aio,
        .no_backing = o->no_backing,
        .discard_ignore = o->discard_ignore,
        .nolock = o->force_share,
    };
    int r;

    vd_err_clear();
    if (oo.format && !vd_format_find(oo.format)) {
        vd_cli_err("%s: Unknown file format '%s'", file, oo.format);
        return -EINVAL;
    }
    if (!oo.format) {
        /* Probe here rather than in vd_disk_open so that a file no format
         * claims gets a message naming the option that would open it: a
         * file is raw only when the user says so, never by guess (a guest
         * could otherwise write a header into a raw disk and have it read
         * as another format next time). */
        struct vd_file *f;
        const struct vd_format *fmt;
        r = vd_file_open(file, VD_FILE_RDONLY | VD_FILE_NOLOCK, VD_CACHE_WRITEBACK, &f);
        if (r < 0) {
            vd_cli_err_file(file, r);
            return r;
        }
        vd_err_clear();
        r = vd_format_probe(f, &fmt);
        vd_file_close(f);
        if (r == -EINVAL) {
            if (o->unknown_hint)
                vd_cli_err("%s: image format not recognised; %s", file, o->unknown_hint);
            else
                vd_cli_err("%s: image format not recognised; pass %s raw to open it as raw", file,
                           o->format_opt ? o->format_opt : "-f");
            return r;
        }
        if (r < 0) {
            vd_cli_err_file(file, r);
            return r;
        }
        oo.format = fmt->name;
        vd_err_clear();
    }
    r = vd_disk_open(file, &oo, out);
    if (r < 0) {
        vd_cli_err_file(file, r);
        if (r == -EBUSY && o->readonly && !o->force_share)
            fprintf(stderr, "vdisk: use -U (--force-share) to read it anyway\n");
        return r;
    }
    return 0;
}

int vd_cli_opts_arg(struct vd_opts *opts, const char *arg, bool *want_help)
{
    if (!strcmp(arg, "help") || !strcmp(arg, "?")) {
        *want_help = true;
        return 0;
    }
    vd_err_clear();
    if (vd_opts_parse(opts, arg) < 0) {
        vd_cli_err("Invalid option list '%s': %s", arg, vd_errmsg(-EINVAL));
        return -1;
    }
    return 0;
}

int vd_cli_size(const char *s, uint64_t *out, const char *what)
{
    vd_err_clear();
    if (!s || !*s || s[0] == '-') {
        vd_cli_err("Invalid %s '%s': it must be a number of bytes between 0 and 9223372036854775807, "
                   "optionally with a k, M, G, T, P or E suffix", what, s ? s : "");
        return -EINVAL;
    }
    int r = vd_parse_size(s, out);
    if (r < 0 || *out > INT64_MAX) {
        vd_cli_err("Invalid %s '%s': it must be a number of bytes between 0 and 9223372036854775807, "
                   "optionally with a k, M, G, T, P or E suffix", what, s);
        return r < 0 ? r : -ERANGE;
    }
    return 0;
}

int vd_cli_cache(const char *s, enum vd_cache *out)
{
    if (vd_cache_parse(s, out) < 0) {
        vd_cli_err("Invalid cache option: %s (none, writeback, writethrough, directsync or unsafe)", s);
        return -EINVAL;
    }
    return 0;
}

int vd_cli_aio(const char *s, enum vd_aio *out)
{
    if (!strcmp(s, "default")) {
        *out = VD_AIO_DEFAULT;
        return 0;
    }
    if (vd_aio_parse(s, out) < 0) {
        vd_cli_err("Invalid aio option: %s (io_uring, native, threads or default)", s);
        return -EINVAL;
    }
    return 0;
}

int vd_cli_output(const char *s)
{
    if (!strcmp(s, "human"))
        return 0;
    if (!strcmp(s, "json"))
        return 1;
    vd_cli_err("--output must be used with human or json as argument.");
    return -1;
}

void vd_cli_json_print(json_t *v)
{
    char *s = json_dumps(v, JSON_INDENT(4) | JSON_PRESERVE_ORDER | JSON_ENCODE_ANY);
    if (s) {
        puts(s);
        free(s);
    }
}

static void human_value(json_t *v, int indent);

static bool composite(json_t *v)
{
    return json_is_object(v) || json_is_array(v);
}

static void human_key(const char *key, int indent, bool comp)
{
    printf("%*s", indent * 4, "");
    for (const char *p = key; *p; p++)
        putchar(*p == '-' ? ' ' : *p);
    printf(":%c", comp ? '\n' : ' ');
}

static void human_value(json_t *v, int indent)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        const char *k;
        json_t *e;
        json_object_foreach(v, k, e) {
            human_key(k, indent, composite(e));
            human_value(e, indent + 1);
            if (!composite(e))
                putchar('\n');
        }
        break;
    }
    case JSON_ARRAY: {
        size_t i;
        json_t *e;
        json_array_foreach(v, i, e) {
            printf("%*s[%zu]:%c", indent * 4, "", i, composite(e) ? '\n' : ' ');
            human_value(e, indent + 1);
            if (!composite(e))
                putchar('\n');
        }
        break;
    }
    case JSON_STRING:
        fputs(json_string_value(v), stdout);
        break;
    case JSON_INTEGER:
        printf("%" JSON_INTEGER_FORMAT, json_integer_value(v));
        break;
    case JSON_REAL:
        printf("%g", json_real_value(v));
        break;
    case JSON_TRUE:
        fputs("true", stdout);
        break;
    case JSON_FALSE:
        fputs("false", stdout);
        break;
    case JSON_NULL:
        fputs("null", stdout);
        break;
    }
}

void vd_cli_human_dump(json_t *v, int indent)
{
    human_value(v, indent);
}

void vd_cli_progress_init(struct vd_cli_progress *p, bool on)
{
    p->on = on;
    p->last = -1;
    vd_cli_progress(p, 0);
}

void vd_cli_progress(struct vd_cli_progress *p, double percent)
{
    if (!p->on)
        return;
    if (percent > 100)
        percent = 100;
    /* Like qemu-img: a new line per whole percent, and the first and last. */
    if (p->last >= 0 && percent - p->last < 1.0 && percent < 100)
        return;
    if (percent == p->last)
        return;
    p->last = percent;
    printf("    (%3.2f/100%%)\r", percent);
    fflush(stdout);
}

void vd_cli_progress_end(struct vd_cli_progress *p)
{
    if (!p->on)
        return;
    vd_cli_progress(p, 100);
    putchar('\n');
    fflush(stdout);
}

static const struct vd_create_opt_desc generic_opts[] = {
    { "size", "Virtual disk size" },
    { "backing_file", "File name of a base image" },
    { "backing_fmt", "Image format of the base image" },
    { "preallocation", "Preallocation mode (allowed values: off, metadata, falloc, full)" },
    { "provisioning", "Provisioning (allowed values: thin, lazy-zeroed, eager-zeroed)" },
    { NULL, NULL },
};

static bool listed(const struct vd_create_opt_desc *d, const char *name)
{
    for (; d && d->name; d++)
        if (!strcmp(d->name, name))
            return true;
    return false;
}

void vd_cli_print_create_opts(const struct vd_format *f)
{
    printf("Supported %s options:\n", f->name);
    for (const struct vd_create_opt_desc *d = f->create_opts; d && d->name; d++)
        printf("  %-22s - %s\n", d->name, d->help ? d->help : "");
    for (const struct vd_create_opt_desc *d = generic_opts; d->name; d++)
        if (!listed(f->create_opts, d->name))
            printf("  %-22s - %s\n", d->name, d->help);
}

bool vd_cli_create_opt_known(const struct vd_format *f, const char *name)
{
    return listed(f->create_opts, name) || listed(generic_opts, name);
}

char *vd_cli_backing_path(const char *image, const char *backing)
{
    const char *slash = strrchr(image, '/');
    char *out;
    /* A backing name is relative to the image's folder only when both are
     * local paths; protocol names (nbd://, rbd:) stand on their own. */
    if (backing[0] == '/' || !vd_file_name_is_local(backing) || !slash || strstr(image, "://"))
        return strdup(backing);
    if (asprintf(&out, "%.*s/%s", (int)(slash - image), image, backing) < 0)
        return NULL;
    return out;
}

/* vdisk info: qemu-img info's human and JSON output (7.2 keys). */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "cli.h"
#include "vdisk/error.h"

/* The info object of one layer: the generic keys, then the driver's. */
static json_t *layer_info(const char *name, struct vd_layer *l)
{
    json_t *o = json_object();
    json_object_set_new(o, "virtual-size", json_integer((json_int_t)l->size));
    json_object_set_new(o, "filename", json_string(name));
    if (l->cluster_size)
        json_object_set_new(o, "cluster-size", json_integer(l->cluster_size));
    json_object_set_new(o, "format", json_string(l->fmt->name));
    if (l->file)
        json_object_set_new(o, "actual-size", json_integer((json_int_t)vd_file_allocated_bytes(l->file)));
    json_object_set_new(o, "dirty-flag", json_false());
    if (l->backing_name) {
        char *full = vd_cli_backing_path(name, l->backing_name);
        json_object_set_new(o, "backing-filename", json_string(l->backing_name));
        json_object_set_new(o, "full-backing-filename", json_string(full ? full : l->backing_name));
        if (l->backing_fmt)
            json_object_set_new(o, "backing-filename-format", json_string(l->backing_fmt));
        free(full);
    }
    if (l->fmt->info) {
        pthread_mutex_lock(&l->lock);
        int r = l->fmt->info(l, o);
        pthread_mutex_unlock(&l->lock);
        if (r < 0) {
            vd_cli_err_file(name, r);
            json_decref(o);
            return NULL;
        }
    }
    return o;
}

static const char *jstr(json_t *o, const char *k)
{
    return json_string_value(json_object_get(o, k));
}

static void print_snapshots(json_t *snaps)
{
    size_t i;
    json_t *s;
    printf("Snapshot list:\n");
    printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
    json_array_foreach(snaps, i, s) {
        char size[32], date[32] = "", clock[32], icount[32] = "";
        vd_format_size((uint64_t)json_integer_value(json_object_get(s, "vm-state-size")), size, sizeof(size));
        time_t t = (time_t)json_integer_value(json_object_get(s, "date-sec"));
        struct tm tm;
        if (localtime_r(&t, &tm))
            strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
        uint64_t ns = (uint64_t)json_integer_value(json_object_get(s, "vm-clock-sec")) * 1000000000ull +
                      (uint64_t)json_integer_value(json_object_get(s, "vm-clock-nsec"));
        uint64_t ms = ns / 1000000, secs = ms / 1000;
        snprintf(clock, sizeof(clock), "%02u:%02u:%02u.%03u", (unsigned)(secs / 3600),
                 (unsigned)(secs / 60 % 60), (unsigned)(secs % 60), (unsigned)(ms % 1000));
        json_t *ic = json_object_get(s, "icount");
        if (json_is_integer(ic))
            snprintf(icount, sizeof(icount), "%" JSON_INTEGER_FORMAT, json_integer_value(ic));
        const char *id = jstr(s, "id"), *tag = jstr(s, "name");
        printf("%-9s %-16s %8s%20s%13s%11s\n", id ? id : "", tag ? tag : "", size, date, clock, icount);
    }
}

static void print_human(json_t *o)
{
    char buf[64];
    json_t *v;
    printf("image: %s\n", jstr(o, "filename"));
    printf("file format: %s\n", jstr(o, "format"));
    uint64_t vs = (uint64_t)json_integer_value(json_object_get(o, "virtual-size"));
    vd_format_size(vs, buf, sizeof(buf));
    printf("virtual size: %s (%" PRIu64 " bytes)\n", buf, vs);
    v = json_object_get(o, "actual-size");
    if (json_is_integer(v)) {
        vd_format_size((uint64_t)json_integer_value(v), buf, sizeof(buf));
        printf("disk size: %s\n", buf);
    } else {
        printf("disk size: unavailable\n");
    }
    if (jstr(o, "provisioning"))        /* vdisk's own key (vmdk, vhd) */
        printf("provisioning: %s\n", jstr(o, "provisioning"));
    if (json_is_true(json_object_get(o, "encrypted")))
        printf("encrypted: yes\n");
    v = json_object_get(o, "cluster-size");
    if (json_is_integer(v))
        printf("cluster_size: %" JSON_INTEGER_FORMAT "\n", json_integer_value(v));
    if (json_is_true(json_object_get(o, "dirty-flag")))
        printf("dirty flag: yes\n");
    const char *b = jstr(o, "backing-filename"), *fb = jstr(o, "full-backing-filename");
    if (b) {
        if (fb && strcmp(b, fb))
            printf("backing file: %s (actual path: %s)\n", b, fb);
        else
            printf("backing file: %s\n", b);
    }
    if (jstr(o, "backing-filename-format"))
        printf("backing file format: %s\n", jstr(o, "backing-filename-format"));
    v = json_object_get(o, "snapshots");
    if (json_is_array(v) && json_array_size(v))
        print_snapshots(v);
    v = json_object_get(o, "format-specific");
    if (json_is_object(v)) {
        json_t *data = json_object_get(v, "data");
        printf("Format specific information:\n");
        vd_cli_human_dump(data ? data : v, 1);
    }
}

#define MAX_CHAIN 256

static int run(int argc, char **argv)
{
    enum { OPT_OUTPUT = 256, OPT_CHAIN, OPT_IMAGE_OPTS };
    static const struct option lopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "output", required_argument, NULL, OPT_OUTPUT },
        { "backing-chain", no_argument, NULL, OPT_CHAIN },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 },
    };
    const char *fmt = NULL;
    char *next_fmt = NULL;
    int json = 0, c;
    bool chain = false, share = false;

    while ((c = getopt_long(argc, argv, ":f:U", lopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'U': share = true; break;
        case OPT_CHAIN: chain = true; break;
        case OPT_OUTPUT:
            if ((json = vd_cli_output(optarg)) < 0)
                return 1;
            break;
        default:
            return vd_cli_bad_option(argv[0], c, argv);
        }
    }
    if (optind != argc - 1)
        return vd_cli_usage(argv[0], optind >= argc ? "Expecting one image file name" : "Unexpected argument: %s",
                            argv[optind < argc ? optind + 1 : 0]);

    json_t *list = json_array();
    char *name = strdup(argv[optind]);
    char *seen[MAX_CHAIN];
    int nseen = 0, rc = 1;
    char *hint = NULL;

    while (name) {
        /* Each layer is opened on its own (without its backing file), as
         * qemu-img does, so a missing backing file still shows the top. */
        char *real = realpath(name, NULL);
        for (int i = 0; real && i < nseen; i++) {
            if (!strcmp(seen[i], real)) {
                vd_cli_err("Backing file '%s' creates an infinite loop.", name);
                free(real);
                goto out;
            }
        }
        if (nseen == MAX_CHAIN) {
            vd_cli_err("%s: backing chain longer than %d images", name, MAX_CHAIN);
            free(real);
            goto out;
        }
        seen[nseen++] = real ? real : strdup(name);

        struct vd_cli_open oo = { .format = fmt, .readonly = true, .force_share = share, .no_backing = true,
                                  .unknown_hint = hint };
        struct vd_disk *d;
        if (vd_cli_open(name, &oo, &d) < 0)
            goto out;
        free(hint);
        hint = NULL;
        struct vd_layer *l = vd_disk_top(d);
        json_t *o = layer_info(name, l);
        char *next = NULL;
        if (chain && l->backing_name) {
            next = vd_cli_backing_path(name, l->backing_name);
            free(next_fmt);
            next_fmt = l->backing_fmt ? strdup(l->backing_fmt) : NULL;
            fmt = next_fmt;
            /* a backing file whose format is not recorded is probed; a raw
             * one is refused until its format is recorded */
            if (!fmt && asprintf(&hint, "its format is not recorded in %s; if it is raw, record that: "
                                 "vdisk rebase -u -b %s -F raw %s", name, l->backing_name, name) < 0)
                hint = NULL;
        }
        vd_disk_close(d);
        if (!o) {
            free(next);
            goto out;
        }
        json_array_append_new(list, o);
        free(name);
        name = next;
    }
    if (json) {
        vd_cli_json_print(chain ? list : json_array_get(list, 0));
    } else {
        size_t i;
        json_t *o;
        json_array_foreach(list, i, o) {
            if (i)
                putchar('\n');
            print_human(o);
        }
    }
    rc = 0;
out:
    free(name);
    free(next_fmt);
    free(hint);
    for (int i = 0; i < nseen; i++)
        free(seen[i]);
    json_decref(list);
    return rc;
}

static const struct vd_cli_cmd cmd_info = {
    "info",
    "[-f fmt] [--output=human|json] [--backing-chain] [-U] filename",
    "Show an image's format, sizes, backing file and format-specific details.\n"
    "  -f fmt            image format (probed when omitted; a raw image needs -f raw)\n"
    "  --output=FMT      human (default) or json, with qemu-img's keys\n"
    "  --backing-chain   also every image of the backing chain (JSON: an array)\n"
    "  -U, --force-share do not take the image lock (the image may be in use)\n",
    run,
};
VD_CLI_COMMAND(cmd_info)

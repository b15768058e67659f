/* vdisk check: a format's consistency check, with qemu-img check's output
 * and exit codes: 0 clean, 1 the check could not run, 2 corruptions,
 * 3 leaks only, 63 the format has no check. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include "cli.h"
#include "vdisk/error.h"

static void report(void *opaque, const char *msg)
{
    size_t n = strlen(msg);
    (void)opaque;
    fflush(stdout);
    fprintf(stderr, "%s%s", msg, n && msg[n - 1] == '\n' ? "" : "\n");
}

static int do_check(struct vd_layer *l, unsigned fix, struct vd_check *r)
{
    *r = (struct vd_check){ .image_end_offset = -1, .total_clusters = -1, .allocated_clusters = -1,
                            .fragmented_clusters = -1, .compressed_clusters = -1, .report = report };
    vd_err_clear();
    pthread_mutex_lock(&l->lock);
    int ret = l->fmt->check(l, fix, r);
    pthread_mutex_unlock(&l->lock);
    return ret;
}

static void set_pos(json_t *o, const char *k, int64_t v)
{
    if (v > 0)
        json_object_set_new(o, k, json_integer(v));
}

static void print_json(const char *file, const char *fmt, const struct vd_check *r)
{
    json_t *o = json_object();
    set_pos(o, "image-end-offset", r->image_end_offset);
    set_pos(o, "total-clusters", r->total_clusters);
    json_object_set_new(o, "check-errors", json_integer(r->check_errors));
    set_pos(o, "corruptions", r->corruptions);
    set_pos(o, "leaks", r->leaks);
    set_pos(o, "corruptions-fixed", r->corruptions_fixed);
    set_pos(o, "leaks-fixed", r->leaks_fixed);
    set_pos(o, "allocated-clusters", r->allocated_clusters);
    set_pos(o, "fragmented-clusters", r->fragmented_clusters);
    set_pos(o, "compressed-clusters", r->compressed_clusters);
    json_object_set_new(o, "filename", json_string(file));
    json_object_set_new(o, "format", json_string(fmt));
    vd_cli_json_print(o);
    json_decref(o);
}

static void print_human(const struct vd_check *r)
{
    if (r->corruptions == 0 && r->leaks == 0 && r->check_errors == 0) {
        printf("No errors were found on the image.\n");
    } else {
        if (r->corruptions)
            printf("\n%" PRId64 " errors were found on the image.\n"
                   "Data may be corrupted, or further writes to the image may corrupt it.\n", r->corruptions);
        if (r->leaks)
            printf("\n%" PRId64 " leaked clusters were found on the image.\n"
                   "This means waste of disk space, but no harm to data.\n", r->leaks);
        if (r->check_errors)
            printf("\n%" PRId64 " internal errors have occurred during the check.\n", r->check_errors);
    }
    if (r->total_clusters > 0 && r->allocated_clusters > 0) {
        double t = (double)r->total_clusters;
        printf("%" PRId64 "/%" PRId64 " = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
               r->allocated_clusters, r->total_clusters, r->allocated_clusters * 100.0 / t,
               (r->fragmented_clusters > 0 ? r->fragmented_clusters : 0) * 100.0 / (double)r->allocated_clusters,
               (r->compressed_clusters > 0 ? r->compressed_clusters : 0) * 100.0 / (double)r->allocated_clusters);
    }
    if (r->image_end_offset > 0)
        printf("Image end offset: %" PRId64 "\n", r->image_end_offset);
}

static int run(int argc, char **argv)
{
    enum { OPT_OUTPUT = 256 };
    static const struct option lopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "repair", required_argument, NULL, 'r' },
        { "output", required_argument, NULL, OPT_OUTPUT },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 },
    };
    struct vd_cli_open oo = { .readonly = true, .no_backing = true };
    unsigned fix = 0;
    bool quiet = false;
    int json = 0, c;

    while ((c = getopt_long(argc, argv, ":f:r:T:qU", lopts, NULL)) != -1) {
        switch (c) {
        case 'f': oo.format = optarg; break;
        case 'U': oo.force_share = true; break;
        case 'q': quiet = true; break;
        case 'T':
            if (vd_cli_cache(optarg, &oo.cache) < 0)
                return 1;
            break;
        case 'r':
            if (!strcmp(optarg, "leaks")) {
                fix = VD_CHECK_FIX_LEAKS;
            } else if (!strcmp(optarg, "all")) {
                fix = VD_CHECK_FIX_LEAKS | VD_CHECK_FIX_ERRORS;
            } else {
                vd_cli_err("Unknown option value for -r (expecting 'leaks' or 'all'): %s", optarg);
                return 1;
            }
            break;
        case OPT_OUTPUT:
            if ((json = vd_cli_output(optarg)) < 0)
                return 1;
            break;
        default:
            return vd_cli_bad_option(argv[0], c, argv);
        }
    }
    if (optind != argc - 1)
        return vd_cli_usage(argv[0], "Expecting one image file name");
    if (fix && oo.force_share) {
        vd_cli_err("--force-share/-U is not allowed with -r");
        return 1;
    }
    const char *file = argv[optind];
    struct vd_disk *d;
    oo.readonly = fix == 0;
    if (vd_cli_open(file, &oo, &d) < 0)
        return 1;
    struct vd_layer *l = vd_disk_top(d);
    if (!l->fmt->check) {
        vd_cli_err("This image format does not support checks");
        vd_disk_close(d);
        return 63;
    }

    struct vd_check r;
    int ret = do_check(l, fix, &r);
    if (ret == 0 && fix && (r.corruptions_fixed > 0 || r.leaks_fixed > 0)) {
        /* As qemu-img: say what was repaired, then check the result again. */
        int64_t lf = r.leaks_fixed, cf = r.corruptions_fixed;
        if (!json && !quiet)
            printf("The following inconsistencies were found and repaired:\n\n"
                   "    %" PRId64 " leaked clusters\n    %" PRId64 " corruptions\n\n"
                   "Double checking the fixed image now...\n", lf, cf);
        ret = do_check(l, 0, &r);
        r.leaks_fixed = lf;
        r.corruptions_fixed = cf;
    }
    if (ret == -ENOTSUP) {
        vd_cli_err("This image format does not support checks");
        vd_disk_close(d);
        return 63;
    }
    if (ret < 0) {
        vd_cli_err("Check failed: %s", vd_errmsg(ret));
        vd_disk_close(d);
        return 1;
    }
    if (!quiet) {
        if (json)
            print_json(file, l->fmt->name, &r);
        else
            print_human(&r);
    }
    int rc = r.check_errors ? 1 : r.corruptions ? 2 : r.leaks ? 3 : 0;
    if (r.check_errors)
        vd_cli_err("Check failed");
    vd_err_clear();
    ret = vd_disk_close(d);
    if (ret < 0 && rc == 0) {
        vd_cli_err_file(file, ret);
        rc = 1;
    }
    return rc;
}

static const struct vd_cli_cmd cmd_check = {
    "check",
    "[-q] [-f fmt] [-r leaks|all] [--output=human|json] [-T src_cache] [-U] filename",
    "Check an image's metadata for consistency (and repair it with -r).\n"
    "  -r leaks    free leaked clusters;  -r all  also fix corruptions\n"
    "  --output=json  qemu-img check's JSON keys\n"
    "Exit status: 0 no errors, 1 the check could not run, 2 corruptions found,\n"
    "3 leaks only, 63 the format has no checks (raw).\n",
    run,
};
VD_CLI_COMMAND(cmd_check)

/* vdisk df: the images in a folder with their virtual size, the space they
 * take, how they are provisioned, and whether thin disks could outgrow the
 * file system: the sum of what thin disks may still grow against its free
 * space. Files that belong to another image (VMDK extents) count with it. */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include "cli.h"
#include "vdisk/error.h"
#include "formats/vmdk/vmdk.h"

struct img {
    char *name;
    const char *format;
    char *prov;
    uint64_t vsize, alloc;
};

static uint64_t blocks_of(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? (uint64_t)st.st_blocks * 512 : 0;
}

static const char *classify(const char *path, uint64_t vsize)
{
    struct vd_file *f;
    if (vd_file_open(path, VD_FILE_RDONLY | VD_FILE_NOLOCK, VD_CACHE_WRITEBACK, &f) < 0)
        return "thick";
    const char *r = vd_provisioning_of(f, 0, vsize, vsize);
    vd_file_close(f);
    return r;
}

static bool listed(char **names, size_t n, const char *path)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(names[i], path))
            return true;
    return false;
}

static int cmp_img(const void *a, const void *b)
{
    return strcmp(((const struct img *)a)->name, ((const struct img *)b)->name);
}

static int run(int argc, char **argv)
{
    static const struct option lo[] = { { "output", required_argument, NULL, 'O' },
                                        { "help", no_argument, NULL, 'h' }, { NULL, 0, NULL, 0 } };
    int c, json = 0;
    while ((c = getopt_long(argc, argv, ":h", lo, NULL)) != -1) {
        switch (c) {
        case 'O':
            if ((json = vd_cli_output(optarg)) < 0)
                return 1;
            break;
        case 'h':
            printf("usage: vdisk df [--output=human|json] DIR\n");
            return 0;
        default:
            return vd_cli_bad_option("df", c, argv);
        }
    }
    if (optind != argc - 1)
        return vd_cli_usage("df", "expecting one folder");
    const char *dir = argv[optind];
    DIR *d = opendir(dir);
    if (!d) {
        vd_cli_err("%s: %s", dir, strerror(errno));
        return 1;
    }
    struct dirent *de;
    char **files = NULL, **owned = NULL;
    size_t nf = 0, no = 0;
    while ((de = readdir(d))) {
        char *p;
        struct stat st;
        if (de->d_name[0] == '.' || asprintf(&p, "%s/%s", dir, de->d_name) < 0)
            continue;
        if (stat(p, &st) < 0 || !S_ISREG(st.st_mode)) {
            free(p);
            continue;
        }
        char **nfp = realloc(files, (nf + 1) * sizeof(*files));
        if (!nfp) {
            free(p);
            break;
        }
        files = nfp;
        files[nf++] = p;
    }
    closedir(d);

    struct img *imgs = calloc(nf ? nf : 1, sizeof(*imgs));
    size_t ni = 0;
    int ret = 0;
    /* Descriptors first: a VMDK that names extents owns those files. */
    for (int pass = 0; pass < 2; pass++) {
        for (size_t i = 0; i < nf; i++) {
            if (listed(owned, no, files[i]))
                continue;
            struct vd_file *f;
            const struct vd_format *fmt = NULL;
            if (vd_file_open(files[i], VD_FILE_RDONLY | VD_FILE_NOLOCK, VD_CACHE_WRITEBACK, &f) < 0)
                continue;
            vd_err_clear();
            int pr = vd_format_probe(f, &fmt);
            vd_file_close(f);
            const char *dot = strrchr(files[i], '.');
            bool raw_name = dot && (!strcmp(dot, ".raw") || !strcmp(dot, ".img"));
            if (pr < 0 && !raw_name)
                continue;             /* not an image (or an extent: second pass) */
            if (pr < 0)
                fmt = vd_format_find("raw");
            bool text_desc = fmt && !strcmp(fmt->name, "vmdk") && blocks_of(files[i]) <= 8192;
            if (pass == 0 && !text_desc)
                continue;
            struct vd_open_opts oo = { .format = fmt->name, .readonly = true, .nolock = true,
                                       .no_backing = true };
            struct vd_disk *disk;
            vd_err_clear();
            if (vd_disk_open(files[i], &oo, &disk) < 0)
                continue;   /* an extent file of a multi-file VMDK, or damaged */
            struct vd_layer *l = vd_disk_top(disk);
            struct img *im = &imgs[ni++];
            im->name = strdup(files[i]);
            im->format = fmt->name;
            im->vsize = vd_disk_size(disk);
            im->alloc = blocks_of(files[i]);
            json_t *info = json_object();
            if (l->fmt->info)
                l->fmt->info(l, info);
            json_t *ext = json_object_get(json_object_get(json_object_get(info, "format-specific"), "data"), "extents");
            size_t k;
            json_t *e;
            json_array_foreach(ext, k, e) {
                const char *fn = json_string_value(json_object_get(e, "filename"));
                if (!fn || !strcmp(fn, files[i]))
                    continue;
                im->alloc += blocks_of(fn);
                char **nop = realloc(owned, (no + 1) * sizeof(*owned));
                if (nop) {
                    owned = nop;
                    owned[no++] = strdup(fn);
                }
            }
            const char *prov = json_string_value(json_object_get(info, "provisioning"));
            im->prov = strdup(prov ? prov : classify(files[i], im->vsize));
            json_decref(info);
            vd_disk_close(disk);
            if (!owned || !listed(owned, no, files[i])) {
                char **nop = realloc(owned, (no + 1) * sizeof(*owned));
                if (nop) {
                    owned = nop;
                    owned[no++] = strdup(files[i]);
                }
            }
        }
    }
    qsort(imgs, ni, sizeof(*imgs), cmp_img);

    struct statvfs vfs;
    uint64_t avail = statvfs(dir, &vfs) == 0 ? (uint64_t)vfs.f_bavail * vfs.f_frsize : 0;
    uint64_t tv = 0, ta = 0, growth = 0;
    for (size_t i = 0; i < ni; i++) {
        tv += imgs[i].vsize;
        ta += imgs[i].alloc;
        if (!strcmp(imgs[i].prov, "thin") && imgs[i].vsize > imgs[i].alloc)
            growth += imgs[i].vsize - imgs[i].alloc;
    }
    double over = avail ? (double)growth / (double)avail : 0.0;
    if (json) {
        json_t *arr = json_array();
        for (size_t i = 0; i < ni; i++)
            json_array_append_new(arr, json_pack("{s:s, s:s, s:s, s:I, s:I}", "filename", imgs[i].name,
                                                 "format", imgs[i].format, "provisioning", imgs[i].prov,
                                                 "virtual-size", (json_int_t)imgs[i].vsize,
                                                 "allocated", (json_int_t)imgs[i].alloc));
        json_t *o = json_pack("{s:o, s:I, s:I, s:I, s:I, s:f, s:b}", "images", arr,
                              "total-virtual-size", (json_int_t)tv, "total-allocated", (json_int_t)ta,
                              "thin-growth", (json_int_t)growth, "free", (json_int_t)avail,
                              "overcommit", over, "may-outgrow", growth > avail);
        vd_cli_json_print(o);
        json_decref(o);
    } else {
        char a[32], b[32], f[32];
        printf("%-32s %-6s %-13s %12s %12s\n", "IMAGE", "FORMAT", "PROVISIONING", "VIRTUAL", "ALLOCATED");
        for (size_t i = 0; i < ni; i++) {
            const char *base = strrchr(imgs[i].name, '/');
            vd_format_size(imgs[i].vsize, a, sizeof(a));
            vd_format_size(imgs[i].alloc, b, sizeof(b));
            printf("%-32s %-6s %-13s %12s %12s\n", base ? base + 1 : imgs[i].name, imgs[i].format,
                   imgs[i].prov, a, b);
        }
        vd_format_size(tv, a, sizeof(a));
        vd_format_size(ta, b, sizeof(b));
        printf("total: %zu images, virtual %s, allocated %s\n", ni, a, b);
        vd_format_size(growth, a, sizeof(a));
        vd_format_size(avail, f, sizeof(f));
        printf("thin disks may grow by %s; free space %s (overcommit %.2fx)\n", a, f, over);
        if (growth > avail)
            fprintf(stderr, "vdisk: warning: thin disks in %s could outgrow the file system: they may "
                    "grow by %s, only %s is free\n", dir, a, f);
    }
    for (size_t i = 0; i < ni; i++) {
        free(imgs[i].name);
        free(imgs[i].prov);
    }
    free(imgs);
    for (size_t i = 0; i < nf; i++)
        free(files[i]);
    free(files);
    for (size_t i = 0; i < no; i++)
        free(owned[i]);
    free(owned);
    return ret;
}

static const struct vd_cli_cmd cmd = {
    "df", "[--output=human|json] DIR",
    "List the images in a folder: virtual size, allocated space, provisioning,\n"
    "and whether thin disks could outgrow the file system's free space.\n"
    "Formats are recognised by content; a file no format claims is listed as\n"
    "raw only when it is named *.raw or *.img (a listing only: the other\n"
    "commands still need -f raw to open it).",
    run,
};
VD_CLI_COMMAND(cmd)

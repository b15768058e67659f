/* vdisk import: bring a VM's disks in from an OVA (a tar holding an OVF
 * descriptor and streamOptimized VMDKs) or a lone VMDK / VHD, converting
 * them to the target format. The OVF's disk capacities are reported and
 * checked against what the disk images say.
 *
 *   vdisk import [-O fmt] [-o opts] [-c] [-q] FILE.ova OUT
 *
 * The first disk goes to OUT, further ones to OUT with "-2", "-3"… before
 * its extension. Each disk is taken out of the tar into a temporary file
 * next to OUT, then converted with `vdisk convert` (its sparseness kept). */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "cli.h"
#include "vdisk/error.h"

#define MAX_OVF (16u << 20)

struct member {
    char *name;
    uint64_t off, size;
};

struct ovf_file {
    char *id, *href;
};

struct ovf_disk {
    char *id, *file_ref, *format;
    uint64_t capacity;
    int64_t populated;
};

static uint64_t octal(const char *p, size_t n, bool *bad)
{
    /* Base-256 for sizes past 8 GiB (GNU and POSIX extension). */
    if ((unsigned char)p[0] & 0x80) {
        uint64_t v = (unsigned char)p[0] & 0x7f;
        for (size_t i = 1; i < n; i++)
            v = v << 8 | (unsigned char)p[i];
        return v;
    }
    uint64_t v = 0;
    size_t i = 0;
    while (i < n && p[i] == ' ')
        i++;
    for (; i < n && p[i] >= '0' && p[i] <= '7'; i++)
        v = v * 8 + (uint64_t)(p[i] - '0');
    if (i < n && p[i] != ' ' && p[i] != 0)
        *bad = true;
    return v;
}

/* Read the tar's table of members (ustar, GNU long names). */
static int read_tar(const char *path, int fd, struct member **out, size_t *n)
{
    uint8_t h[512];
    uint64_t off = 0;
    char *longname = NULL;
    *out = NULL;
    *n = 0;
    for (;;) {
        ssize_t k = pread(fd, h, sizeof(h), (off_t)off);
        if (k == 0)
            break;
        if (k != (ssize_t)sizeof(h)) {
            vd_cli_err("%s: truncated tar header at offset %" PRIu64, path, off);
            return -EINVAL;
        }
        bool zero = true;
        for (int i = 0; i < 512 && zero; i++)
            zero = h[i] == 0;
        if (zero)
            break;
        unsigned sum = 0;
        for (int i = 0; i < 512; i++)
            sum += (i >= 148 && i < 156) ? ' ' : h[i];
        bool bad = false;
        uint64_t want = octal((char *)h + 148, 8, &bad);
        uint64_t size = octal((char *)h + 124, 12, &bad);
        if (bad || want != sum) {
            vd_cli_err("%s: not a tar archive (bad header checksum at offset %" PRIu64 ")", path, off);
            free(longname);
            return -EINVAL;
        }
        char type = (char)h[156];
        uint64_t data = off + 512;
        if (size > (1ull << 50)) {
            vd_cli_err("%s: implausible member size at offset %" PRIu64, path, off);
            free(longname);
            return -EINVAL;
        }
        if (type == 'L') {                   /* GNU: the next member's long name */
            free(longname);
            longname = calloc(1, size + 1);
            if (!longname || pread(fd, longname, size, (off_t)data) != (ssize_t)size) {
                free(longname);
                return -EIO;
            }
        } else if (type == '0' || type == 0) {
            char name[256 + 2];
            if (longname) {
                snprintf(name, sizeof(name), "%s", longname);
            } else if (!memcmp(h + 257, "ustar", 5) && h[345]) {
                snprintf(name, sizeof(name), "%.155s/%.100s", (char *)h + 345, (char *)h);
            } else {
                snprintf(name, sizeof(name), "%.100s", (char *)h);
            }
            free(longname);
            longname = NULL;
            struct member *m = realloc(*out, (*n + 1) * sizeof(*m));
            if (!m)
                return -ENOMEM;
            *out = m;
            m[*n].name = strdup(name);
            m[*n].off = data;
            m[*n].size = size;
            (*n)++;
        }
        off = data + (size + 511) / 512 * 512;
    }
    free(longname);
    return 0;
}

/* attribute NAME (with any namespace prefix) of the element at p..end */
static char *attr(const char *p, const char *end, const char *name)
{
    size_t nl = strlen(name);
    for (const char *q = p; q && q < end; q++) {
        q = strstr(q, name);
        if (!q || q >= end)
            return NULL;
        bool start_ok = q == p || q[-1] == ':' || isspace((unsigned char)q[-1]);
        const char *v = q + nl;
        while (isspace((unsigned char)*v))
            v++;
        if (!start_ok || *v != '=')
            continue;
        v++;
        while (isspace((unsigned char)*v))
            v++;
        if (*v != '"' && *v != '\'')
            continue;
        char quote = *v++;
        const char *e = strchr(v, quote);
        if (!e || e > end)
            return NULL;
        return strndup(v, (size_t)(e - v));
    }
    return NULL;
}

/* "byte * 2^30", "byte * 1024", "byte", absent */
static uint64_t units(const char *u)
{
    if (!u)
        return 1;
    const char *p = strstr(u, "2^");
    if (p) {
        int e = atoi(p + 2);
        return e >= 0 && e < 63 ? 1ull << e : 0;
    }
    p = strchr(u, '*');
    if (p) {
        uint64_t m = strtoull(p + 1, NULL, 10);
        return m ? m : 0;
    }
    return 1;
}

/* Each <File ...> and <Disk ...> element (any namespace prefix). */
static void parse_ovf(const char *x, struct ovf_file **files, size_t *nf, struct ovf_disk **disks, size_t *nd)
{
    for (const char *p = x; (p = strchr(p, '<')); p++) {
        const char *n = p + 1;
        const char *colon = n;
        while (*colon && (isalnum((unsigned char)*colon) || *colon == '_'))
            colon++;
        if (*colon == ':')
            n = colon + 1;
        bool is_file = !strncmp(n, "File", 4) && isspace((unsigned char)n[4]);
        bool is_disk = !strncmp(n, "Disk", 4) && isspace((unsigned char)n[4]);
        if (!is_file && !is_disk)
            continue;
        const char *end = strchr(p, '>');
        if (!end)
            break;
        if (is_file) {
            struct ovf_file *f = realloc(*files, (*nf + 1) * sizeof(*f));
            if (!f)
                return;
            *files = f;
            f[*nf].id = attr(n, end, "id");
            f[*nf].href = attr(n, end, "href");
            (*nf)++;
        } else {
            struct ovf_disk *d = realloc(*disks, (*nd + 1) * sizeof(*d));
            if (!d)
                return;
            *disks = d;
            char *cap = attr(n, end, "capacity"), *u = attr(n, end, "capacityAllocationUnits");
            char *pop = attr(n, end, "populatedSize");
            d[*nd].id = attr(n, end, "diskId");
            d[*nd].file_ref = attr(n, end, "fileRef");
            d[*nd].format = attr(n, end, "format");
            d[*nd].capacity = cap ? strtoull(cap, NULL, 10) * units(u) : 0;
            d[*nd].populated = pop ? (int64_t)strtoull(pop, NULL, 10) : -1;
            free(cap);
            free(u);
            free(pop);
            (*nd)++;
        }
        p = end;
    }
}

static char *nth_name(const char *out, size_t i)
{
    char *r;
    if (i == 0)
        return strdup(out);
    const char *slash = strrchr(out, '/');
    const char *dot = strrchr(out, '.');
    if (!dot || (slash && dot < slash))
        dot = out + strlen(out);
    if (asprintf(&r, "%.*s-%zu%s", (int)(dot - out), out, i + 1, dot) < 0)
        return NULL;
    return r;
}

/* Convert src into dst with `vdisk convert`. */
static int convert(const char *src, const char *ifmt, const char *dst, const char *fmt, const char *opts,
                   bool compress)
{
    const struct vd_cli_cmd *cv = vd_cli_find("convert");
    if (!cv) {
        vd_cli_err("import: this vdisk has no convert command");
        return 1;
    }
    char *argv[16];
    int argc = 0;
    argv[argc++] = (char *)"convert";
    if (ifmt) {
        argv[argc++] = (char *)"-f";
        argv[argc++] = (char *)ifmt;
    }
    argv[argc++] = (char *)"-O";
    argv[argc++] = (char *)fmt;
    if (opts) {
        argv[argc++] = (char *)"-o";
        argv[argc++] = (char *)opts;
    }
    if (compress)
        argv[argc++] = (char *)"-c";
    argv[argc++] = (char *)src;
    argv[argc++] = (char *)dst;
    argv[argc] = NULL;
    optind = 0;
    int r = cv->run(argc, argv);
    optind = 0;
    return r;
}

static int disk_size(const char *path, const char *ifmt, uint64_t *size)
{
    struct vd_cli_open o = { .format = ifmt, .readonly = true, .force_share = true, .no_backing = true };
    struct vd_disk *d;
    if (vd_cli_open(path, &o, &d) < 0)
        return -1;
    *size = vd_disk_size(d);
    vd_disk_close(d);
    return 0;
}

static int import_ova(const char *ova, const char *ifmt, const char *out, const char *fmt, const char *opts,
                      bool compress, json_t *report)
{
    int fd = open(ova, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        vd_cli_err("%s: %s", ova, strerror(errno));
        return 1;
    }
    struct member *m = NULL;
    size_t nm = 0, nf = 0, nd = 0;
    struct ovf_file *files = NULL;
    struct ovf_disk *disks = NULL;
    char *ovf = NULL;
    int rc = 1;
    if (read_tar(ova, fd, &m, &nm) < 0)
        goto out;
    struct member *om = NULL;
    for (size_t i = 0; i < nm && !om; i++) {
        size_t l = strlen(m[i].name);
        if (l > 4 && !strcasecmp(m[i].name + l - 4, ".ovf"))
            om = &m[i];
    }
    if (!om) {
        vd_cli_err("%s: no OVF descriptor (*.ovf) in the archive", ova);
        goto out;
    }
    if (om->size > MAX_OVF) {
        vd_cli_err("%s: OVF descriptor %s is too large", ova, om->name);
        goto out;
    }
    ovf = calloc(1, om->size + 1);
    if (!ovf || pread(fd, ovf, om->size, (off_t)om->off) != (ssize_t)om->size) {
        vd_cli_err("%s: cannot read %s", ova, om->name);
        goto out;
    }
    parse_ovf(ovf, &files, &nf, &disks, &nd);
    if (nd == 0) {
        vd_cli_err("%s: the OVF descriptor %s lists no disks", ova, om->name);
        goto out;
    }
    json_t *jd = json_array();
    json_object_set_new(report, "disks", jd);
    for (size_t i = 0; i < nd; i++) {
        struct ovf_disk *d = &disks[i];
        const char *href = NULL;
        for (size_t k = 0; k < nf; k++)
            if (d->file_ref && files[k].id && !strcmp(files[k].id, d->file_ref))
                href = files[k].href;
        struct member *dm = NULL;
        for (size_t k = 0; href && k < nm; k++)
            if (!strcmp(m[k].name, href))
                dm = &m[k];
        if (!dm) {
            vd_cli_err("%s: disk %s refers to file %s, which is not in the archive", ova,
                       d->id ? d->id : "?", href ? href : d->file_ref ? d->file_ref : "?");
            goto out;
        }
        char *dst = nth_name(out, i), *tmp = NULL;
        const char *slash = strrchr(dst, '/');
        if (asprintf(&tmp, "%.*s.vdisk-import-XXXXXX", slash ? (int)(slash - dst) + 1 : 0, dst) < 0 ||
            !dst) {
            free(dst);
            free(tmp);
            goto out;
        }
        int tfd = mkstemp(tmp);
        if (tfd < 0) {
            vd_cli_err("%s: cannot create a temporary file: %s", tmp, strerror(errno));
            free(dst);
            free(tmp);
            goto out;
        }
        /* Copy the member out (a streamOptimized VMDK is small). */
        char buf[1 << 16];
        uint64_t left = dm->size, pos = dm->off;
        int ok = 1;
        while (left && ok) {
            size_t n = left < sizeof(buf) ? (size_t)left : sizeof(buf);
            ssize_t k = pread(fd, buf, n, (off_t)pos);
            ok = k == (ssize_t)n && write(tfd, buf, n) == (ssize_t)n;
            left -= n;
            pos += n;
        }
        close(tfd);
        uint64_t vsize = 0;
        int r = 1;
        if (!ok)
            vd_cli_err("%s: cannot extract %s", ova, dm->name);
        else if (disk_size(tmp, ifmt, &vsize) == 0)
            r = convert(tmp, ifmt, dst, fmt, opts, compress);
        unlink(tmp);
        free(tmp);
        if (r == 0 && d->capacity && d->capacity != vsize) {
            vd_cli_err("%s: disk %s: the OVF says %" PRIu64 " bytes, the image holds %" PRIu64, ova,
                       d->id ? d->id : "?", d->capacity, vsize);
            r = 1;
        }
        if (r == 0) {
            json_t *o = json_pack("{s:s, s:s, s:s, s:I, s:I}", "disk-id", d->id ? d->id : "",
                                  "file", dm->name, "output", dst, "capacity", (json_int_t)d->capacity,
                                  "virtual-size", (json_int_t)vsize);
            if (d->populated >= 0)
                json_object_set_new(o, "populated-size", json_integer(d->populated));
            if (d->format)
                json_object_set_new(o, "ovf-format", json_string(d->format));
            json_array_append_new(jd, o);
        }
        free(dst);
        if (r != 0)
            goto out;
    }
    rc = 0;
out:
    close(fd);
    for (size_t i = 0; i < nm; i++)
        free(m[i].name);
    free(m);
    for (size_t i = 0; i < nf; i++) {
        free(files[i].id);
        free(files[i].href);
    }
    free(files);
    for (size_t i = 0; i < nd; i++) {
        free(disks[i].id);
        free(disks[i].file_ref);
        free(disks[i].format);
    }
    free(disks);
    free(ovf);
    return rc;
}

static int run(int argc, char **argv)
{
    static const struct option lo[] = { { "output", required_argument, NULL, 'J' },
                                        { "help", no_argument, NULL, 'h' }, { NULL, 0, NULL, 0 } };
    const char *fmt = "raw", *ifmt = NULL, *opts = NULL;
    bool compress = false, quiet = false;
    int json = 0, c;
    while ((c = getopt_long(argc, argv, ":f:O:o:cqh", lo, NULL)) != -1) {
        switch (c) {
        case 'f': ifmt = optarg; break;
        case 'O': fmt = optarg; break;
        case 'o': opts = optarg; break;
        case 'c': compress = true; break;
        case 'q': quiet = true; break;
        case 'J':
            if ((json = vd_cli_output(optarg)) < 0)
                return 1;
            break;
        case 'h':
            printf("usage: vdisk import [-f fmt] [-O fmt] [-o options] [-c] [-q] [--output=human|json] FILE OUT\n");
            return 0;
        default:
            return vd_cli_bad_option("import", c, argv);
        }
    }
    if (argc - optind != 2)
        return vd_cli_usage("import", "expecting the file to import and the output name");
    char *in = argv[optind], *out = argv[optind + 1];
    if (!vd_format_find(fmt)) {
        vd_cli_err("Unknown file format '%s'", fmt);
        return 1;
    }
    int fd = open(in, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        vd_cli_err("%s: %s", in, strerror(errno));
        return 1;
    }
    uint8_t h[512] = { 0 };
    ssize_t k = pread(fd, h, sizeof(h), 0);
    close(fd);
    /* a tar has "ustar" at 257, or at least a valid header checksum */
    bool tar = k == 512 && !memcmp(h + 257, "ustar", 5);
    size_t l = strlen(in);
    if (!tar && l > 4 && !strcasecmp(in + l - 4, ".ova"))
        tar = true;
    if (!tar) {
        /* A lone disk image: exactly a convert. */
        return convert(in, ifmt, out, fmt, opts, compress);
    }
    json_t *report = json_object();
    int rc = import_ova(in, ifmt, out, fmt, opts, compress, report);
    if (rc == 0) {
        if (json) {
            vd_cli_json_print(report);
        } else if (!quiet) {
            size_t i;
            json_t *d;
            json_array_foreach(json_object_get(report, "disks"), i, d) {
                char cap[32];
                vd_format_size((uint64_t)json_integer_value(json_object_get(d, "capacity")), cap, sizeof(cap));
                printf("disk %s: %s, capacity %s (%" JSON_INTEGER_FORMAT " bytes) -> %s\n",
                       json_string_value(json_object_get(d, "disk-id")),
                       json_string_value(json_object_get(d, "file")), cap,
                       json_integer_value(json_object_get(d, "capacity")),
                       json_string_value(json_object_get(d, "output")));
            }
        }
    }
    json_decref(report);
    return rc;
}

static const struct vd_cli_cmd cmd = {
    "import", "[-f fmt] [-O fmt] [-o options] [-c] [-q] [--output=human|json] FILE.ova|FILE.vmdk|FILE.vhd OUT",
    "Import a VM's disks from an OVA (its OVF descriptor and streamOptimized VMDKs)\n"
    "or a lone VMDK/VHD into a new image of the given format (raw by default).\n"
    "-f gives the format of the disks to import (probed when not given; a raw\n"
    "disk is imported only with -f raw).",
    run,
};
VD_CLI_COMMAND(cmd)

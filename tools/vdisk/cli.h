/* The vdisk command-line tool: each command lives in its own file
 * (cmd_NAME.c) and registers itself from a constructor, so a new command
 * needs no central table:
 *
 *     static int run(int argc, char **argv) { ... }
 *     static const struct vd_cli_cmd cmd = { "name", "usage", "help", run };
 *     VD_CLI_COMMAND(cmd)
 *
 * run() gets argv[0] == the command name (getopt-ready, optind reset) and
 * returns the exit status: 0 ok, 1 error, unless the command documents
 * others (check, compare). Messages go to stderr as "vdisk: FILE: cause". */
#ifndef VDISK_CLI_H
#define VDISK_CLI_H

#include <stdbool.h>
#include <stdint.h>
#include <jansson.h>
#include "vdisk/block.h"

struct vd_cli_cmd {
    const char *name;
    const char *usage;   /* arguments after the name, e.g. "[-f fmt] file" */
    const char *help;    /* what it does; the first line is the summary */
    int (*run)(int argc, char **argv);
};

void vd_cli_register(const struct vd_cli_cmd *c);
const struct vd_cli_cmd *vd_cli_find(const char *name);

#define VD_CLI_COMMAND(var) \
    static void __attribute__((constructor)) var##_register(void) { vd_cli_register(&(var)); }

/* --- shared helpers (util.c) --- */

/* "vdisk: <message>\n" on stderr. */
void vd_cli_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* "vdisk: FILE: <vd_errmsg(err)>" (the file named once even when the
 * library's message already names it). */
void vd_cli_err_file(const char *file, int err);
/* Bad usage: the message, then a hint at `vdisk CMD --help`; returns 1. */
/* msg without a leading "FILE: " (for messages that name the file already). */
const char *vd_cli_strip(const char *msg, const char *file);
int  vd_cli_usage(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* getopt_long (called with a leading ':' in optstring) returned '?' or ':'
 * for argv: report it as bad usage; returns 1. */
int  vd_cli_bad_option(const char *cmd, int c, char **argv);

struct vd_cli_open {
    const char *format;      /* NULL: probe (refused when nothing claims the file) */
    const char *format_opt;  /* the option that gives this file's format, named
                                when probing fails (NULL: "-f") */
    const char *unknown_hint;/* advice printed instead when probing fails */
    bool readonly;
    bool force_share;        /* -U: no image lock */
    bool no_backing;
    bool discard_ignore;     /* discard=ignore (the core's default is unmap) */
    enum vd_cache cache;
    enum vd_aio aio;
};
/* Open and print the error itself ("vdisk: FILE: cause"). */
int  vd_cli_open(const char *file, const struct vd_cli_open *o, struct vd_disk **out);

/* A size argument ("10G", "512"); prints an error naming what on failure. */
int  vd_cli_size(const char *s, uint64_t *out, const char *what);
/* cache=: none, writeback, directsync, writethrough, unsafe. */
int  vd_cli_cache(const char *s, enum vd_cache *out);
int  vd_cli_aio(const char *s, enum vd_aio *out);
/* One -o argument: "help" or "?" sets *want_help, anything else is added to
 * opts. 0, or -1 with the error printed. */
int  vd_cli_opts_arg(struct vd_opts *opts, const char *arg, bool *want_help);
/* --output=human|json: 0 human, 1 json, -1 (error printed) otherwise. */
int  vd_cli_output(const char *s);

/* JSON as qemu-img prints it (4-space indent) plus a newline. */
void vd_cli_json_print(json_t *v);
/* qemu-img's human dump of a dict ("key: value", nested by 4 spaces,
 * dashes in keys shown as spaces). */
void vd_cli_human_dump(json_t *v, int indent);

/* qemu-img's progress line "    (12.34/100%)\r". */
struct vd_cli_progress {
    bool on;
    double last;
};
void vd_cli_progress_init(struct vd_cli_progress *p, bool on);
void vd_cli_progress(struct vd_cli_progress *p, double percent);
void vd_cli_progress_end(struct vd_cli_progress *p);

/* fmt->create_opts listing for "-o help". */
void vd_cli_print_create_opts(const struct vd_format *f);
/* name is one of f's create options or a generic one (size, backing_file,
 * backing_fmt, preallocation, provisioning). */
bool vd_cli_create_opt_known(const struct vd_format *f, const char *name);

/* Name of the backing file as qemu resolves it: relative names are taken
 * relative to the image's directory. Caller frees. */
char *vd_cli_backing_path(const char *image, const char *backing);

#endif

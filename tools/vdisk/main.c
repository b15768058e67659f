/* vdisk: dispatch to the commands that registered themselves (cli.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <getopt.h>
#include "cli.h"

#define MAX_CMDS 64
static const struct vd_cli_cmd *cmds[MAX_CMDS];
static size_t ncmds;

void vd_cli_register(const struct vd_cli_cmd *c)
{
    /* Kept sorted by name for --help. Constructors run before main, single-threaded. */
    if (ncmds == MAX_CMDS) {
        fprintf(stderr, "vdisk: too many commands, %s not registered\n", c->name);
        return;
    }
    size_t i = ncmds++;
    while (i > 0 && strcmp(cmds[i - 1]->name, c->name) > 0) {
        cmds[i] = cmds[i - 1];
        i--;
    }
    cmds[i] = c;
}

const struct vd_cli_cmd *vd_cli_find(const char *name)
{
    for (size_t i = 0; i < ncmds; i++)
        if (!strcmp(cmds[i]->name, name))
            return cmds[i];
    return NULL;
}

static void summary_line(FILE *f, const char *help)
{
    const char *nl = strchr(help, '\n');
    fprintf(f, "%.*s\n", nl ? (int)(nl - help) : (int)strlen(help), help);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: vdisk [--help | --version] COMMAND [options]\n"
               "Create, inspect, convert and check disk images (raw, qcow2, vmdk, vhd).\n\n"
               "Commands:\n");
    for (size_t i = 0; i < ncmds; i++) {
        fprintf(f, "  %-10s ", cmds[i]->name);
        summary_line(f, cmds[i]->help);
    }
    fprintf(f, "\nSupported formats:");
    for (size_t i = 0; vd_format_at(i); i++)
        fprintf(f, " %s", vd_format_at(i)->name);
    fprintf(f, "\n\n'vdisk COMMAND --help' describes a command; see also vdisk(1).\n"
               "Exit status: 0 on success, 1 on error; check and compare have their own (see vdisk(1)).\n");
}

static void cmd_help(const struct vd_cli_cmd *c)
{
    printf("usage: vdisk %s %s\n\n%s", c->name, c->usage, c->help);
    if (c->help[0] && c->help[strlen(c->help) - 1] != '\n')
        putchar('\n');
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 1;
    }
    const char *name = argv[1];
    if (!strcmp(name, "--help") || !strcmp(name, "-h") || !strcmp(name, "help")) {
        if (argc > 2 && vd_cli_find(argv[2])) {
            cmd_help(vd_cli_find(argv[2]));
            return 0;
        }
        usage(stdout);
        return 0;
    }
    if (!strcmp(name, "--version") || !strcmp(name, "-V")) {
        printf("vdisk version " VDISK_VERSION "\n");
        return 0;
    }
    const struct vd_cli_cmd *c = vd_cli_find(name);
    if (!c) {
        fprintf(stderr, "vdisk: Command not found: %s\nTry 'vdisk --help' for more information.\n", name);
        return 1;
    }
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--"))
            break;
        if (!strcmp(argv[i], "--help")) {
            cmd_help(c);
            return 0;
        }
    }
    optind = 1;
    opterr = 0;
    int rc = c->run(argc - 1, argv + 1);
    if (fflush(stdout) != 0 && rc == 0) {
        perror("vdisk: stdout");
        rc = 1;
    }
    return rc;
}

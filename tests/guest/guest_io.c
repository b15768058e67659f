/* Runs inside the test VM (static, as part of the initramfs) against the
 * vhost-user-blk disk, and on the host to describe what the disk must hold
 * afterwards.
 *   guest_io DEV SERIAL [PASSES [RESIZE]]   in the guest: prints GUEST-OK or GUEST-FAIL
 *        PASSES: how often the writers repeat their write/flush/verify pass (1);
 *        RESIZE: then print WAIT-RESIZE and wait (60 s) for the disk to grow to
 *        RESIZE bytes (an online resize on the host), read its new last 4 KiB
 *        (zeros) and print RESIZE-OK
 *   guest_io --expect FILE     on the host: writes the expected image
 * In the guest, two processes pinned to the two CPUs (so both virtqueues
 * carry requests) write a pattern with O_DIRECT over [0, 48M), flush
 * (fsync) and read it back; then one discards [40M, 41M) (BLKDISCARD),
 * zeroes [44M, 45M) (BLKZEROOUT), checks that it reads zeros, writes the
 * pattern over [48M, 56M) in 4 KiB requests and flushes. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdbool.h>
#include <fcntl.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>

#define MiB (1024 * 1024ull)
#define DISK (64 * MiB)
#define SEED 41

static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static void pattern(uint64_t off, uint64_t len, uint8_t *p)
{
    for (uint64_t i = 0; i < len; i += 8) {
        uint64_t w = mix(SEED * 0x100000001b3ull ^ ((off + i) >> 3));
        memcpy(p + i, &w, 8);
    }
}

static int fails;
#define FAIL(...) do { printf("GUEST-FAIL: " __VA_ARGS__); printf("\n"); fflush(stdout); fails++; } while (0)

static void *abuf(size_t n)
{
    void *p;
    return posix_memalign(&p, 4096, n) ? NULL : p;
}

static int write_range(int fd, uint64_t off, uint64_t len, uint64_t bs)
{
    uint8_t *b = abuf(bs);
    for (uint64_t o = off; o < off + len; o += bs) {
        pattern(o, bs, b);
        if (pwrite(fd, b, bs, o) != (ssize_t)bs) { FAIL("write at %llu: %s", (unsigned long long)o, strerror(errno)); return -1; }
    }
    free(b);
    return 0;
}

static int verify_range(int fd, uint64_t off, uint64_t len, uint64_t bs, bool zero)
{
    uint8_t *b = abuf(bs), *w = malloc(bs);
    for (uint64_t o = off; o < off + len; o += bs) {
        if (pread(fd, b, bs, o) != (ssize_t)bs) { FAIL("read at %llu: %s", (unsigned long long)o, strerror(errno)); return -1; }
        if (zero) memset(w, 0, bs); else pattern(o, bs, w);
        if (memcmp(b, w, bs)) { FAIL("data differs in [%llu, +%llu)", (unsigned long long)o, (unsigned long long)bs); return -1; }
    }
    free(b);
    free(w);
    return 0;
}

static int passes = 1;
static uint64_t resize_to;

static int half(const char *dev, int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) < 0) printf("note: cannot pin to cpu %d\n", cpu);
    int fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0) { FAIL("open %s: %s", dev, strerror(errno)); return 1; }
    uint64_t off = cpu * 24 * MiB;
    for (int p = 1; p <= passes; p++) {
        if (write_range(fd, off, 24 * MiB, cpu ? 256 * 1024 : 64 * 1024) < 0) return 1;
        if (fsync(fd) < 0) { FAIL("fsync: %s", strerror(errno)); return 1; }
        if (verify_range(fd, off, 24 * MiB, 128 * 1024, false) < 0) return 1;
        if (passes > 1) { printf("PASS %d cpu %d\n", p, cpu); fflush(stdout); }
    }
    close(fd);
    return fails ? 1 : 0;
}

static int guest(const char *dev, const char *serial)
{
    int fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0) { FAIL("open %s: %s", dev, strerror(errno)); return 1; }
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) < 0 || size != DISK) FAIL("disk size %llu, expected %llu", (unsigned long long)size, DISK);
    char path[256], got[64] = "";
    snprintf(path, sizeof(path), "/sys/block/%s/serial", strrchr(dev, '/') + 1);
    FILE *s = fopen(path, "r");
    if (s) { if (!fgets(got, sizeof(got), s)) got[0] = 0; fclose(s); }
    got[strcspn(got, "\n")] = 0;
    if (strcmp(got, serial)) FAIL("serial '%s', expected '%s'", got, serial);
    pid_t kids[2];
    for (int cpu = 0; cpu < 2; cpu++)
        if ((kids[cpu] = fork()) == 0) _exit(half(dev, cpu));
    for (int cpu = 0; cpu < 2; cpu++) {
        int st;
        waitpid(kids[cpu], &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st)) FAIL("writer on cpu %d failed", cpu);
    }
    uint64_t r[2] = { 40 * MiB, MiB }, z[2] = { 44 * MiB, MiB };
    if (ioctl(fd, BLKDISCARD, r) < 0) FAIL("BLKDISCARD: %s", strerror(errno));
    if (ioctl(fd, BLKZEROOUT, z) < 0) FAIL("BLKZEROOUT: %s", strerror(errno));
    verify_range(fd, 44 * MiB, MiB, 64 * 1024, true);
    verify_range(fd, 41 * MiB, 3 * MiB, 64 * 1024, false);
    write_range(fd, 48 * MiB, 8 * MiB, 4096);
    if (fsync(fd) < 0) FAIL("fsync: %s", strerror(errno));
    verify_range(fd, 48 * MiB, 8 * MiB, 1 * MiB, false);
    if (resize_to) {
        printf("WAIT-RESIZE\n");
        fflush(stdout);
        uint64_t now = 0;
        for (int i = 0; i < 600; i++) {
            if (ioctl(fd, BLKGETSIZE64, &now) == 0 && now == resize_to) break;
            usleep(100000);
        }
        if (now != resize_to) FAIL("size %llu after the resize, expected %llu", (unsigned long long)now, (unsigned long long)resize_to);
        else if (verify_range(fd, resize_to - 4096, 4096, 4096, true) == 0) printf("RESIZE-OK\n");
    }
    close(fd);
    printf(fails ? "GUEST-FAIL (%d)\n" : "GUEST-OK\n", fails);
    fflush(stdout);
    return fails ? 1 : 0;
}

static int expect(const char *file)
{
    int fd = open(file, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    uint8_t *b = malloc(MiB);
    if (fd < 0 || !b) { perror(file); return 1; }
    for (uint64_t o = 0; o < DISK; o += MiB) {
        bool data = o < 48 * MiB + 8 * MiB && o != 40 * MiB && o != 44 * MiB;
        if (data) pattern(o, MiB, b); else memset(b, 0, MiB);
        if (pwrite(fd, b, MiB, o) != (ssize_t)MiB) { perror(file); return 1; }
    }
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && !strcmp(argv[1], "--expect")) return expect(argv[2]);
    if (argc >= 4) passes = atoi(argv[3]) > 0 ? atoi(argv[3]) : 1;
    if (argc >= 5) resize_to = strtoull(argv[4], NULL, 0);
    if (argc >= 3 && argc <= 5) return guest(argv[1], argv[2]);
    fprintf(stderr, "usage: guest_io DEV SERIAL [PASSES [RESIZE]] | guest_io --expect FILE\n");
    return 2;
}

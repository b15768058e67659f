/* vhost-user message framing: a 12-byte header, a payload, and file
 * descriptors in SCM_RIGHTS ancillary data attached to the header. */
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include "vmm-glue/vhost_proto.h"

static int read_full(int fd, void *buf, size_t len)
{
    char *p = buf;
    while (len) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -errno;
        if (n == 0) return -EPIPE;
        p += n; len -= n;
    }
    return 0;
}

void vhu_msg_close_fds(struct vhu_msg *m)
{
    for (int i = 0; i < m->nfds; i++)
        if (m->fds[i] >= 0) close(m->fds[i]);
    m->nfds = 0;
}

int vhu_msg_recv(int sock, struct vhu_msg *m)
{
    char cbuf[CMSG_SPACE(sizeof(int) * VHU_MAX_FDS)];
    struct iovec iov = { &m->hdr, sizeof(m->hdr) };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
                         .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
    ssize_t n;

    m->nfds = 0;
    do n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    if (n == 0) return -EPIPE;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int cnt = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *fds = (int *)CMSG_DATA(c);
        for (int i = 0; i < cnt; i++) {
            if (m->nfds < VHU_MAX_FDS) m->fds[m->nfds++] = fds[i];
            else close(fds[i]);
        }
    }
    int err = 0;
    if (mh.msg_flags & MSG_CTRUNC) err = -EMSGSIZE;
    if (!err && (size_t)n < sizeof(m->hdr))
        err = read_full(sock, (char *)&m->hdr + n, sizeof(m->hdr) - n);
    if (!err && m->hdr.size > VHU_MAX_PAYLOAD) err = -EMSGSIZE;
    if (!err && m->hdr.size) err = read_full(sock, m->raw, m->hdr.size);
    if (err) vhu_msg_close_fds(m);
    return err;
}

int vhu_msg_send(int sock, const struct vhu_msg *m)
{
    char cbuf[CMSG_SPACE(sizeof(int) * VHU_MAX_FDS)];
    struct iovec iov[2] = { { (void *)&m->hdr, sizeof(m->hdr) },
                            { (void *)m->raw, m->hdr.size } };
    struct msghdr mh = { .msg_iov = iov, .msg_iovlen = m->hdr.size ? 2 : 1 };
    if (m->hdr.size > VHU_MAX_PAYLOAD || m->nfds > VHU_MAX_FDS) return -EINVAL;
    if (m->nfds) {
        memset(cbuf, 0, sizeof(cbuf));
        mh.msg_control = cbuf;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * m->nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * m->nfds);
        memcpy(CMSG_DATA(c), m->fds, sizeof(int) * m->nfds);
    }
    size_t total = sizeof(m->hdr) + m->hdr.size, done = 0;
    while (done < total) {
        ssize_t n = sendmsg(sock, &mh, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -errno;
        done += n;
        if (done >= total) break;
        /* partial send: advance the iovecs; fds went with the first byte */
        mh.msg_control = NULL; mh.msg_controllen = 0;
        size_t skip = n;
        while (skip && mh.msg_iovlen) {
            if (skip >= mh.msg_iov->iov_len) { skip -= mh.msg_iov->iov_len; mh.msg_iov++; mh.msg_iovlen--; }
            else { mh.msg_iov->iov_base = (char *)mh.msg_iov->iov_base + skip; mh.msg_iov->iov_len -= skip; skip = 0; }
        }
    }
    return 0;
}

/* Internal to nbd/: a server-side TLS session for one connection. */
#ifndef VDISK_NBD_TLS_H
#define VDISK_NBD_TLS_H
#include <openssl/ssl.h>
#include "nbd/nbd_server.h"
SSL *vd_nbd_tls_ssl(struct vd_nbd_tls_ctx *t, int rfd, int wfd);
#endif

/* TLS for the NBD server with OpenSSL: X.509 (a certificate and key, and
 * optionally a CA to verify client certificates) or pre-shared keys in
 * the psktool file format ("identity:hexkey" per line), as nbdkit and
 * qemu-nbd read them. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include "nbd/nbd_tls.h"
#include "vdisk/error.h"

#define MAX_PSK 64

struct psk {
    char *id;
    unsigned char key[MAX_PSK];
    size_t len;
};

struct vd_nbd_tls_ctx {
    SSL_CTX *ctx;
    struct psk *psks;
    size_t npsk;
};

static int psk_index = -1;

static int tls_err(int err, const char *what, const char *file)
{
    char buf[200] = "";
    unsigned long e = ERR_get_error();
    if (e)
        ERR_error_string_n(e, buf, sizeof buf);
    ERR_clear_error();
    return vd_err(err, "%s%s%s: %s", file ? file : "", file ? ": " : "", what, buf[0] ? buf : "TLS error");
}

static int hexval(int ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

static int load_psk(struct vd_nbd_tls_ctx *t, const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return vd_err(-errno, "%s: %s", path, strerror(errno));
    char line[1024];
    int lineno = 0, r = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        line[strcspn(line, "\r\n")] = 0;
        if (!line[0] || line[0] == '#')
            continue;
        char *colon = strchr(line, ':');
        if (!colon || colon == line) {
            r = vd_err(-EINVAL, "%s:%d: expected identity:hexkey", path, lineno);
            break;
        }
        *colon = 0;
        const char *hex = colon + 1;
        size_t hl = strlen(hex);
        if (hl == 0 || hl % 2 || hl / 2 > MAX_PSK) {
            r = vd_err(-EINVAL, "%s:%d: key must be 1 to %d bytes of hex", path, lineno, MAX_PSK);
            break;
        }
        struct psk *np = realloc(t->psks, (t->npsk + 1) * sizeof *np);
        if (!np) {
            r = -ENOMEM;
            break;
        }
        t->psks = np;
        struct psk *p = &t->psks[t->npsk];
        p->len = hl / 2;
        for (size_t i = 0; i < p->len; i++) {
            int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
            if (hi < 0 || lo < 0) {
                fclose(f);
                return vd_err(-EINVAL, "%s:%d: key is not hexadecimal", path, lineno);
            }
            p->key[i] = (unsigned char)(hi << 4 | lo);
        }
        p->id = strdup(line);
        if (!p->id) {
            r = -ENOMEM;
            break;
        }
        t->npsk++;
    }
    fclose(f);
    if (r == 0 && t->npsk == 0)
        r = vd_err(-EINVAL, "%s: no keys", path);
    return r;
}

static unsigned int psk_cb(SSL *ssl, const char *identity, unsigned char *psk, unsigned int max)
{
    SSL_CTX *ctx = SSL_get_SSL_CTX(ssl);
    struct vd_nbd_tls_ctx *t = SSL_CTX_get_ex_data(ctx, psk_index);
    if (!t || !identity)
        return 0;
    for (size_t i = 0; i < t->npsk; i++)
        if (!strcmp(t->psks[i].id, identity) && t->psks[i].len <= max) {
            memcpy(psk, t->psks[i].key, t->psks[i].len);
            return (unsigned int)t->psks[i].len;
        }
    return 0;
}

int vd_nbd_tls_new(const struct vd_nbd_tls_config *cfg, struct vd_nbd_tls_ctx **out)
{
    struct vd_nbd_tls_ctx *t = calloc(1, sizeof *t);
    int r;
    if (!t)
        return -ENOMEM;
    if (!cfg->psk_file && !(cfg->cert && cfg->key)) {
        free(t);
        return vd_err(-EINVAL, "TLS needs --tls-cert and --tls-key, or --tls-psk-file");
    }
    t->ctx = SSL_CTX_new(TLS_server_method());
    if (!t->ctx) {
        free(t);
        return tls_err(-ENOMEM, "cannot create a TLS context", NULL);
    }
    SSL_CTX_set_min_proto_version(t->ctx, TLS1_2_VERSION);
    SSL_CTX_set_mode(t->ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    /* NBD clients do not resume sessions; tickets only cost a round. */
    SSL_CTX_set_num_tickets(t->ctx, 0);
    if (cfg->cert) {
        if (SSL_CTX_use_certificate_chain_file(t->ctx, cfg->cert) != 1) {
            r = tls_err(-EINVAL, "cannot load the certificate", cfg->cert);
            goto fail;
        }
        if (SSL_CTX_use_PrivateKey_file(t->ctx, cfg->key, SSL_FILETYPE_PEM) != 1) {
            r = tls_err(-EINVAL, "cannot load the private key", cfg->key);
            goto fail;
        }
        if (SSL_CTX_check_private_key(t->ctx) != 1) {
            r = tls_err(-EINVAL, "the key does not match the certificate", cfg->key);
            goto fail;
        }
    }
    if (cfg->ca) {
        if (SSL_CTX_load_verify_locations(t->ctx, cfg->ca, NULL) != 1) {
            r = tls_err(-EINVAL, "cannot load the CA certificates", cfg->ca);
            goto fail;
        }
    }
    if (cfg->verify_peer) {
        if (!cfg->ca) {
            r = vd_err(-EINVAL, "verifying client certificates needs --tls-ca");
            goto fail;
        }
        SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    }
    if (cfg->psk_file) {
        if ((r = load_psk(t, cfg->psk_file)) < 0)
            goto fail;
        if (psk_index < 0)
            psk_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL);
        SSL_CTX_set_ex_data(t->ctx, psk_index, t);
        SSL_CTX_set_psk_server_callback(t->ctx, psk_cb);
        /* TLS 1.2 needs PSK cipher suites listed; TLS 1.3 uses the callback. */
        if (SSL_CTX_set_cipher_list(t->ctx, cfg->cert ? "HIGH:!aNULL:ECDHEPSK:DHEPSK:PSK"
                                                      : "ECDHEPSK:DHEPSK:PSK") != 1) {
            r = tls_err(-EINVAL, "no usable PSK cipher suites", NULL);
            goto fail;
        }
    }
    *out = t;
    return 0;
fail:
    vd_nbd_tls_free(t);
    return r;
}

void vd_nbd_tls_free(struct vd_nbd_tls_ctx *t)
{
    if (!t)
        return;
    SSL_CTX_free(t->ctx);
    for (size_t i = 0; i < t->npsk; i++) {
        OPENSSL_cleanse(t->psks[i].key, sizeof t->psks[i].key);
        free(t->psks[i].id);
    }
    free(t->psks);
    free(t);
}

SSL *vd_nbd_tls_ssl(struct vd_nbd_tls_ctx *t, int rfd, int wfd)
{
    SSL *s = SSL_new(t->ctx);
    if (!s)
        return NULL;
    if (rfd == wfd ? SSL_set_fd(s, rfd) != 1 : (SSL_set_rfd(s, rfd) != 1 || SSL_set_wfd(s, wfd) != 1)) {
        SSL_free(s);
        return NULL;
    }
    return s;
}

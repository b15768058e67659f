/* Option strings and sizes from users and control commands: parse
 * anything without crashing, and what parses reads back consistently. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "vdisk/opts.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);
    if (!s)
        return 0;
    memcpy(s, data, size);
    s[size] = 0;
    struct vd_opts o = {0};
    if (vd_opts_parse(&o, s) == 0) {
        for (size_t i = 0; i < o.n; i++) {
            uint64_t v;
            bool b;
            if (!o.kv[i].key[0])
                abort();                 /* an empty key must be refused */
            vd_opts_get_size(&o, o.kv[i].key, &v);
            vd_opts_get_bool(&o, o.kv[i].key, &b);
            vd_opts_get_u64(&o, o.kv[i].key, &v);
        }
        if (vd_opts_check_unused(&o) != 0)
            abort();                     /* everything was read */
    }
    vd_opts_free(&o);
    uint64_t v;
    if (vd_parse_size(s, &v) == 0) {
        if (v > (uint64_t)INT64_MAX)
            abort();
        char buf[64];
        vd_format_size(v, buf, sizeof(buf));
    }
    free(s);
    return 0;
}

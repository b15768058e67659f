/* Fuzz the VMDK descriptor parser: parse, set a key, serialise, parse again
 * (the rewrite must stay parseable and keep the extents). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "formats/vmdk/vmdk.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct vmdk_desc d, d2;
    if (vd_vmdk_desc_parse("fuzz", (const char *)data, size, &d) < 0)
        return 0;
    (void)vd_vmdk_desc_get(&d, "ddb.adapterType");
    if (vd_vmdk_desc_set(&d, "CID", "0badc0de", false) == 0 &&
        vd_vmdk_desc_set(&d, "ddb.extra", "x", true) == 0) {
        size_t len;
        char *t = vd_vmdk_desc_text(&d, &len);
        if (t) {
            if (vd_vmdk_desc_parse("fuzz2", t, len, &d2) == 0) {
                if (d2.next != d.next || d2.cid != 0x0badc0de)
                    abort();
                vd_vmdk_desc_free(&d2);
            }
            free(t);
        }
    }
    vd_vmdk_desc_free(&d);
    return 0;
}

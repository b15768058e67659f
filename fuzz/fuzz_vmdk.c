/* Fuzz the VMDK driver with image files (fuzz/fuzz_image.h). */
#include "fuzz/fuzz_image.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_image(data, size, "vmdk");
}

// Small parameters of our custom ops, packed into ggml_custom_4d's userdata pointer so nothing needs freeing:
// field i is bits 8i..8i+7 (values 0..255). Internal to csrc/.
#pragma once

#include <stdint.h>

#define OP_FIELD(packed, i) ((int) (((uintptr_t) (packed) >> (8 * (i))) & 0xff))

// Small C helpers compiled into the pyggml_resnet extension next to ggml.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Encodes n floats (n a multiple of 32, no NaN, |x| <= 65504*127) as n/32 q8_0 blocks at dst (34 bytes each:
// the f16 scale max|x|/127, then 32 int8 quants x/scale rounded half away from zero). The bytes are those of
// ggml's quantize_row_q8_0_ref (which calls roundf per value; this loop vectorises) and of the
// pyggml_resnet.dtypes table, which also defines a block too small for 1/scale to be finite: quants 0.
// The caller validates.
void q8_0_encode(const float * x, uint8_t * dst, int64_t n);

#ifdef __cplusplus
}
#endif

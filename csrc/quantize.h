// Quantizing an f32 tensor to the int8 GEMM's u8 once, ahead of the convolutions that read it: the stem's
// input, whose every value a 7x7/2 window would otherwise quantize about 12 times as it is packed.
#pragma once

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

// x: contiguous f32. Returns an I8 tensor of x's shape holding u8 bytes: each value quantized with x_scale and
// x_zero exactly as gemm_int8 (csrc/gemm.h) quantizes the pixels it packs on `path`, one of the GEMM_INT8_*
// paths, so that gemm_int8 reading these bytes gives the result it gives on x. x_scale positive and normal,
// with 1 / x_scale finite; x_zero 0..255; the caller validates every argument and that `path` is supported.
struct ggml_tensor * quantize_u8(struct ggml_context * ctx, struct ggml_tensor * x, float x_scale, int x_zero,
                                 int path);

#ifdef __cplusplus
}
#endif

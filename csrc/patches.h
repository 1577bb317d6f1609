// Convolution patches for channel-fastest activations, so a k x k convolution is one ggml_mul_mat.
#pragma once

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

// x: contiguous f32 [C, W, H, N] (channel fastest). Returns [k_pad, OW, OH, N] of `type` (F32 or BF16, the
// latter rounded as ggml rounds a bf16 matmul's input) where row (ox, oy, n) holds
// the kh x kw window at (ox*stride - pad, oy*stride - pad) as (ky, kx, c) with c fastest, zeros outside the
// image and zeros from kh*kw*C up to k_pad (padding K keeps ggml's matmul on its fast path).
// kh, kw, stride, pad must each be in 0..255; the caller validates every argument.
struct ggml_tensor * gather_patches(struct ggml_context * ctx, struct ggml_tensor * x,
                                    int kh, int kw, int stride, int pad, int64_t k_pad, enum ggml_type type);

#ifdef __cplusplus
}
#endif

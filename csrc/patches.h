// Convolution patches for channel-fastest activations, so a k x k convolution is one ggml_mul_mat.
#pragma once

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

// x: contiguous f32 [C, W, H, N] (channel fastest). Each output row holds one kh x kw window at
// (ox*stride - pad, oy*stride - pad) as (ky, kx, c) with c fastest, zeros outside the image and zeros from
// kh*kw*C/groups up to k_pad (padding K keeps ggml's matmul on its fast path). Output type `type` is F32, or
// BF16 rounded as ggml rounds a bf16 matmul's input.
//   groups == 1: [k_pad, OW, OH, N], row (ox, oy, n) over all C channels.
//   groups  > 1: [k_pad, OW*OH*N, groups, 1], row (ox, oy, n) of group g over channels
//                g*C/groups .. (g+1)*C/groups - 1 only: a grouped convolution is then one ggml_mul_mat
//                of [k_pad, OC/groups, groups] weights, broadcast over the groups.
// kh, kw, stride, pad must each be in 0..255, groups >= 1 must divide C, k_pad >= kh*kw*C/groups, and the
// window must fit the padded input; the caller validates every argument (ggml aborts on bad shapes).
struct ggml_tensor * gather_patches(struct ggml_context * ctx, struct ggml_tensor * x,
                                    int kh, int kw, int stride, int pad, int groups, int64_t k_pad,
                                    enum ggml_type type);

#ifdef __cplusplus
}
#endif

// Winograd F(2x2, 3x3) transforms for channel-fastest activations: a 3x3 stride-1 convolution becomes
// an input transform, 16 independent matrix products (one ggml_mul_mat over 16 batches), and an output
// transform, using 16 multiplications per 2x2 output tile instead of 36.
#pragma once

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

// x: contiguous f32 [C, W, H, N]. Returns f32 [C, T, 16, 1], T = N * ceil(H/2) * ceil(W/2) tiles: for each
// 4x4 input window (zero-padded by one pixel, as a padding-1 convolution sees it) the 16 values B^T d B.
struct ggml_tensor * winograd_input(struct ggml_context * ctx, struct ggml_tensor * x);

// m: contiguous f32 [OC, T, 16, 1], the products of the transformed weights with winograd_input's result
// for an input shaped like `x`. Returns f32 [OC, W, H, N]: each tile's 2x2 outputs A^T m A, cut at the edges,
// then + bias (NULL or contiguous f32 [OC]), + residual (NULL or contiguous f32 [OC, W, H, N]), ReLU if relu.
struct ggml_tensor * winograd_output(struct ggml_context * ctx, struct ggml_tensor * m, struct ggml_tensor * x,
                                     struct ggml_tensor * bias, struct ggml_tensor * residual, int relu);

#ifdef __cplusplus
}
#endif

// Winograd F(2x2, 3x3) transforms for channel-fastest activations: a 3x3 stride-1 convolution becomes
// an input transform, 16 independent matrix products, and an output transform, using 16 multiplications per
// 2x2 output tile instead of 36. The products run either as one ggml_mul_mat over 16 batches of weights
// transformed once at load (the plain layout), or in the packed GEMM (gemm_winograd, csrc/gemm.h), which
// transforms the packed 3x3 weights per cache block with winograd_weights below.
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

// Internal to csrc/ (the packed GEMM), from here on. Where winograd_output_tile writes: an f32 [OC, W, H, N]
// result (channels contiguous, nb1..nb3 its byte strides), and its epilogue's operands: bias NULL or [OC]; res
// NULL or a residual laid out as the result; relu 0 or 1.
struct winograd_out {
    char * data;
    size_t nb1, nb2, nb3;
    int64_t W, H;
    const float * bias;
    const char * res;
    int relu;
};

// Tile t's 2x2 outputs A^T m A (cut at the result's edges) for channels c0..c1-1, then + bias, + residual, ReLU:
// its 16 products' values for channel c0 at in, in + in_step, ... (floats), the next channels after each.
// What winograd_output does for each tile and every channel.
void winograd_output_tile(const struct winograd_out * o, int64_t t, const float * in, int64_t in_step, int64_t c0,
                          int64_t c1);

// The transformed weights U_t = (G g G^T)[a][b] of every product
// t = 4a + b but the four corners (each one tap of g, read in place), for k (input channels) kb..kb+kc-1 of
// the two 16-channel panels of packed f32 3x3 weights at w (gemm.h's layout, K = 9 C, k = (ky, kx, c)):
// product t's at out + t * t_step, its two panels kc * 16 floats apart, each k-major.
void winograd_weights(float * out, int64_t t_step, const float * w, int64_t C, int64_t kb, int64_t kc);

#ifdef __cplusplus
}
#endif

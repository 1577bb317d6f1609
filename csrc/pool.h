// Pooling of channel-fastest activations, so ResNet's stem pool and its global average pool need no
// transposes around ggml's pool_2d and mean (which work on [W, H, C, N] and along rows).
#pragma once

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

// x: contiguous f32 or I8 (u8 bytes, compared unsigned) [C, W, H, N]. Returns [C, OW, OH, N] of x's type, each
// value the largest of its k x k window at (ox*stride - pad, oy*stride - pad), cells outside the image ignored
// and a NaN in the window kept, as PyTorch's max_pool2d does. k, stride, pad in 0..255, 2 pad <= k, and the
// window must fit the padded input; the caller validates every argument (ggml aborts on bad shapes).
struct ggml_tensor * max_pool(struct ggml_context * ctx, struct ggml_tensor * x, int k, int stride, int pad);

// x: contiguous f32 [C, W, H, N]. Returns f32 [C, N]: each channel's mean over the W x H pixels of each image,
// summed in double and rounded once.
struct ggml_tensor * mean_pool(struct ggml_context * ctx, struct ggml_tensor * x);

#ifdef __cplusplus
}
#endif

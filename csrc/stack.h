// Stacking per-image activations into one batch, so a graph can run its early layers image by image (their
// activations stay in cache) and its later ones over the whole batch (their weights are read once).
#pragma once

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

// srcs: n tensors (1 <= n < GGML_MAX_SRC, as ggml_custom_4d requires), each contiguous, of one type, and of the
// same ne[0], ne[1], ne[2]. Returns that type's [ne0, ne1, ne2, sum of their ne[3]]: their bytes one after
// another, in order. The caller validates every argument (ggml aborts on bad shapes).
struct ggml_tensor * stack_batch(struct ggml_context * ctx, struct ggml_tensor ** srcs, int n);

#ifdef __cplusplus
}
#endif

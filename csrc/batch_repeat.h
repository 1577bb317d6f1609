// Small C helpers compiled into the pyggml_resnet extension next to ggml.
#pragma once

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

// Expands the per-channel f32 vector `v` ([C,1,1,1], contiguous) into a new f32 tensor shaped like `like`,
// where dimension `channel_dim` (0..3) of `like` has C entries: element (i0,i1,i2,i3) of the result is
// v[i_channel_dim]. Any batch size and either activation layout ([W,H,C,N] or channel-fastest [C,W,H,N]).
// The caller validates the arguments: ggml aborts the process on bad shapes.
struct ggml_tensor * batch_repeat(struct ggml_context * ctx, struct ggml_tensor * v,
                                  struct ggml_tensor * like, int channel_dim);

#ifdef __cplusplus
}
#endif

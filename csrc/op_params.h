// The one way our custom ops keep their parameters: int32 fields in the result tensor's op_params, after the
// record ggml_custom_4d keeps at its head (its function, task count and userdata: 24 bytes on a 64-bit
// system, checked below), so nothing needs freeing and each op's run function reads them from its dst. Every op passes
// NULL userdata. A field holds any int (flags as 0/1) or a float's bits; an op has at most OP_PARAMS_MAX
// fields. Internal to csrc/, but the limits are exported to Python (pyggml_resnet/_ffi_build.py).
#pragma once

#include <stdint.h>
#include <string.h>

#include "ggml.h"

#define OP_PARAMS_FIRST 6  // int32s kept for ggml_custom_4d's record (24 bytes)
#define OP_PARAMS_MAX (GGML_MAX_OP_PARAMS / 4 - OP_PARAMS_FIRST)
// The largest kernel, stride or padding an op takes: far above any real network's, and small enough that
// sums such as W + 2 pad - k stay exact in an int. Python checks against it (pyggml_resnet/ggml.py).
#define OP_PARAM_INT_MAX (1 << 24)
// ggml_custom_4d's record, as ggml-impl.h declares it (struct ggml_custom_op_params), fits before ours.
struct op_params_custom_head { ggml_custom_op_t fun; int n_tasks; void * userdata; };
_Static_assert(sizeof(struct op_params_custom_head) <= OP_PARAMS_FIRST * sizeof(int32_t), "ggml's record fits");


// Writes fields 0..n-1 of the custom op `t` (n <= OP_PARAMS_MAX); returns t.
static inline struct ggml_tensor * op_params_set(struct ggml_tensor * t, const int32_t * fields, int n) {
    memcpy(t->op_params + OP_PARAMS_FIRST, fields, (size_t) n * sizeof(int32_t));
    return t;
}

static inline int op_param(const struct ggml_tensor * t, int i) {
    return t->op_params[OP_PARAMS_FIRST + i];
}

static inline int32_t op_param_of_f32(float f) {
    int32_t i;
    memcpy(&i, &f, sizeof i);
    return i;
}

static inline float op_param_f32(const struct ggml_tensor * t, int i) {
    float f;
    memcpy(&f, t->op_params + OP_PARAMS_FIRST + i, sizeof f);
    return f;
}

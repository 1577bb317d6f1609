#include "quantize.h"

#include "gemm_tile.h"
#include "op_params.h"
#include "thread_range.h"

enum { QP_PATH, QP_SCALE, QP_ZERO, QP_N_PARAMS };

// Each thread quantizes an equal share of the values with the path's own put_u8, as gemm.c packs pixels.
static void quantize_u8_run(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const struct ggml_tensor * x = dst->src[0];
    const struct patch_quant q = { 1.0f / op_param_f32(dst, QP_SCALE), op_param(dst, QP_ZERO) };
    int64_t first, last;
    thread_range(ggml_nelements(x), ith, nth, &first, &last);
    if (first < last) {
        gemm_kernel_for(op_param(dst, QP_PATH))->put_u8((uint8_t *) dst->data + first, (const float *) x->data + first,
                                                        last - first, &q);
    }
}

struct ggml_tensor * quantize_u8(struct ggml_context * ctx, struct ggml_tensor * x, float x_scale, int x_zero,
                                 int path) {
    const int32_t params[QP_N_PARAMS] = { [QP_PATH] = path, [QP_SCALE] = op_param_of_f32(x_scale), [QP_ZERO] = x_zero };
    struct ggml_tensor * args[1] = { x };
    return op_params_set(ggml_custom_4d(ctx, GGML_TYPE_I8, x->ne[0], x->ne[1], x->ne[2], x->ne[3], args, 1,
                                        quantize_u8_run, GGML_N_TASKS_MAX, NULL), params, QP_N_PARAMS);
}

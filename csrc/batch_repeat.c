#include "batch_repeat.h"

#include <stdint.h>

#include "op_params.h"
#include "thread_range.h"

// Runs on every ggml worker thread: thread `ith` of `nth` fills its share of the rows (ne1*ne2*ne3 of them).
static void batch_repeat_fill(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const int channel_dim = op_param(dst, 0);
    const float * v = (const float *) dst->src[0]->data;
    const int64_t ne0 = dst->ne[0], ne1 = dst->ne[1], ne2 = dst->ne[2];
    const int64_t nrows = ne1 * ne2 * dst->ne[3];
    int64_t first, last;
    thread_range(nrows, ith, nth, &first, &last);

    for (int64_t row = first; row < last; ++row) {
        const int64_t i1 = row % ne1, i2 = (row / ne1) % ne2, i3 = row / (ne1 * ne2);
        float * out = (float *) ((char *) dst->data + i1 * dst->nb[1] + i2 * dst->nb[2] + i3 * dst->nb[3]);
        if (channel_dim == 0) {
            for (int64_t i0 = 0; i0 < ne0; ++i0) out[i0] = v[i0];
        } else {
            const float value = v[channel_dim == 1 ? i1 : channel_dim == 2 ? i2 : i3];
            for (int64_t i0 = 0; i0 < ne0; ++i0) out[i0] = value;
        }
    }
}

struct ggml_tensor * batch_repeat(struct ggml_context * ctx, struct ggml_tensor * v,
                                  struct ggml_tensor * like, int channel_dim) {
    struct ggml_tensor * args[1] = { v };
    const int32_t params[1] = { channel_dim };
    return op_params_set(ggml_custom_4d(ctx, GGML_TYPE_F32, like->ne[0], like->ne[1], like->ne[2], like->ne[3],
                                        args, 1, batch_repeat_fill, GGML_N_TASKS_MAX, NULL), params, 1);
}

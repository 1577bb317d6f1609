#include "pool.h"

#include <stdint.h>
#include <string.h>

#include "isa_clones.h"
#include "op_params.h"
#include "thread_range.h"

ISA_CLONES
static void max_pool_run(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct ggml_tensor * x = dst->src[0];
    (void) userdata;
    const int k = op_param(dst, 0), stride = op_param(dst, 1), pad = op_param(dst, 2);
    const int64_t C = x->ne[0], W = x->ne[1], H = x->ne[2], OW = dst->ne[1], OH = dst->ne[2];
    const int u8 = x->type == GGML_TYPE_I8;  // bytes compared unsigned
    int64_t first, last;
    thread_range(OW * OH * dst->ne[3], ith, nth, &first, &last);

    for (int64_t p = first; p < last; ++p) {
        const int64_t ox = p % OW, oy = (p / OW) % OH, n = p / (OW * OH);
        char * out = (char *) dst->data + p * dst->nb[1];
        int seen = 0;  // 2 pad <= k puts at least one cell of every window inside the image
        for (int ky = 0; ky < k; ++ky) {
            const int64_t iy = oy * stride - pad + ky;
            if (iy < 0 || iy >= H) continue;
            for (int kx = 0; kx < k; ++kx) {
                const int64_t ix = ox * stride - pad + kx;
                if (ix < 0 || ix >= W) continue;
                const char * in = (const char *) x->data + ix * x->nb[1] + iy * x->nb[2] + n * x->nb[3];
                if (!seen++) {
                    memcpy(out, in, C * x->nb[0]);
                } else if (u8) {
                    uint8_t * o = (uint8_t *) out;
                    const uint8_t * v = (const uint8_t *) in;
                    for (int64_t c = 0; c < C; ++c) o[c] = v[c] > o[c] ? v[c] : o[c];
                } else {
                    float * o = (float *) out;
                    const float * v = (const float *) in;
                    // v != v: a NaN wins, as in PyTorch; written branch-free so that it vectorises.
                    for (int64_t c = 0; c < C; ++c) o[c] = (v[c] > o[c] || v[c] != v[c]) ? v[c] : o[c];
                }
            }
        }
    }
}

struct ggml_tensor * max_pool(struct ggml_context * ctx, struct ggml_tensor * x, int k, int stride, int pad) {
    const int64_t OW = (x->ne[1] + 2 * pad - k) / stride + 1, OH = (x->ne[2] + 2 * pad - k) / stride + 1;
    const int32_t params[3] = { k, stride, pad };
    struct ggml_tensor * args[1] = { x };
    return op_params_set(ggml_custom_4d(ctx, x->type, x->ne[0], OW, OH, x->ne[3], args, 1, max_pool_run,
                                        GGML_N_TASKS_MAX, NULL), params, 3);
}

ISA_CLONES
static void mean_pool_run(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const struct ggml_tensor * x = dst->src[0];
    const int64_t C = x->ne[0], P = x->ne[1] * x->ne[2];
    int64_t first, last;  // channels, over all images: every thread has work even at batch 1
    thread_range(C * x->ne[3], ith, nth, &first, &last);
    enum { CH = 64 };
    for (int64_t i = first; i < last;) {
        const int64_t n = i / C, c0 = i % C;
        int64_t nc = C - c0 < CH ? C - c0 : CH;  // channels of image n from c0, in this thread's range
        if (nc > last - i) nc = last - i;
        double sum[CH] = { 0 };
        const float * in = (const float *) ((const char *) x->data + n * x->nb[3]) + c0;
        for (int64_t p = 0; p < P; ++p, in += C) {
            for (int64_t c = 0; c < nc; ++c) sum[c] += in[c];
        }
        float * out = (float *) ((char *) dst->data + n * dst->nb[1]) + c0;
        for (int64_t c = 0; c < nc; ++c) out[c] = (float) (sum[c] / (double) P);
        i += nc;
    }
}

struct ggml_tensor * mean_pool(struct ggml_context * ctx, struct ggml_tensor * x) {
    struct ggml_tensor * args[1] = { x };
    return ggml_custom_4d(ctx, GGML_TYPE_F32, x->ne[0], x->ne[3], 1, 1, args, 1, mean_pool_run, GGML_N_TASKS_MAX,
                          NULL);
}

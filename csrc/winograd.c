#include "winograd.h"

#include <stdint.h>
#include <string.h>

#include "thread_range.h"

static void winograd_input_run(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const struct ggml_tensor * x = dst->src[0];
    const int64_t C = x->ne[0], W = x->ne[1], H = x->ne[2];
    const int64_t tw = (W + 1) / 2, th = (H + 1) / 2, T = dst->ne[1];
    const float * rows[16];
    int64_t first, last;
    thread_range(T, ith, nth, &first, &last);

    for (int64_t t = first; t < last; ++t) {
        const int64_t tx = t % tw, ty = (t / tw) % th, n = t / (tw * th);
        // The 4x4 window starts one pixel up and left of the tile: the convolution's zero padding.
        for (int i = 0; i < 4; ++i) {
            const int64_t iy = 2 * ty - 1 + i;
            for (int j = 0; j < 4; ++j) {
                const int64_t ix = 2 * tx - 1 + j;
                rows[4 * i + j] = (iy < 0 || iy >= H || ix < 0 || ix >= W) ? NULL
                    : (const float *) ((const char *) x->data + ix * x->nb[1] + iy * x->nb[2] + n * x->nb[3]);
            }
        }
        float * out[16];
        for (int k = 0; k < 16; ++k) out[k] = (float *) ((char *) dst->data + t * dst->nb[1] + k * dst->nb[2]);
        for (int64_t c = 0; c < C; ++c) {
            float d[16], u[16];
            for (int k = 0; k < 16; ++k) d[k] = rows[k] ? rows[k][c] : 0.0f;
            // u = B^T d (rows), then out = u B (columns); B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
            for (int j = 0; j < 4; ++j) {
                u[0 + j] = d[0 + j] - d[8 + j];
                u[4 + j] = d[4 + j] + d[8 + j];
                u[8 + j] = d[8 + j] - d[4 + j];
                u[12 + j] = d[4 + j] - d[12 + j];
            }
            for (int i = 0; i < 4; ++i) {
                out[4 * i + 0][c] = u[4 * i + 0] - u[4 * i + 2];
                out[4 * i + 1][c] = u[4 * i + 1] + u[4 * i + 2];
                out[4 * i + 2][c] = u[4 * i + 2] - u[4 * i + 1];
                out[4 * i + 3][c] = u[4 * i + 1] - u[4 * i + 3];
            }
        }
    }
}

static void winograd_output_run(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const struct ggml_tensor * m = dst->src[0];
    const int64_t OC = dst->ne[0], W = dst->ne[1], H = dst->ne[2];
    const int64_t tw = (W + 1) / 2, th = (H + 1) / 2, T = m->ne[1];
    int64_t first, last;
    thread_range(T, ith, nth, &first, &last);

    for (int64_t t = first; t < last; ++t) {
        const int64_t tx = t % tw, ty = (t / tw) % th, n = t / (tw * th);
        const float * in[16];
        for (int k = 0; k < 16; ++k) in[k] = (const float *) ((const char *) m->data + t * m->nb[1] + k * m->nb[2]);
        float * out[4];
        for (int i = 0; i < 2; ++i) {
            for (int j = 0; j < 2; ++j) {
                const int64_t oy = 2 * ty + i, ox = 2 * tx + j;
                out[2 * i + j] = (oy >= H || ox >= W) ? NULL
                    : (float *) ((char *) dst->data + ox * dst->nb[1] + oy * dst->nb[2] + n * dst->nb[3]);
            }
        }
        for (int64_t c = 0; c < OC; ++c) {
            float v[16], u[8];
            for (int k = 0; k < 16; ++k) v[k] = in[k][c];
            // u = A^T v (rows), then y = u A (columns); A^T = [1 1 1 0; 0 1 -1 -1].
            for (int j = 0; j < 4; ++j) {
                u[0 + j] = v[0 + j] + v[4 + j] + v[8 + j];
                u[4 + j] = v[4 + j] - v[8 + j] - v[12 + j];
            }
            const float y[4] = { u[0] + u[1] + u[2], u[1] - u[2] - u[3], u[4] + u[5] + u[6], u[5] - u[6] - u[7] };
            for (int k = 0; k < 4; ++k) {
                if (out[k]) out[k][c] = y[k];
            }
        }
    }
}

struct ggml_tensor * winograd_input(struct ggml_context * ctx, struct ggml_tensor * x) {
    const int64_t tiles = x->ne[3] * ((x->ne[2] + 1) / 2) * ((x->ne[1] + 1) / 2);
    struct ggml_tensor * args[1] = { x };
    return ggml_custom_4d(ctx, GGML_TYPE_F32, x->ne[0], tiles, 16, 1, args, 1, winograd_input_run,
                          GGML_N_TASKS_MAX, NULL);
}

struct ggml_tensor * winograd_output(struct ggml_context * ctx, struct ggml_tensor * m, struct ggml_tensor * x) {
    struct ggml_tensor * args[1] = { m };
    return ggml_custom_4d(ctx, GGML_TYPE_F32, m->ne[0], x->ne[1], x->ne[2], x->ne[3], args, 1,
                          winograd_output_run, GGML_N_TASKS_MAX, NULL);
}

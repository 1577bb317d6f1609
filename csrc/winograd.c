#include "winograd.h"

#include <stdint.h>
#include <string.h>

#include "isa_clones.h"
#include "thread_range.h"

// Channels are taken 16 at a time (the last chunk shorter) through small local arrays, so that each step
// below is a 16-lane loop the compiler vectorises; windows outside the image read a zero chunk.
enum { CH = 16 };
static const float zeros[CH];

// nc <= CH floats; a whole chunk is one constant-size copy the compiler inlines as a vector load and store,
// where a call to memcpy per 64 bytes took a fifth of a transform's time.
static inline void copy_chunk(void * dst, const void * src, int nc) {
    if (nc == CH) {
        memcpy(dst, src, CH * sizeof(float));
    } else {
        memcpy(dst, src, nc * sizeof(float));
    }
}

ISA_CLONES
static void winograd_input_run(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const struct ggml_tensor * x = dst->src[0];
    const int64_t C = x->ne[0], W = x->ne[1], H = x->ne[2];
    const int64_t tw = (W + 1) / 2, th = (H + 1) / 2, T = dst->ne[1];
    int64_t first, last;
    thread_range(T, ith, nth, &first, &last);

    for (int64_t t = first; t < last; ++t) {
        const int64_t tx = t % tw, ty = (t / tw) % th, n = t / (tw * th);
        const float * rows[16];  // NULL outside the image
        // The 4x4 window starts one pixel up and left of the tile: the convolution's zero padding.
        for (int i = 0; i < 4; ++i) {
            const int64_t iy = 2 * ty - 1 + i;
            for (int j = 0; j < 4; ++j) {
                const int64_t ix = 2 * tx - 1 + j;
                rows[4 * i + j] = iy >= 0 && iy < H && ix >= 0 && ix < W
                    ? (const float *) ((const char *) x->data + ix * x->nb[1] + iy * x->nb[2] + n * x->nb[3]) : NULL;
            }
        }
        float * out[16];
        for (int k = 0; k < 16; ++k) out[k] = (float *) ((char *) dst->data + t * dst->nb[1] + k * dst->nb[2]);
        for (int64_t c0 = 0; c0 < C; c0 += CH) {
            const int nc = C - c0 < CH ? (int) (C - c0) : CH;
            float d[16][CH], u[16][CH], v[16][CH];
            for (int k = 0; k < 16; ++k) copy_chunk(d[k], rows[k] ? rows[k] + c0 : zeros, nc);
            // u = B^T d (rows), then v = u B (columns); B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
            for (int j = 0; j < 4; ++j) {
                for (int l = 0; l < CH; ++l) {
                    u[0 + j][l] = d[0 + j][l] - d[8 + j][l];
                    u[4 + j][l] = d[4 + j][l] + d[8 + j][l];
                    u[8 + j][l] = d[8 + j][l] - d[4 + j][l];
                    u[12 + j][l] = d[4 + j][l] - d[12 + j][l];
                }
            }
            for (int i = 0; i < 4; ++i) {
                for (int l = 0; l < CH; ++l) {
                    v[4 * i + 0][l] = u[4 * i + 0][l] - u[4 * i + 2][l];
                    v[4 * i + 1][l] = u[4 * i + 1][l] + u[4 * i + 2][l];
                    v[4 * i + 2][l] = u[4 * i + 2][l] - u[4 * i + 1][l];
                    v[4 * i + 3][l] = u[4 * i + 1][l] - u[4 * i + 3][l];
                }
            }
            for (int k = 0; k < 16; ++k) copy_chunk(out[k] + c0, v[k], nc);
        }
    }
}

// Op parameters in the userdata pointer: whether there is a bias, a residual, and a ReLU.
#define O_BIAS(u) ((int) ((uintptr_t) (u) & 1))
#define O_RES(u) ((int) (((uintptr_t) (u) >> 1) & 1))
#define O_RELU(u) ((int) (((uintptr_t) (u) >> 2) & 1))

ISA_CLONES
static void winograd_output_run(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct ggml_tensor * m = dst->src[0];
    const float * bias = O_BIAS(userdata) ? (const float *) dst->src[1]->data : NULL;
    const struct ggml_tensor * res = O_RES(userdata) ? dst->src[1 + O_BIAS(userdata)] : NULL;
    const int relu = O_RELU(userdata);
    const int64_t OC = dst->ne[0], W = dst->ne[1], H = dst->ne[2];
    const int64_t tw = (W + 1) / 2, th = (H + 1) / 2, T = m->ne[1];
    int64_t first, last;
    thread_range(T, ith, nth, &first, &last);

    for (int64_t t = first; t < last; ++t) {
        const int64_t tx = t % tw, ty = (t / tw) % th, n = t / (tw * th);
        const float * in[16];
        for (int k = 0; k < 16; ++k) in[k] = (const float *) ((const char *) m->data + t * m->nb[1] + k * m->nb[2]);
        size_t offs[4];
        int inside[4];
        for (int i = 0; i < 2; ++i) {
            for (int j = 0; j < 2; ++j) {
                const int64_t oy = 2 * ty + i, ox = 2 * tx + j;
                inside[2 * i + j] = oy < H && ox < W;
                offs[2 * i + j] = ox * dst->nb[1] + oy * dst->nb[2] + n * dst->nb[3];
            }
        }
        for (int64_t c0 = 0; c0 < OC; c0 += CH) {
            const int nc = OC - c0 < CH ? (int) (OC - c0) : CH;
            float v[16][CH], u[8][CH], y[4][CH];
            for (int k = 0; k < 16; ++k) copy_chunk(v[k], in[k] + c0, nc);
            // u = A^T v (rows), then y = u A (columns); A^T = [1 1 1 0; 0 1 -1 -1].
            for (int j = 0; j < 4; ++j) {
                for (int l = 0; l < CH; ++l) {
                    u[0 + j][l] = v[0 + j][l] + v[4 + j][l] + v[8 + j][l];
                    u[4 + j][l] = v[4 + j][l] - v[8 + j][l] - v[12 + j][l];
                }
            }
            for (int i = 0; i < 2; ++i) {
                for (int l = 0; l < CH; ++l) {
                    y[2 * i + 0][l] = u[4 * i + 0][l] + u[4 * i + 1][l] + u[4 * i + 2][l];
                    y[2 * i + 1][l] = u[4 * i + 1][l] - u[4 * i + 2][l] - u[4 * i + 3][l];
                }
            }
            // Then + bias, + residual, ReLU, in that order (the packed GEMM's epilogue).
            for (int k = 0; k < 4; ++k) {
                if (!inside[k]) continue;
                float r[CH] = { 0 };
                if (bias) {
                    copy_chunk(r, bias + c0, nc);
                    for (int l = 0; l < CH; ++l) y[k][l] += r[l];
                }
                if (res) {
                    copy_chunk(r, (const char *) res->data + offs[k] + c0 * sizeof(float), nc);
                    for (int l = 0; l < CH; ++l) y[k][l] += r[l];
                }
                if (relu) {
                    for (int l = 0; l < CH; ++l) y[k][l] = y[k][l] > 0.0f ? y[k][l] : 0.0f;
                }
                copy_chunk((char *) dst->data + offs[k] + c0 * sizeof(float), y[k], nc);
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

struct ggml_tensor * winograd_output(struct ggml_context * ctx, struct ggml_tensor * m, struct ggml_tensor * x,
                                     struct ggml_tensor * bias, struct ggml_tensor * residual, int relu) {
    struct ggml_tensor * args[3] = { m };
    int n_args = 1;
    if (bias) args[n_args++] = bias;
    if (residual) args[n_args++] = residual;
    const uintptr_t packed = (uintptr_t) (bias != NULL) | (uintptr_t) (residual != NULL) << 1 | (uintptr_t) (relu != 0) << 2;
    return ggml_custom_4d(ctx, GGML_TYPE_F32, m->ne[0], x->ne[1], x->ne[2], x->ne[3], args, n_args,
                          winograd_output_run, GGML_N_TASKS_MAX, (void *) packed);
}

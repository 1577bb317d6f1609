#include "winograd.h"

#include <stdint.h>
#include <string.h>

#include "isa_clones.h"
#include "op_params.h"
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

// Op parameters (csrc/op_params.h): whether there is a bias, a residual, and a ReLU.
enum { WO_BIAS, WO_RES, WO_RELU, WO_N_PARAMS };

// y (a chunk of nc <= CH channels of one output pixel) + bias, + residual, ReLU, in that order: the packed
// GEMM's epilogue. bias and res (at the chunk's first channel) may be NULL.
static inline __attribute__((always_inline)) void output_epilogue(float y[CH], const float * bias, const float * res,
                                                                  int relu, int nc) {
    float r[CH] = { 0 };
    if (bias) {
        copy_chunk(r, bias, nc);
        for (int l = 0; l < CH; ++l) y[l] += r[l];
    }
    if (res) {
        copy_chunk(r, res, nc);
        for (int l = 0; l < CH; ++l) y[l] += r[l];
    }
    if (relu) {
        for (int l = 0; l < CH; ++l) y[l] = y[l] > 0.0f ? y[l] : 0.0f;
    }
}

ISA_CLONES
void winograd_output_tile(const struct winograd_out * o, int64_t t, const float * in, int64_t in_step, int64_t c0,
                          int64_t c1) {
    const int64_t tw = (o->W + 1) / 2, th = (o->H + 1) / 2;
    const int64_t tx = t % tw, ty = (t / tw) % th, n = t / (tw * th);
    size_t offs[4];
    int inside[4];
    for (int i = 0; i < 2; ++i) {
        for (int j = 0; j < 2; ++j) {
            const int64_t oy = 2 * ty + i, ox = 2 * tx + j;
            inside[2 * i + j] = oy < o->H && ox < o->W;
            offs[2 * i + j] = ox * o->nb1 + oy * o->nb2 + n * o->nb3;
        }
    }
    for (int64_t c = c0; c < c1; c += CH) {
        const int nc = c1 - c < CH ? (int) (c1 - c) : CH;
        float v[16][CH], u[8][CH], y[4][CH];
        for (int k = 0; k < 16; ++k) copy_chunk(v[k], in + k * in_step + (c - c0), nc);
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
            output_epilogue(y[k], o->bias ? o->bias + c : NULL,
                            o->res ? (const float *) (o->res + offs[k]) + c : NULL, o->relu, nc);
            copy_chunk(o->data + offs[k] + c * sizeof(float), y[k], nc);
        }
    }
}

static void winograd_output_run(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct ggml_tensor * m = dst->src[0];
    (void) userdata;
    const int has_bias = op_param(dst, WO_BIAS);
    const struct ggml_tensor * res = op_param(dst, WO_RES) ? dst->src[1 + has_bias] : NULL;
    const struct winograd_out o = {
        dst->data, dst->nb[1], dst->nb[2], dst->nb[3], dst->ne[1], dst->ne[2],
        has_bias ? (const float *) dst->src[1]->data : NULL, res ? res->data : NULL, op_param(dst, WO_RELU),
    };
    int64_t first, last;
    thread_range(m->ne[1], ith, nth, &first, &last);
    for (int64_t t = first; t < last; ++t) {
        winograd_output_tile(&o, t, (const float *) ((const char *) m->data + t * m->nb[1]),
                             (int64_t) (m->nb[2] / sizeof(float)), 0, dst->ne[0]);
    }
}

// The weight transform (declared in winograd.h). G's rows are (1 0 0), (1 1 1)/2, (1 -1 1)/2, (0 0 1);
// the halving is exact, so each value is rounded by its sums only, in this order whatever the path: each row
// of g combined by G's row b, then those three by G's row a. All 16 are made together, each row combination
// once, from the 9 taps read once. Written over whole 16-lane vectors (one panel's channels, 64 bytes),
// which GCC maps to the widest registers the build targets: element-wise loops were left scalar.
typedef float wino_vec __attribute__((vector_size(64), aligned(4)));

// Row s of G times (v0, v1, v2).
static inline wino_vec wino_comb(int s, wino_vec v0, wino_vec v1, wino_vec v2) {
    switch (s) {
        case 0: return v0;
        case 1: return (v0 + v1 + v2) * 0.5f;
        case 2: return (v0 - v1 + v2) * 0.5f;
        default: return v2;
    }
}

ISA_CLONES
void winograd_weights(float * out, int64_t t_step, const float * w, int64_t C, int64_t kb, int64_t kc) {
    const int64_t K = 9 * C, tap = C * 16;  // tap (ky, kx) of channel c at (3 ky + kx) * tap + c * 16
    for (int j = 0; j < 2; ++j) {
        const float * panel = w + j * 16 * K + kb * 16;
        for (int64_t c = 0; c < kc; ++c) {
            wino_vec g[9], h[3][4];
#pragma GCC unroll 9
            for (int i = 0; i < 9; ++i) g[i] = *(const wino_vec *) (panel + i * tap + c * 16);
#pragma GCC unroll 3
            for (int ky = 0; ky < 3; ++ky) {
#pragma GCC unroll 4
                for (int b = 0; b < 4; ++b) h[ky][b] = wino_comb(b, g[3 * ky], g[3 * ky + 1], g[3 * ky + 2]);
            }
#pragma GCC unroll 16
            for (int t = 0; t < 16; ++t) {
                const int a = t / 4, b = t % 4;
                if (a % 3 == 0 && b % 3 == 0) continue;
                *(wino_vec *) (out + t * t_step + (j * kc + c) * 16) = wino_comb(a, h[0][b], h[1][b], h[2][b]);
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
    const int32_t params[WO_N_PARAMS] = {
        [WO_BIAS] = bias != NULL, [WO_RES] = residual != NULL, [WO_RELU] = relu != 0,
    };
    return op_params_set(ggml_custom_4d(ctx, GGML_TYPE_F32, m->ne[0], x->ne[1], x->ne[2], x->ne[3], args, n_args,
                                        winograd_output_run, GGML_N_TASKS_MAX, NULL), params, WO_N_PARAMS);
}

// One convolution window of a channel-fastest image as a row of values, (ky, kx, c) with c fastest and zeros
// outside the image: what gather_patches (csrc/patches.c) writes whole and what the packed GEMM
// (csrc/gemm.c) copies a cache block at a time into its pixel buffer. Internal to csrc/.
#pragma once

#include <stdint.h>
#include <string.h>

#include "isa_clones.h"

// Rounds as ggml's own f32 -> bf16 conversion does (to nearest even, NaN kept and made quiet), so a bf16
// product sees the values ggml would have made; unlike ggml's scalar loop, this one vectorises.
static inline uint16_t patch_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (u & 0x7fffffff) > 0x7f800000 ? (uint16_t) ((u >> 16) | 64) : (uint16_t) ((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

// Writes n values of the image's type from `in` as the output's type.
typedef void (*patch_put)(void * out, const void * in, int64_t n);

static inline void patch_put_f32(void * out, const void * in, int64_t n) {
    memcpy(out, in, n * sizeof(float));
}

ISA_CLONES
static inline void patch_put_bf16(void * out, const void * in, int64_t n) {  // from f32
    const float * f = in;
    uint16_t * o = out;
    for (int64_t i = 0; i < n; ++i) o[i] = patch_to_bf16(f[i]);
}

static inline void patch_put_bf16_copy(void * out, const void * in, int64_t n) {  // from bf16
    memcpy(out, in, n * sizeof(uint16_t));
}

// The windows of an image [C', W, H, N] (ggml order; f32, or bf16 for the bf16 GEMM) read by a kh x kw
// convolution.
struct patch_geom {
    const char * data;      // the first channel read (a group's first channel for a grouped convolution)
    size_t nb0, nb1, nb2, nb3;  // bytes per value, between pixels, image rows and images
    int64_t C, W, H;        // channels per window tap (C' / groups), image width and height
    int64_t OW, OH;         // output width and height
    int kh, kw, stride, pad;
};

static inline struct patch_geom patch_geom_of(const void * data, const int64_t ne[4], const size_t nb[4], int64_t C,
                                              int kh, int kw, int stride, int pad) {
    const struct patch_geom g = {
        .data = data, .nb0 = nb[0], .nb1 = nb[1], .nb2 = nb[2], .nb3 = nb[3], .C = C, .W = ne[1], .H = ne[2],
        .OW = (ne[1] + 2 * pad - kw) / stride + 1, .OH = (ne[2] + 2 * pad - kh) / stride + 1,
        .kh = kh, .kw = kw, .stride = stride, .pad = pad,
    };
    return g;
}

// Values k0..k1-1 (k1 <= kh*kw*C) of output pixel p's window, written to `out` (es bytes each) by `put`.
// A window row inside the image is one run when pixels are dense (C == C'): one copy per ky, not per tap.
static inline void patch_row(char * out, size_t es, patch_put put, const struct patch_geom * g, int64_t p,
                             int64_t k0, int64_t k1) {
    const int64_t ox = p % g->OW, oy = (p / g->OW) % g->OH, n = p / (g->OW * g->OH);
    const int64_t row = (int64_t) g->kw * g->C;  // values per window row
    const int dense = g->nb1 == (size_t) g->C * g->nb0;
    const char * img = g->data + n * g->nb3;
    for (int64_t k = k0; k < k1;) {
        const int64_t ky = k / row, kx = (k % row) / g->C, c = k % g->C;
        const int64_t iy = oy * g->stride - g->pad + ky, ix = ox * g->stride - g->pad + kx;
        int64_t run;
        const char * src = NULL;
        if (iy < 0 || iy >= g->H) {
            run = row - k % row;  // the rest of this window row
        } else if (ix < 0 || ix >= g->W) {
            run = g->C - c;
        } else {
            const int64_t taps = dense ? (g->kw - kx < g->W - ix ? g->kw - kx : g->W - ix) : 1;
            run = taps * g->C - c;
            src = img + ix * g->nb1 + iy * g->nb2 + c * g->nb0;
        }
        if (run > k1 - k) run = k1 - k;
        if (src) {
            put(out, src, run);
        } else {
            memset(out, 0, run * es);  // +0.0 in f32 and bf16 alike
        }
        out += run * es;
        k += run;
    }
}

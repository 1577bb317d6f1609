// One convolution window of a channel-fastest image as a row of values, (ky, kx, c) with c fastest and zeros
// outside the image: what gather_patches (csrc/patches.c) writes whole and what the packed GEMM
// (csrc/gemm.c) copies a cache block at a time into its pixel buffer (for int8, quantized to u8).
// Internal to csrc/.
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

// How f32 values become the int8 GEMM's u8 (csrc/gemm.h's gemm_int8): q = clamp(rint(x * inv_scale) + zero).
struct patch_quant {
    float inv_scale;
    int zero;
};

// Writes n values of the image's type from `in` as the output's type (q: the u8 output's quantization). NULL
// where they are the output's type already: their bytes are copied (patch_copy).
typedef void (*patch_put)(void * out, const void * in, int64_t n, const struct patch_quant * q);

ISA_CLONES
static inline void patch_put_bf16(void * out, const void * in, int64_t n, const struct patch_quant * q) {  // from f32
    (void) q;
    const float * f = in;
    uint16_t * o = out;
    for (int64_t i = 0; i < n; ++i) o[i] = patch_to_bf16(f[i]);
}

// n bytes from src to out, inline: a window row is short (the stem's 21 u8 or 84 f32 bytes), and a call to
// memcpy for each cost more than the copy. Two overlapping moves of 8, 16 or 32 bytes cover 8..64 bytes.
static inline void patch_copy(char * out, const char * src, size_t n) {
#define PATCH_COPY_2(w) do { char a[w], b[w]; memcpy(a, src, w); memcpy(b, src + n - (w), w); \
                             memcpy(out, a, w); memcpy(out + n - (w), b, w); } while (0)
    if (n > 64 || n < 8) {
        memcpy(out, src, n);
    } else if (n > 32) {
        PATCH_COPY_2(32);
    } else if (n > 16) {
        PATCH_COPY_2(16);
    } else {
        PATCH_COPY_2(8);
    }
#undef PATCH_COPY_2
}

// From f32: x * inv_scale clamped to [-zero, 255 - zero] (max and min as maxps and minps take them, NaN to
// -zero), rounded to nearest even by adding and taking away 1.5 * 2^23 (exact for |v| < 2^22; the clamp
// stands between the product and the sum, so no multiply-add fuses them), then + zero. Branch-free: it
// vectorises.
static inline void patch_put_u8(void * out, const void * in, int64_t n, const struct patch_quant * q) {
    const float * f = in;
    uint8_t * o = out;
    const int zero = q->zero;  // in a local: a byte store could alias q, which would stop vectorisation
    const float inv = q->inv_scale, lo = (float) -zero, hi = (float) (255 - zero), magic = 0x1.8p23f;
    for (int64_t i = 0; i < n; ++i) {
        float v = f[i] * inv;
        v = v > lo ? v : lo;
        v = v < hi ? v : hi;
        o[i] = (uint8_t) ((int32_t) ((v + magic) - magic) + zero);
    }
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

// Where a row of values starts: output pixel (ox, oy) of image n, at value k0 of its window, which is tap
// (ky, kx) and channel c. Made once with divisions (patch_at_of), then stepped a pixel at a time without
// (patch_next): divisions per pixel cost more than copying the stem's window rows.
struct patch_at {
    int64_t ox, oy, n, ky, kx, c;
};

static inline struct patch_at patch_at_of(const struct patch_geom * g, int64_t p, int64_t k0) {
    const int64_t row = (int64_t) g->kw * g->C;  // values per window row
    const struct patch_at at = {
        .ox = p % g->OW, .oy = (p / g->OW) % g->OH, .n = p / (g->OW * g->OH),
        .ky = k0 / row, .kx = (k0 % row) / g->C, .c = k0 % g->C,
    };
    return at;
}

static inline void patch_next(const struct patch_geom * g, struct patch_at * at) {
    if (++at->ox < g->OW) return;
    at->ox = 0;
    if (++at->oy < g->OH) return;
    at->oy = 0;
    ++at->n;
}

// Values k0..k1-1 (k1 <= kh*kw*C) of the window at `at` (its k0), written to `out` (es bytes each) by `put`
// (with q, NULL but for u8; a NULL put copies); outside the image the value 0.0: +0.0 in f32 and bf16, the
// byte q->zero in u8. A window row inside the image is one run when pixels are dense (C == C'): one copy per
// ky, not per tap.
static inline void patch_row(char * out, size_t es, patch_put put, const struct patch_quant * q,
                             const struct patch_geom * g, const struct patch_at * at, int64_t k0, int64_t k1) {
    const int dense = g->nb1 == (size_t) g->C * g->nb0;
    const char * img = g->data + at->n * g->nb3;
    // Each run below ends at a tap's or a window row's end (or at k1), so the position advances without
    // dividing.
    int64_t ky = at->ky, kx = at->kx, c = at->c;
    for (int64_t k = k0; k < k1;) {
        const int64_t iy = at->oy * g->stride - g->pad + ky, ix = at->ox * g->stride - g->pad + kx;
        int64_t run, taps;
        const char * src = NULL;
        if (iy < 0 || iy >= g->H) {
            taps = g->kw - kx;  // the rest of this window row
        } else if (ix < 0 || ix >= g->W) {
            taps = 1;
        } else {
            taps = dense ? (g->kw - kx < g->W - ix ? g->kw - kx : g->W - ix) : 1;
            src = img + ix * g->nb1 + iy * g->nb2 + c * g->nb0;
        }
        run = taps * g->C - c;
        if (run > k1 - k) run = k1 - k;
        if (!src) {
            memset(out, q ? q->zero : 0, run * es);
        } else if (put) {
            put(out, src, run, q);
        } else {
            patch_copy(out, src, run * es);
        }
        out += run * es;
        k += run;
        c = 0;
        kx += taps;
        if (kx == g->kw) {
            kx = 0;
            ++ky;
        }
    }
}

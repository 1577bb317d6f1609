#include "patches.h"

#include <stdint.h>
#include <string.h>

#include "thread_range.h"

// The four small parameters travel packed in the op's userdata pointer, so nothing needs freeing.
#define FIELD(packed, i) ((int) (((uintptr_t) (packed) >> (8 * (i))) & 0xff))

// Rounds as ggml's own f32 -> bf16 conversion does (to nearest even, NaN kept and made quiet), so a bf16
// matmul sees the values ggml would have made; unlike ggml's scalar loop, this one vectorises.
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (u & 0x7fffffff) > 0x7f800000 ? (uint16_t) ((u >> 16) | 64) : (uint16_t) ((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static void put_f32(void * out, const float * in, int64_t n) {
    memcpy(out, in, n * sizeof(float));
}

static void put_bf16(void * out, const float * in, int64_t n) {
    uint16_t * o = out;
    for (int64_t i = 0; i < n; ++i) o[i] = to_bf16(in[i]);
}

static void gather_patches_run(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct ggml_tensor * x = dst->src[0];
    const int kh = FIELD(userdata, 0), kw = FIELD(userdata, 1), stride = FIELD(userdata, 2), pad = FIELD(userdata, 3);
    const int64_t W = x->ne[1], H = x->ne[2], N = x->ne[3];
    const int64_t OW = (W + 2 * pad - kw) / stride + 1, OH = (H + 2 * pad - kh) / stride + 1;
    const int64_t P = OW * OH * N;  // patches per group
    // Both layouts hold one row per (group, patch), groups slowest: the row count gives the group count.
    const int64_t groups = ggml_nrows(dst) / P;
    const int64_t Cg = x->ne[0] / groups;  // channels per group
    const int64_t K = (int64_t) kh * kw * Cg, k_pad = dst->ne[0];
    const size_t esize = ggml_type_size(dst->type);
    void (*put)(void *, const float *, int64_t) = dst->type == GGML_TYPE_BF16 ? put_bf16 : put_f32;
    int64_t first, last;
    thread_range(P, ith, nth, &first, &last);

    // A block of patches at a time, all groups of it before the next: the block's input windows stay in
    // cache while each group's rows are written in sequence. Group by group over all patches would read the
    // whole input once per group (64 times for ResNeXt-101 64x4d); all groups of one patch at a time would
    // write rows a group apart, which alias in the cache when that distance is a multiple of 4 KiB.
    enum { BLOCK = 64 };
    for (int64_t p0 = first; p0 < last; p0 += BLOCK) {
        const int64_t p1 = p0 + BLOCK < last ? p0 + BLOCK : last;
        for (int64_t g = 0; g < groups; ++g) {
            for (int64_t p = p0; p < p1; ++p) {
                const int64_t ox = p % OW, oy = (p / OW) % OH, n = p / (OW * OH);
                const char * src = (const char *) x->data + n * x->nb[3] + g * Cg * x->nb[0];
                char * out = (char *) dst->data + (g * P + p) * dst->nb[1];
                for (int ky = 0; ky < kh; ++ky) {
                    const int64_t iy = oy * stride - pad + ky;
                    for (int kx = 0; kx < kw; ++kx, out += Cg * esize) {
                        const int64_t ix = ox * stride - pad + kx;
                        if (iy < 0 || iy >= H || ix < 0 || ix >= W) {
                            memset(out, 0, Cg * esize);  // +0.0 in f32 and bf16 alike
                        } else {
                            put(out, (const float *) (src + ix * x->nb[1] + iy * x->nb[2]), Cg);
                        }
                    }
                }
                if (k_pad > K) memset(out, 0, (k_pad - K) * esize);
            }
        }
    }
}

struct ggml_tensor * gather_patches(struct ggml_context * ctx, struct ggml_tensor * x,
                                    int kh, int kw, int stride, int pad, int groups, int64_t k_pad,
                                    enum ggml_type type) {
    const int64_t OW = (x->ne[1] + 2 * pad - kw) / stride + 1;
    const int64_t OH = (x->ne[2] + 2 * pad - kh) / stride + 1;
    const uintptr_t packed = (uintptr_t) kh | (uintptr_t) kw << 8 | (uintptr_t) stride << 16 | (uintptr_t) pad << 24;
    struct ggml_tensor * args[1] = { x };
    if (groups == 1) {
        return ggml_custom_4d(ctx, type, k_pad, OW, OH, x->ne[3], args, 1, gather_patches_run,
                              GGML_N_TASKS_MAX, (void *) packed);
    }
    return ggml_custom_4d(ctx, type, k_pad, OW * OH * x->ne[3], groups, 1, args, 1, gather_patches_run,
                          GGML_N_TASKS_MAX, (void *) packed);
}

// The int8 path of csrc/gemm.h in portable C, for CPUs without AVX2 and as the other int8 paths' reference:
// the same tile body (csrc/gemm_tile.inc) over one-lane "vectors", 32 channels x 4 pixels; 32 x 1 for the
// last pixels. Its integer sums are exact and its epilogue makes the same float operations in the same order
// as the vector paths' (compiled without contracting a multiply and an add into one rounding; its fused
// ones are fmaf, correctly rounded as their vfmadd), so its results are theirs, bit for bit.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "gemm_tile.h"

#define V float
#define VL 1
#define MV 32
#define V_ZERO() 0.0f
#define V_LOAD(p) (*(p))
#define V_STORE(p, v) (*(p) = (v))
#define V_ADD(a, b) ((a) + (b))
#define V_MAX(a, b) ((a) > (b) ? (a) : (b))  // as maxps: b where a is NaN
#define M int
#define V_MASK(n) (n)
#define V_LOADM(p, m) ((void) (m), V_LOAD(p))
#define V_STOREM(p, m, v) ((void) (m), V_STORE(p, v))

#define WT uint8_t
#define WV const uint8_t *  // a channel's 4 weights (s8) of the group
#define WV_LOAD(p) (p)
#define KSTEP 4
#define KS GEMM_KS_INT8
#define XGROUP GEMM_INT8_XGROUP  // csrc/gemm.c's direct windows need pairs
#define ACC int32_t
#define ACC_ZERO() 0
static inline int32_t dp(const uint8_t * w, const uint8_t * x, int32_t c) {
    return c + x[0] * (int8_t) w[0] + x[1] * (int8_t) w[1] + x[2] * (int8_t) w[2] + x[3] * (int8_t) w[3];
}
#define V_FMA_BCAST(a, p, c) dp(a, p, c)
// An int32 partial sum kept in C's float memory as its bits, as the vector paths' casts do.
static inline float bits_f(int32_t i) {
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}
static inline int32_t bits_i(float f) {
    int32_t i;
    memcpy(&i, &f, sizeof i);
    return i;
}
#define ACC_BITS(a) bits_f(a)
#define ACC_SUM(c, a) bits_f(bits_i(c) + (a))
#define ACC_FINISH(v, b, j, bias) fmaf((float) (bits_i(v) - ((b)->corr ? (b)->corr[j] : 0)), (b)->scale[j], bias)
#define V_FMA_S(a, s, c) fmaf(a, s, c)

#define PUT_U8 patch_put_u8

#define NR 4
#define TILE_FN tile_int8_scalar
#include "gemm_tile.inc"
#undef NR
#undef TILE_FN

#define NR 1
#define TILE_FN tile_int8_scalar_narrow
#include "gemm_tile.inc"

const struct gemm_kernel gemm_kernel_int8_scalar = {
    MV * VL, 4, 1, tile_int8_scalar, tile_int8_scalar_narrow, NULL, 1, patch_put_u8,
};

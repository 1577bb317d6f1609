// The int8 AVX512-VNNI path of csrc/gemm.h: u8 pixels x s8 weights, int32 sums; 32 channels (two panels, one zmm
// each) x 12 pixels, 24 accumulators; 32 x 4 for the last pixels, 32 x 13 where one pixel would be left over,
// 32 x 14 where N is a multiple of 14, and 32 x 7 for rows of 7 pixels. One vpdpbusd takes a group of 4 k: each
// lane adds its channel's 4 products with the pixel's 4 bytes (broadcast to every lane) to its int32 sum, exactly.
// Compiled with -mavx512f -mavx512bw -mavx512vnni; only called where the CPU has all three (gemm.c checks at run
// time).
#include <stdint.h>
#include <string.h>

#include "gemm_tile.h"
#include "gemm_zmm.h"
#include "patch_row.h"

#define WT uint8_t
#define WV __m512i
#define WV_LOAD(p) _mm512_loadu_si512(p)
#define KSTEP 4
#define KS GEMM_KS_INT8
#define XGROUP GEMM_INT8_XGROUP  // csrc/gemm.c's direct windows need pairs
#define ACC __m512i
#define ACC_ZERO() _mm512_setzero_si512()
// vpdpbusd's unsigned operand is a register: the pixel's 4 bytes are broadcast into one (a load-port
// vpbroadcastd, shared by the tile's two weight vectors).
static inline __m512i dp_bcast(__m512i w, const uint8_t * p, __m512i c) {
    int32_t x;
    memcpy(&x, p, sizeof x);
    return _mm512_dpbusd_epi32(c, _mm512_set1_epi32(x), w);
}
#define V_FMA_BCAST(a, p, c) dp_bcast(a, p, c)
#define ACC_BITS(a) _mm512_castsi512_ps(a)
#define ACC_SUM(c, a) _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(c), a))
// The sums less zx * colsum[m] (where zx is not 0: corr), as floats times their scales, plus bias.
static inline __m512 acc_finish(__m512 v, const struct gemm_block * b, int j, __m512 bias) {
    __m512i s = _mm512_castps_si512(v);
    if (b->corr) s = _mm512_sub_epi32(s, _mm512_load_si512(b->corr + j * VL));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_load_ps(b->scale + j * VL), bias);
}
#define ACC_FINISH acc_finish
#define V_FMA_S(a, s, c) _mm512_fmadd_ps(a, _mm512_set1_ps(s), c)

// patch_put_u8's arithmetic on a vector, as int32 in 0..255: max and min as patch_put_u8's comparisons take them,
// and vcvtps2dq rounds to nearest even, as its 1.5 * 2^23 does. Without `low` the lower clamp is left to the
// caller's packs, whose saturation clamps at 0 alike: values below 0 (a NaN, which min_ps then passes on,
// becomes INT_MIN) are bytes 0 there too.
static inline __m512i quant_u8(__m512 v, const struct patch_quant * q, int low) {
    v = _mm512_mul_ps(v, _mm512_set1_ps(q->inv_scale));
    if (low) v = _mm512_max_ps(v, _mm512_set1_ps((float) -q->zero));
    v = _mm512_min_ps(_mm512_set1_ps((float) (255 - q->zero)), v);
    return _mm512_add_epi32(_mm512_cvtps_epi32(v), _mm512_set1_epi32(q->zero));
}

// The first n (1..16) lanes of v, quantized: a u8 result is written straight from the sums' registers.
static inline void v_put_u8(uint8_t * out, int n, __m512 v, const struct patch_quant * q) {
    const __mmask16 m = n >= 16 ? 0xffff : (__mmask16) ((1u << n) - 1);
    _mm512_mask_cvtepi32_storeu_epi8(out, m, quant_u8(v, q, 1));
}
#define V_PUT_U8 v_put_u8

// The packs work per 128-bit lane: lane l of packus_epi16(packus_epi32(a, b), packus_epi32(c, d)) holds 4 values
// of each of a, b, c, d, in that order; these dwords put them back in order. The packs are exact: the values
// are 0..255 already.
#define PACKED_ORDER _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15)

// Two whole vectors (a pixel's 32 channels) in one 32-byte store.
static inline void v_put_u8_2(uint8_t * out, __m512 v0, __m512 v1, const struct patch_quant * q) {
    const __m512i ab = _mm512_packus_epi32(quant_u8(v0, q, 0), quant_u8(v1, q, 0));
    const __m512i packed = _mm512_permutexvar_epi32(PACKED_ORDER, _mm512_packus_epi16(ab, ab));
    _mm256_storeu_si256((__m256i *) out, _mm512_castsi512_si256(packed));
}
#define V_PUT_U8_2 v_put_u8_2

// 16 bytes of a u8 residual less its zero point as floats: exact in int32 and as a float.
static inline __m512 res_u8(const uint8_t * p, const struct gemm_res_quant * q) {
    const __m512i r = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *) p));
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(r, _mm512_set1_epi32(q->zero)));
}
#define V_RES_U8 res_u8

// Pixels 64 at a time, narrowed with two saturating packs and one 64-byte store, twice as fast as four
// narrowing stores (Zen 4: 5.5 vs 10.8 cycles per 16); then 16 at a time, the last ones masked (the compiler's
// loop would leave short runs, such as the stem's 21 values per window row, to scalar code).
static void put_u8(void * out, const void * in, int64_t n, const struct patch_quant * q) {
    const float * x = in;
    uint8_t * y = out;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        const __m512i a = quant_u8(_mm512_loadu_ps(x + i), q, 1), b = quant_u8(_mm512_loadu_ps(x + i + 16), q, 1);
        const __m512i c = quant_u8(_mm512_loadu_ps(x + i + 32), q, 1), d = quant_u8(_mm512_loadu_ps(x + i + 48), q, 1);
        const __m512i packed = _mm512_packus_epi16(_mm512_packus_epi32(a, b), _mm512_packus_epi32(c, d));
        _mm512_storeu_si512(y + i, _mm512_permutexvar_epi32(PACKED_ORDER, packed));
    }
    for (; i < n; i += 16) {
        const int lanes = n - i >= 16 ? 16 : (int) (n - i);
        v_put_u8(y + i, lanes, _mm512_maskz_loadu_ps((__mmask16) ((1u << lanes) - 1), x + i), q);
    }
}

#define NR 12
#define TILE_FN tile_int8_avx512vnni
#include "gemm_tile.inc"
#undef NR
#undef TILE_FN

#define NR 4
#define TILE_FN tile_int8_avx512vnni_narrow
#include "gemm_tile.inc"
#undef NR
#undef TILE_FN

// 26 accumulators, the two weight vectors and the pixel's broadcast: 29 of the 32 zmm registers.
#define NR 13
#define TILE_FN tile_int8_avx512vnni_wide
#include "gemm_tile.inc"
#undef NR
#undef TILE_FN

// 14 accumulators: a row of 7 pixels (gemm_kernel's nr_row).
#define NR 7
#define TILE_FN tile_int8_avx512vnni_row
#include "gemm_tile.inc"
#undef NR
#undef TILE_FN

// 28 accumulators: 31 registers.
#define NR 14
#define TILE_FN tile_int8_avx512vnni_tall
#include "gemm_tile.inc"

const struct gemm_kernel gemm_kernel_int8_avx512vnni = {
    MV * VL, 12, 4, tile_int8_avx512vnni, tile_int8_avx512vnni_narrow, tile_int8_avx512vnni_wide, 1, put_u8,
    14, tile_int8_avx512vnni_tall, 7, tile_int8_avx512vnni_row,
};

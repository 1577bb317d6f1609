// The int8 epilogue of csrc/gemm_tile.inc on ymm registers, shared by the 256-bit int8 paths
// (gemm_int8_avx2.c, gemm_int8_avxvnni.c), included after gemm_ymm.h once ACC_BITS gives a vector's int32 sums:
// the sums as floats times their scales plus bias, a u8 residual's bytes as floats, and u8 results quantized in
// registers as patch_put_u8 quantizes (which, vectorised by the compiler for AVX2, packs the pixels).
#pragma once

#include <stdint.h>
#include <string.h>

#include "gemm_tile.h"
#include "gemm_ymm.h"

// The sums less zx * colsum[m] (where zx is not 0: corr), as floats times their scales, plus bias.
static inline __m256 acc_finish(__m256 v, const struct gemm_block * b, int j, __m256 bias) {
    __m256i s = _mm256_castps_si256(v);
    if (b->corr) s = _mm256_sub_epi32(s, _mm256_load_si256((const __m256i *) (b->corr + j * VL)));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_load_ps(b->scale + j * VL), bias);
}
#define ACC_FINISH acc_finish
#define V_FMA_S(a, s, c) _mm256_fmadd_ps(a, _mm256_set1_ps(s), c)

#define PUT_U8 patch_put_u8

// patch_put_u8's arithmetic on a vector, as int32 in 0..255, as the AVX512-VNNI path's quant_u8 takes it (max and
// min in patch_put_u8's order, vcvtps2dq rounding to nearest even); without `low` the lower clamp is left to
// the caller's packs, whose saturation clamps at 0 alike.
static inline __m256i quant_u8(__m256 v, const struct patch_quant * q, int low) {
    v = _mm256_mul_ps(v, _mm256_set1_ps(q->inv_scale));
    if (low) v = _mm256_max_ps(v, _mm256_set1_ps((float) -q->zero));
    v = _mm256_min_ps(_mm256_set1_ps((float) (255 - q->zero)), v);
    return _mm256_add_epi32(_mm256_cvtps_epi32(v), _mm256_set1_epi32(q->zero));
}

// The first n (1..8) lanes of v, quantized: a u8 result written from the sums' registers, not through memory.
static inline void v_put_u8(uint8_t * out, int n, __m256 v, const struct patch_quant * q) {
    const __m256i x = quant_u8(v, q, 1);
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    const __m128i b = _mm_packus_epi16(w, w);
    if (n >= 8) {
        _mm_storel_epi64((__m128i *) out, b);
    } else {
        uint8_t tmp[16];
        _mm_storeu_si128((__m128i *) tmp, b);
        memcpy(out, tmp, (size_t) n);
    }
}
#define V_PUT_U8 v_put_u8

// Two whole vectors (a pixel's 16 channels) in one 16-byte store: the 32-bit pack works per 128-bit lane, so its
// quarters are put back in order before the 16-bit one.
static inline void v_put_u8_2(uint8_t * out, __m256 v0, __m256 v1, const struct patch_quant * q) {
    const __m256i ab = _mm256_permute4x64_epi64(_mm256_packus_epi32(quant_u8(v0, q, 0), quant_u8(v1, q, 0)), 0xd8);
    _mm_storeu_si128((__m128i *) out, _mm_packus_epi16(_mm256_castsi256_si128(ab), _mm256_extracti128_si256(ab, 1)));
}
#define V_PUT_U8_2 v_put_u8_2

// 8 bytes of a u8 residual less its zero point as floats: exact in int32 and as a float.
static inline __m256 res_u8(const uint8_t * p, const struct gemm_res_quant * q) {
    const __m256i r = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) p));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(r, _mm256_set1_epi32(q->zero)));
}
#define V_RES_U8 res_u8

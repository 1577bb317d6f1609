// The int8 epilogue of csrc/gemm_tile.inc on ymm registers, shared by the 256-bit int8 paths
// (gemm_int8_avx2.c, gemm_int8_avxvnni.c), included after gemm_ymm.h once ACC_BITS gives a vector's int32 sums:
// the sums as floats times their scales plus bias, a u8 residual's bytes as floats, and u8 results quantized by
// the portable loop (patch_put_u8), which the compiler vectorises for AVX2.
#pragma once

#include <stdint.h>

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

// 8 bytes of a u8 residual less its zero point as floats: exact in int32 and as a float.
static inline __m256 res_u8(const uint8_t * p, const struct gemm_res_quant * q) {
    const __m256i r = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) p));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(r, _mm256_set1_epi32(q->zero)));
}
#define V_RES_U8 res_u8

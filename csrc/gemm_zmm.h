// The f32 vector macros of csrc/gemm_tile.inc for zmm registers, shared by the AVX-512 paths
// (gemm_avx512.c, gemm_avx512bf16.c): 16 floats per vector, two vectors (32 channels) per tile.
#pragma once

#include <immintrin.h>

#define V __m512
#define VL 16
#define MV 2
#define V_ZERO() _mm512_setzero_ps()
#define V_LOAD(p) _mm512_loadu_ps(p)
#define V_STORE(p, v) _mm512_storeu_ps(p, v)
#define V_ADD(a, b) _mm512_add_ps(a, b)
#define V_MAX(a, b) _mm512_max_ps(a, b)
#define M __mmask16
#define V_MASK(n) ((__mmask16) ((1u << (n)) - 1))
#define V_LOADM(p, m) _mm512_maskz_loadu_ps(m, p)
#define V_STOREM(p, m, v) _mm512_mask_storeu_ps(p, m, v)

// The f32 vector macros of csrc/gemm_tile.inc for ymm registers, shared by the AVX2 paths (gemm_avx2.c,
// gemm_int8_avx2.c): 8 floats per vector, two vectors (16 channels, one panel) per tile.
#pragma once

#include <immintrin.h>

#define V __m256
#define VL 8
#define MV 2
#define V_ZERO() _mm256_setzero_ps()
#define V_LOAD(p) _mm256_loadu_ps(p)
#define V_STORE(p, v) _mm256_storeu_ps(p, v)
#define V_ADD(a, b) _mm256_add_ps(a, b)
#define V_MAX(a, b) _mm256_max_ps(a, b)
#define M __m256i
// Lane i is on when i < n: a sliding window over 8 ones followed by 8 zeros.
static const int ones_then_zeros[16] = { -1, -1, -1, -1, -1, -1, -1, -1 };
#define V_MASK(n) _mm256_loadu_si256((const __m256i *) (ones_then_zeros + 8 - (n)))
#define V_LOADM(p, m) _mm256_maskload_ps(p, m)
#define V_STOREM(p, m, v) _mm256_maskstore_ps(p, m, v)

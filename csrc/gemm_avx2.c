// The AVX2+FMA path of csrc/gemm.h: 16 channels (one panel, two ymm) x 6 pixels, 12 accumulators;
// 16 x 2 for the last pixels.
// Compiled with -mavx2 -mfma; only called where the CPU has both (gemm.c checks at run time).
#include <immintrin.h>

#define V __m256
#define VL 8
#define MV 2
#define V_ZERO() _mm256_setzero_ps()
#define V_LOAD(p) _mm256_loadu_ps(p)
#define V_STORE(p, v) _mm256_storeu_ps(p, v)
#define V_FMA_BCAST(a, p, c) _mm256_fmadd_ps(a, _mm256_broadcast_ss(p), c)
#define V_ADD(a, b) _mm256_add_ps(a, b)
#define V_MAX(a, b) _mm256_max_ps(a, b)
#define M __m256i
// Lane i is on when i < n: a sliding window over 8 ones followed by 8 zeros.
static const int ones_then_zeros[16] = { -1, -1, -1, -1, -1, -1, -1, -1 };
#define V_MASK(n) _mm256_loadu_si256((const __m256i *) (ones_then_zeros + 8 - (n)))
#define V_LOADM(p, m) _mm256_maskload_ps(p, m)
#define V_STOREM(p, m, v) _mm256_maskstore_ps(p, m, v)

#define NR 6
#define TILE_FN tile_avx2
#include "gemm_tile.inc"
#undef NR
#undef TILE_FN

#define NR 2
#define TILE_FN tile_avx2_narrow
#include "gemm_tile.inc"

const struct gemm_kernel gemm_kernel_avx2 = { MV * VL, 6, 2, tile_avx2, tile_avx2_narrow, NULL };

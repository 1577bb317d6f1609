// The AVX2+FMA path of csrc/gemm.h: 16 channels (one panel, two ymm) x 6 pixels, 12 accumulators;
// 16 x 2 for the last pixels.
// Compiled with -mavx2 -mfma; only called where the CPU has both (gemm.c checks at run time).
#include "gemm_ymm.h"

#define V_FMA_BCAST(a, p, c) _mm256_fmadd_ps(a, _mm256_broadcast_ss(p), c)

#define NR 6
#define TILE_FN tile_avx2
#include "gemm_tile.inc"
#undef NR
#undef TILE_FN

#define NR 2
#define TILE_FN tile_avx2_narrow
#include "gemm_tile.inc"

const struct gemm_kernel gemm_kernel_avx2 = { MV * VL, 6, 2, tile_avx2, tile_avx2_narrow, NULL, sizeof(float) };

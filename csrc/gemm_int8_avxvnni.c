// The int8 AVX-VNNI path of csrc/gemm.h, for CPUs with the 256-bit vpdpbusd but not AVX-512 (Intel's since
// Alder Lake, its E-core Xeons): u8 pixels x s8 weights, int32 sums; 16 channels (one panel, two ymm) x 6 pixels,
// 12 accumulators, the two weight vectors and the pixel's broadcast: 15 of the 16 ymm registers; 16 x 2 for the
// last pixels. One vpdpbusd takes a group of 4 k: each lane adds its channel's 4 products with the pixel's 4
// bytes to its int32 sum, exactly, 4 times as many products per instruction as the AVX2 path's vpmaddwd.
// Compiled with -mavx2 -mfma -mavxvnni; only called where the CPU has all three (gemm.c checks at run time).
#include <stdint.h>
#include <string.h>

#include "gemm_tile.h"
#include "gemm_ymm.h"
#include "patch_row.h"

#define WT uint8_t
#define WV __m256i
#define WV_LOAD(p) _mm256_loadu_si256((const __m256i *) (p))
#define KSTEP 4
#define KS GEMM_KS_INT8
#define XGROUP GEMM_INT8_XGROUP  // csrc/gemm.c's direct windows need pairs
#define ACC __m256i
#define ACC_ZERO() _mm256_setzero_si256()
static inline __m256i dp_bcast(__m256i w, const uint8_t * p, __m256i c) {
    int32_t x;
    memcpy(&x, p, sizeof x);
    return _mm256_dpbusd_avx_epi32(c, _mm256_set1_epi32(x), w);
}
#define V_FMA_BCAST(a, p, c) dp_bcast(a, p, c)
#define ACC_BITS(a) _mm256_castsi256_ps(a)
#define ACC_SUM(c, a) _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(c), a))
#include "gemm_int8_ymm.h"

#define NR 6
#define TILE_FN tile_int8_avxvnni
#include "gemm_tile.inc"
#undef NR
#undef TILE_FN

#define NR 2
#define TILE_FN tile_int8_avxvnni_narrow
#include "gemm_tile.inc"

const struct gemm_kernel gemm_kernel_int8_avxvnni = {
    MV * VL, 6, 2, tile_int8_avxvnni, tile_int8_avxvnni_narrow, NULL, 1, patch_put_u8,
};

// The int8 AVX512-VNNI path of csrc/gemm.h: u8 pixels x s8 weights, int32 sums; 32 channels (two panels, one
// zmm each) x 12 pixels, 24 accumulators; 32 x 4 for the last pixels, and 32 x 13 where one pixel would be
// left over. One vpdpbusd takes a group of 4 k: each lane adds its channel's 4 products with the pixel's 4
// bytes (broadcast to every lane) to its int32 sum, exactly.
// Compiled with -mavx512f -mavx512vnni; only called where the CPU has both (gemm.c checks at run time).
#include <stdint.h>
#include <string.h>

#include "gemm_zmm.h"

#define WT uint8_t
#define WV __m512i
#define WV_LOAD(p) _mm512_loadu_si512(p)
#define KSTEP 4
#define KS GEMM_KS_INT8
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
#define ACC_FINISH(v, b, j) _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_castps_si512(v), \
    _mm512_load_si512((b)->corr + (j) * VL))), _mm512_load_ps((b)->scale + (j) * VL))

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

const struct gemm_kernel gemm_kernel_int8_avx512vnni = {
    MV * VL, 12, 4, tile_int8_avx512vnni, tile_int8_avx512vnni_narrow, tile_int8_avx512vnni_wide, 1,
};

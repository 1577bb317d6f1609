// The AVX512-BF16 path of csrc/gemm.h: bf16 weights and pixels, f32 sums; 32 channels (two panels) x 12 pixels, 24
// accumulators; 32 x 4 for the last pixels, 32 x 13 where one pixel would be left over, and 32 x 14 where N is a
// multiple of 14. One vdpbf16ps takes a pair of k: each lane multiplies its channel's two weights by the pixel's
// two values (both products exact in f32) and adds them to its sum.
// Compiled with -mavx512f -mavx512bf16; only called where the CPU has both (gemm.c checks at run time).
#include <stdint.h>

#include "gemm_zmm.h"

#define WT uint16_t
#define WV __m512bh
#define WV_LOAD(p) ((__m512bh) _mm512_loadu_si512(p))
#define KSTEP 2
#define KS GEMM_KS_BF16
// The pixel's pair of k broadcast from memory ({1to16}) inside the instruction, as the f32 path does.
static inline __m512 dp_bcast(__m512bh a, const uint16_t * p, __m512 c) {
    __asm__("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(c) : "v"(a), "m"(*(const uint32_t *) p));
    return c;
}
#define V_FMA_BCAST(a, p, c) dp_bcast(a, p, c)

#define NR 12
#define TILE_FN tile_avx512bf16
#include "gemm_tile.inc"
#undef NR
#undef TILE_FN

#define NR 4
#define TILE_FN tile_avx512bf16_narrow
#include "gemm_tile.inc"
#undef NR
#undef TILE_FN

// 26 accumulators and the two weight vectors: 28 of the 32 zmm registers.
#define NR 13
#define TILE_FN tile_avx512bf16_wide
#include "gemm_tile.inc"
#undef NR
#undef TILE_FN

// 28 accumulators and the two weight vectors: 30 registers.
#define NR 14
#define TILE_FN tile_avx512bf16_tall
#include "gemm_tile.inc"

const struct gemm_kernel gemm_kernel_avx512bf16 = { MV * VL, 12, 4, tile_avx512bf16, tile_avx512bf16_narrow,
                                                     tile_avx512bf16_wide, sizeof(uint16_t), NULL,
                                                     14, tile_avx512bf16_tall };

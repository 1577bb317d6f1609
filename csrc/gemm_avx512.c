// The AVX-512 path of csrc/gemm.h: 32 channels (two panels, one zmm each) x 12 pixels, 24 accumulators;
// 32 x 4 for the last pixels, and 32 x 13 where one pixel would be left over.
// Compiled with -mavx512f -mfma; only called where the CPU has AVX-512F (gemm.c checks at run time).
#include "gemm_zmm.h"

// The broadcast folded into the FMA ({1to16}), as MLAS's kernels do: a separate vbroadcastss per pixel
// and k costs issue slots. Intrinsics cannot ask for it when the broadcast value has two uses.
static inline __m512 fma_bcast(__m512 a, const float * p, __m512 c) {
    __asm__("vfmadd231ps %2%{1to16%}, %1, %0" : "+v"(c) : "v"(a), "m"(*p));
    return c;
}
#define V_FMA_BCAST(a, p, c) fma_bcast(a, p, c)

#define NR 12
#define TILE_FN tile_avx512
#include "gemm_tile.inc"
#undef NR
#undef TILE_FN

#define NR 4
#define TILE_FN tile_avx512_narrow
#include "gemm_tile.inc"
#undef NR
#undef TILE_FN

// 26 accumulators and the two weight vectors: 28 of the 32 zmm registers.
#define NR 13
#define TILE_FN tile_avx512_wide
#include "gemm_tile.inc"

const struct gemm_kernel gemm_kernel_avx512 = { MV * VL, 12, 4, tile_avx512, tile_avx512_narrow, tile_avx512_wide,
                                                 sizeof(float) };

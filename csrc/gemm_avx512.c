// The AVX-512 path of csrc/gemm.h: 32 channels (two panels, one zmm each) x 12 pixels, 24 accumulators;
// 32 x 4 for the last pixels, 32 x 13 where one pixel would be left over, and 32 x 14 where N is a multiple of 14.
// Compiled with -mavx512f -mfma; only called where the CPU has AVX-512F (gemm.c checks at run time).
//
// Each tile comes in two forms that differ only in how a pixel's value reaches its two FMAs, so they give the
// same bits; gemm.c runs one per CPU (gemm_folds_broadcasts in csrc/gemm.h):
// - folded into each FMA as a {1to16} broadcast from memory, as MLAS's kernels do: a few percent faster on
//   Zen 4, whose 512-bit FMAs run as two halves (one a cycle), where a separate broadcast costs issue slots;
// - broadcast once into a register: 11% faster tiles on Zen 5 (two full-width FMAs a cycle), where one load
//   per FMA, two a cycle with the weights', left the FMAs waiting on the loads.
#include "gemm_zmm.h"

// Intrinsics cannot ask for the folded form when the broadcast value has two uses.
static inline __m512 fma_bcast_folded(__m512 a, const float * p, __m512 c) {
    __asm__("vfmadd231ps %2%{1to16%}, %1, %0" : "+v"(c) : "v"(a), "m"(*p));
    return c;
}

#define V_FMA_BCAST(a, p, c) fma_bcast_folded(a, p, c)
#define TILES(name) name##_folded
#include "gemm_avx512_tiles.inc"
#undef V_FMA_BCAST
#undef TILES

// The broadcast's two uses share one vbroadcastss.
#define V_FMA_BCAST(a, p, c) _mm512_fmadd_ps(a, _mm512_set1_ps(*(p)), c)
#define TILES(name) name
#include "gemm_avx512_tiles.inc"

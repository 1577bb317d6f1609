// The int8 AVX2 path of csrc/gemm.h: u8 pixels x s8 weights, int32 sums; 16 channels (one panel) x 2 pixels;
// 16 x 1 for the last pixel. vpmaddubsw would add two u8 x s8 products into an s16, which saturates
// (255 * 127 * 2 > 32767), so both operands are widened to s16 and vpmaddwd adds each pair into an int32
// exactly: 8 of a group's 16 products per instruction (no weights limited to 7 bits, whose results would
// differ from the other paths'). A channel's group of 4 k then sits in two lanes (k 0-1 and 2-3), added
// once per cache block, so 8 channels take two accumulators.
// Compiled with -mavx2 -mfma (the epilogue's multiply-adds); only called where the CPU has both (gemm.c checks at
// run time).
#include <stdint.h>
#include <string.h>

#include "gemm_tile.h"
#include "gemm_ymm.h"

#define WT uint8_t
struct wv { __m256i lo, hi; };  // 8 channels' 4 k as s16: channels 0-3, 4-7
#define WV struct wv
static inline struct wv wv_load(const uint8_t * p) {
    const __m256i v = _mm256_loadu_si256((const __m256i *) p);
    return (struct wv) { _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v)),
                         _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1)) };
}
#define WV_LOAD(p) wv_load(p)
#define KSTEP 4
#define KS GEMM_KS_INT8
#define XGROUP GEMM_INT8_XGROUP  // csrc/gemm.c's direct windows need pairs
#define ACC struct wv  // pair sums of channels 0-3 and 4-7, as the weights
#define ACC_ZERO() ((struct wv) { _mm256_setzero_si256(), _mm256_setzero_si256() })
static inline struct wv dp_bcast(struct wv w, const uint8_t * p, struct wv c) {
    int32_t x;
    memcpy(&x, p, sizeof x);
    const __m256i xs = _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(x)));  // the 4 k as s16, x4
    return (struct wv) { _mm256_add_epi32(c.lo, _mm256_madd_epi16(w.lo, xs)),
                         _mm256_add_epi32(c.hi, _mm256_madd_epi16(w.hi, xs)) };
}
#define V_FMA_BCAST(a, p, c) dp_bcast(a, p, c)
// Each channel's two lanes added: hadd gives channels (0 1 4 5 | 2 3 6 7), the permute puts them in order.
static inline __m256i channel_sums(struct wv a) {
    return _mm256_permute4x64_epi64(_mm256_hadd_epi32(a.lo, a.hi), 0xd8);
}
#define ACC_BITS(a) _mm256_castsi256_ps(channel_sums(a))
#define ACC_SUM(c, a) _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(c), channel_sums(a)))
#include "gemm_int8_ymm.h"

// 8 accumulators, 4 widened weight vectors and the pixel's: 13 of the 16 ymm registers.
#define NR 2
#define TILE_FN tile_int8_avx2
#include "gemm_tile.inc"
#undef NR
#undef TILE_FN

#define NR 1
#define TILE_FN tile_int8_avx2_narrow
#include "gemm_tile.inc"

// Pixels quantized by the portable loop, vectorised for AVX2 by the compiler.
const struct gemm_kernel gemm_kernel_int8_avx2 = {
    MV * VL, 2, 1, tile_int8_avx2, tile_int8_avx2_narrow, NULL, 1, patch_put_u8,
};

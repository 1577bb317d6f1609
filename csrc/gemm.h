// A packed-weight matrix product (f32; bf16 with f32 sums; int8 with int32 sums, see gemm_int8) with a fused
// epilogue, run as a ggml custom op, for a convolution (or a Linear layer, a 1x1 convolution of a
// one-pixel-wide image):
//     C[n, m] = relu?( sum_k W[m, k] X[n, k] + bias[m] + R[n, m] )
// for the weights W [M, K], and X [N, K] the windows of a kh x kh convolution (stride, zero padding) of a
// channel-fastest f32 image [C, W, H, B], K = kh * kh * C ordered (ky, kx, c) with c fastest, as
// csrc/patches.h gathers them; C [N, M] channel-fastest, N = OW * OH * B output pixels.
// X is never stored whole: each cache block of pixels and k is copied from the image into a per-thread buffer
// (on the bf16 path rounded to bf16 as gather_patches rounds, unless the image is bf16 already) and multiplied
// from there, except where X's rows are the image's own pixels (a 1x1 stride-1 convolution): those are read
// in place; and on the int8 paths, a larger window's rows are read from a padded copy of the image where it
// fits (csrc/gemm.c's direct windows).
//
// Packed weights (made once at load, by the caller): f32 [16, K, P, 1] in ggml's order (NumPy (P, K, 16)):
// panel p holds output channels 16p..16p+15, k-major, so the 16 weights of one k are contiguous. P is even
// (M is zero-padded to a multiple of 32), and 32 * (P / 2) - M < 32. One layout serves the f32 paths.
// The bf16 path (GEMM_AVX512_BF16: bf16 weights and pixels, f32 sums and epilogue) keeps that shape with K
// even and each panel's k in pairs, (k, k+1) side by side per channel: NumPy (P, K/2, 16, 2), as vdpbf16ps reads.
//
// Each output's reduction order is fixed by K alone: K runs in blocks of GEMM_KS in order, each block summed
// (one fused multiply-add per k, in k order) into a fresh accumulator that is then added to the running sum;
// then + bias, then + R, then ReLU. Nothing depends on N, the tiling, the thread count or the ISA path, so
// every f32 path gives bit-identical results for any batch and thread count (the bf16 path too, for its own
// results, with blocks of GEMM_KS_BF16). Short blocks keep the error near
// ggml's own kernels' (relative ~u * (sqrt(KS/2) + sqrt(K/(2 KS))) for random signs, u = 2^-24).
#pragma once

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

// The summation block above. 64 k: every stage of ResNet-101 at ~0.75x of PyTorch f32's distance from
// float64 (32: ~0.6x, 128: ~0.86x) and the products ~4% faster than with 32 (merging sums into C less often).
#define GEMM_KS 64
// The bf16 path's block: 128 vdpbf16ps steps. Its error is its inputs' rounding to bf16 (~1e-3), so a longer
// block costs no visible accuracy; merging sums into C less often makes its products faster (32 -> 128: ~14%;
// 128 -> 256: ~4% of a whole bf16 ResNet-101, 1 thread).
#define GEMM_KS_BF16 256
// int8 sums are exact, so their block only orders the work: one per cache block (csrc/gemm.c's largest,
// GEMM_KC_BYTES_MAX).
#define GEMM_KS_INT8 1024

// The cache sizes the products' cache blocks are sized for (csrc/gemm.c), level 1 (data) or 2: cpuid's
// (csrc/cache_size.h), or what gemm_set_cache_bytes last set for that level (a value <= 0 goes back to
// cpuid's); other levels: 0, and setting them does nothing. The blocks order the work, not the arithmetic:
// results are the same for any value.
int64_t gemm_cache_bytes(int level);
void gemm_set_cache_bytes(int level, int64_t bytes);
// The bytes of k per cache block for the L1d above (the same for every type: 4 per f32 value, 1 per int8).
int64_t gemm_kc_bytes(void);

// Whether the AVX-512 f32 path's tiles fold each pixel's broadcast into its FMAs (csrc/gemm_avx512.c), or
// broadcast it into a register first: folded on AMD's family 19h (Zen 4, where it measured faster), in a
// register elsewhere (Zen 5: 11% faster tiles), unless gemm_set_folds_broadcasts chose (1: folded, 0: in a
// register, < 0: the CPU's choice again). The same arithmetic either way: results are the same bits.
int gemm_folds_broadcasts(void);
void gemm_set_folds_broadcasts(int folded);

// The int8 paths: AVX512-VNNI, AVX2, portable C (every CPU), and AVX-VNNI (256 bits, without AVX-512).
enum gemm_path {
    GEMM_AVX512 = 0, GEMM_AVX2 = 1, GEMM_AVX512_BF16 = 2,
    GEMM_INT8_AVX512_VNNI = 3, GEMM_INT8_AVX2 = 4, GEMM_INT8_SCALAR = 5, GEMM_INT8_AVX_VNNI = 6, GEMM_N_PATHS
};

// Whether this CPU (and this build) can run `path`: checked at run time from cpuid.
int gemm_path_supported(int path);

// w: packed weights as above (K = kh * kh * x->ne[0], bf16: rounded up to even); x: contiguous f32 [C, W, H, B]
// (or bf16 on the bf16 path); bias: NULL or contiguous f32 [M]; residual: NULL or contiguous f32
// [M, OW, OH, B]. kh, stride: 1 to OP_PARAM_INT_MAX (csrc/op_params.h), pad: 0 to that, kh <= W + 2 pad and
// H + 2 pad. Returns f32 [M, OW, OH, B]. The caller validates every argument and that `path` is supported.
struct ggml_tensor * gemm_packed(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * x,
                                 int64_t m, int kh, int stride, int pad, struct ggml_tensor * bias,
                                 struct ggml_tensor * residual, int relu, int path);

// The int8 product: C[n, m] = relu?( (float) (sum_k Wq[m, k] (Xq[n, k] - zx)) * (sx * sw[m]) + bias[m] + R[n, m] ),
// each operation rounded in that order (the int32 difference to float, then its product with the float
// sx * sw[m] plus bias[m] in one rounding, a fused multiply-add, then the residual), on every int8 path and for
// any batch and thread count: the integer sum is exact, so results are bit-identical across paths. Xq, the
// windows of the image quantized as they are packed:
// Xq = clamp(rint(x * (1 / sx)) + zx, 0, 255), with 1 / sx one float division, x * (1 / sx) clamped to
// [-zx, 255 - zx] before rounding (NaN to -zx) and rint to nearest even; padding is the value 0.0 (byte zx).
// x may instead be those bytes already (an I8 tensor holding u8, as a previous gemm_int8 writes them): they
// are copied, or read in place, as they are.
// The sum is taken as sum_k Wq Xq - zx * colsum[m] in int32, exact while 255 * 127 * K fits an int32
// (K <= GEMM_INT8_K_MAX).
// R may also be u8 bytes (an I8 tensor, as a previous gemm_int8 writes them) with r_scale > 0: then
// (float) (Rq[n, m] - r_zero) times r_scale is added to the rest in one rounding (a fused multiply-add), on every
// path (r_scale 0: R is f32, added in its own rounding). A block of a residual network then hands its output
// on as u8, which its successor's first convolution reads as x and its last adds as R.
// y_scale 0: C is f32. Otherwise C is quantized as the next convolution's input would be, with sy = y_scale
// and zy = y_zero in place of sx and zx (the same float operations, so the bytes are those the next
// gemm_int8 would have made from the f32 C), and returned as u8 bytes in an I8 tensor: the next product
// reads a quarter of the bytes and quantizes nothing.
// w: s8 weights Wq in an f32 tensor of raw 32-bit words [16, K4/4, P, 1] (NumPy (P, K4/4, 16, 4) bytes): panels
// of 16 channels, k in groups of 4 per channel as vpdpbusd reads them, K zero-padded to K4, a multiple of 4,
// M to a multiple of 32, as above. scales: f32 [M], sw; colsums: [M] int32 words in an f32 tensor, each
// channel's sum of Wq. x_scale: sx, positive, normal, and 1 / sx finite; x_zero: zx, 0..255; y_scale: 0 or as
// x_scale, y_zero as x_zero. x: f32 or I8, contiguous; the rest as for gemm_packed; `path` one of the
// GEMM_INT8_* paths.
#define GEMM_INT8_K_MAX 66311  // (2^31 - 1) / (255 * 127)
struct ggml_tensor * gemm_int8(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * x, int64_t m,
                               int kh, int stride, int pad, struct ggml_tensor * scales, struct ggml_tensor * colsums,
                               float x_scale, int x_zero, struct ggml_tensor * bias, struct ggml_tensor * residual,
                               float r_scale, int r_zero, int relu, float y_scale, int y_zero, int path);

// A 3x3 stride-1 padding-1 convolution of x (contiguous f32 [C, W, H, B]) by Winograd F(2x2, 3x3)
// (csrc/winograd.h): w, packed f32 3x3 weights as for gemm_packed (K = 9 C); v: winograd_input(x), f32
// [C, T, 16, 1]. Returns f32 [M, W, H, B], what winograd_output makes of the 16 products, bias, residual and
// relu (as for gemm_packed): product t is v's slice t times (G g G^T)_t, the weights transformed as each tile
// needs them (the packed 3x3 weights are all the model stores), each summed as gemm_packed sums, K = C; each
// thread keeps the products' sums of its blocks of tiles and channels and transforms them itself, so they
// never leave it. f32 paths only; the caller validates every argument.
struct ggml_tensor * gemm_winograd(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * v,
                                   struct ggml_tensor * x, int64_t m, struct ggml_tensor * bias,
                                   struct ggml_tensor * residual, int relu, int path);

#ifdef __cplusplus
}
#endif

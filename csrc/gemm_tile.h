// The micro-kernel shared by the ISA paths (gemm_avx512.c, gemm_avx2.c, gemm_avx512bf16.c and the int8
// paths gemm_int8_*.c): one tile of output channels by pixels over one cache block of K, summed in registers
// a summation block of k at a time, each such sum merged into C in memory (int8: as int32 bits, exactly),
// with the epilogue after K's last one. Internal to csrc/gemm*.c, and quantize.c (a path's put_u8).
#pragma once

#include <stdint.h>

#include "gemm.h"
#include "patch_row.h"

// How a u8 residual (int8) is read: (float) (r - zero) * scale.
struct gemm_res_quant {
    float scale;
    int zero;
};

struct gemm_block {
    const void * w;        // packed weights of the tile's first channel at the block's first k (f32, bf16 or s8)
    int64_t w_panel;       // elements from one 16-channel panel to the next (16 * K)
    const void * x;        // the tile's first pixel row at the block's first k (the weights' type; int8: u8)
    int64_t ldx;           // elements between pixel rows
    // Or, where xoff is not NULL (int8's direct windows, csrc/gemm.c): pixel i's window row holding the
    // block's first k starts at x + xoff[i] (x: the padded image's row of taps ky for a window at offset 0),
    // krun values, of which krest are left from the block's first k; the next row's start is kjump after x.
    // (Each of the tile's groups of pixel rows, XGROUP in csrc/gemm_tile.inc, has its rows ldx apart.)
    const int32_t * xoff;
    int64_t krest, krun, kjump;
    // And where the tile's pixels lie along one output row (csrc/gemm.c, clip_window): each window row is kernel
    // columns of cseg values, of which pixel 0 skips the first lcols and pixel nr - 1 the last rcols (the
    // padding's, zeros); 0 and 0 where none is skipped.
    int64_t cseg;
    int lcols, rcols;
    int64_t kc;            // k values in this cache block (whole summation blocks, except at K's end)
    int nr, mr;            // valid pixels (<= GEMM_NR) and channels (<= GEMM_MR) in this tile
    float * c;             // partial sums of the tile's first pixel and channel, kept between K's cache blocks:
    int64_t ldc;           // in C itself for an f32 C; floats between their rows
    void * out;            // the result's first pixel and channel (C, f32 or u8), written after K's last block;
    int64_t ldo;           // values between its rows (M), also between residual rows
    const struct patch_quant * out_q;  // int8: how the result is quantized to u8, or NULL for f32
    int first, last;       // whether this is K's first cache block (it writes C) or its last (epilogue)
    const float * bias;    // at the tile's first channel, or NULL
    const float * res;     // residual at the tile's first pixel and channel, or NULL
    const uint8_t * res_u8;  // int8: or a u8 residual there (res NULL), read as res_q says
    struct gemm_res_quant res_q;
    int relu;
    const int32_t * corr;  // int8: the tile's zx * colsum[m] (NULL where zx is 0) and x_scale * w_scale[m],
    const float * scale;   // one per channel of a whole tile (aligned, zeros past M)
    const void * next_w;   // the next tile's weights (same layout as w), fetched into cache as this one runs, or NULL
};

// Each ISA path provides one of these: its tile size and tile function, a narrower tile for the last
// pixels of a product (N = 196 leaves 4 over a tile of 12), and where registers allow a tile one pixel wider
// for a remainder of one (N = 49: 12 + 12 + 12 + 13), or NULL; the bytes of each weight and pixel value
// it reads (4: f32, 2: bf16, 1: int8); for int8, how it quantizes f32 values as gemm.c packs pixels and as
// its tiles write a u8 result: the bytes of patch_put_u8 (csrc/patch_row.h), in the path's own vectors; and
// where registers allow, a taller tile for products whose N it divides (0 and NULL otherwise): 14, since
// ResNet's images are 7 x 7 to 56 x 56 (so 196 pixels are 14 tiles, none narrow, and from 14 x 14 up, each
// tile lies along one output row, which int8's direct windows use: csrc/gemm.c, clip_window).
struct gemm_kernel {
    int mr, nr, nr_narrow;
    void (*tile)(const struct gemm_block * b);
    void (*tile_narrow)(const struct gemm_block * b);
    void (*tile_wide)(const struct gemm_block * b);
    int es;
    patch_put put_u8;
    int nr_tall;  // or 0
    void (*tile_tall)(const struct gemm_block * b);
    // int8, where registers allow: a tile of 7 pixels, a row of ResNet's last stage (7 x 7), so that there too
    // each tile lies along one output row (csrc/gemm.c, clip_window); 0 and NULL otherwise.
    int nr_row;
    void (*tile_row)(const struct gemm_block * b);
};
#define GEMM_MR_MAX 32  // the widest tile of channels
#define GEMM_NR_MAX 16  // more than the tallest tile of pixels
// The int8 tiles' pixel rows per base address (XGROUP, csrc/gemm_tile.inc): pairs, which csrc/gemm.c's direct
// windows need (a pair from an even pixel never spans two output rows of an even width).
#define GEMM_INT8_XGROUP 2

// The kernel of a path of csrc/gemm.h (NULL where this build has none); the caller checks gemm_path_supported.
const struct gemm_kernel * gemm_kernel_for(int path);

extern const struct gemm_kernel gemm_kernel_avx512, gemm_kernel_avx512_folded;  // see gemm_folds_broadcasts
extern const struct gemm_kernel gemm_kernel_avx2;
extern const struct gemm_kernel gemm_kernel_avx512bf16;
extern const struct gemm_kernel gemm_kernel_int8_avx512vnni;
extern const struct gemm_kernel gemm_kernel_int8_avx2;
extern const struct gemm_kernel gemm_kernel_int8_avxvnni;
extern const struct gemm_kernel gemm_kernel_int8_scalar;

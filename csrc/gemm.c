#include "gemm.h"

#include <stdint.h>
#include <string.h>

#include "cache_size.h"
#include "gemm_tile.h"
#include "op_params.h"
#include "patch_row.h"
#include "thread_range.h"
#include "winograd.h"

// Cache blocks: kc values of k, GEMM_KC_BYTES_MAX bytes of them whatever the type where the weights' tile of
// GEMM_MR_MAX channels then takes at most two thirds of the L1d (it is reused from there: 48 KiB, Zen 5 and
// recent Intel), else GEMM_KC_BYTES_MIN (32 KiB, Zen 4); of up to nb pixels (X, copied once per block into a
// thread's buffer, or read in place, and kept in L2 while every weight tile passes over it), fewer when the
// thread's channels are many so that the block's output, c_block floats at most, stays in L2 across its K
// blocks: each of the two a quarter of the L2 (struct gemm_blocks). They order the work, not the arithmetic.
// A block holds whole summation blocks (GEMM_KS, GEMM_KS_BF16, GEMM_KS_INT8); nb is a multiple of every path's
// tile heights (GEMM_NB_STEP). Pixel rows GEMM_ALIAS_BYTES apart are always copied (see in_place).
#define GEMM_KC_BYTES_MIN 512
#define GEMM_KC_BYTES_MAX 1024
#define GEMM_KC (GEMM_KC_BYTES_MAX / 4)  // the most f32 values of k in a block, which the buffers hold
#define GEMM_NB_STEP 48
#define GEMM_NB_MIN (4 * GEMM_NB_STEP)
#define GEMM_NB_MAX (20 * GEMM_NB_STEP)
#define GEMM_C_BLOCK_MAX (128 * 1024)
#define GEMM_ALIAS_BYTES 4096
// The largest padded image (set_pixels): int8 ResNet's at 224x224 in batches of 4, a lane's share of 8.
#define GEMM_PAD_BYTES (2 << 20)
// pack_padded moves short window rows 32 or GEMM_COPY_SLACK bytes at a time, past their end: the buffers have room.
#define GEMM_COPY_SLACK 128
// Winograd's pixel blocks hold at most this many tiles, whose 16 products' sums the thread keeps (wpart).
#define GEMM_WINO_NB (GEMM_NB_MAX / 2)
// The buffer also holds the last partial tile of each of Winograd's 16 products (read in place otherwise).
_Static_assert(16 * 12 <= GEMM_NB_MIN, "16 partial tiles (each padded to a tile of at most 12 pixels) fit xbuf");
_Static_assert(GEMM_KS_INT8 == GEMM_KC_BYTES_MAX, "an int8 cache block is one summation block");
_Static_assert(GEMM_KC_BYTES_MIN % (GEMM_KS_BF16 * 2) == 0 && GEMM_KC_BYTES_MIN % (GEMM_KS * 4) == 0,
               "a cache block holds whole summation blocks");

// Op parameters (csrc/op_params.h): FLAGS holds the GF_ bits (WINO: gemm_winograd's convolution);
// X_SCALE (a float's bits): the int8 pixels' sx; Y_SCALE: a u8 result's (0: an f32 result); R_SCALE: a u8
// residual's (0: f32); ZEROS: the three zero points (0..255), x's | y's << 8 | the residual's << 16.
// CLAIMS is no parameter but the threads' shared record of which chunks of the work are taken (gemm_share):
// zero between computations.
enum { GP_PATH, GP_KH, GP_STRIDE, GP_PAD, GP_FLAGS, GP_X_SCALE, GP_Y_SCALE, GP_R_SCALE, GP_ZEROS, GP_CLAIMS,
       GP_N_PARAMS };
enum { GF_BIAS = 1, GF_RES = 2, GF_RELU = 4, GF_WINO = 8 };
_Static_assert(GP_N_PARAMS <= OP_PARAMS_MAX, "the op's parameters fit");

// A thread's working memory, one thread-local object whose address gemm_run takes once (each access to a
// thread-local of a shared library is a call to __tls_get_addr: 0.6% of an int8 run when made per block).
struct gemm_scratch {
    // The current block of pixels: rows of kc values (the path's type), zero rows after N; and, for Winograd,
    // the current tile's transformed weights for each of the 16 products: two panels of kc x 16 each (the
    // four corners' stay unused: they are read in place).
    float xbuf[GEMM_NB_MAX * GEMM_KC + GEMM_COPY_SLACK / 4] __attribute__((aligned(64)));
    float wbuf[16][2 * GEMM_KC * 16] __attribute__((aligned(64)));
    // The image's padded copy (pad_image), where it fits.
    uint8_t pbuf[GEMM_PAD_BYTES + GEMM_COPY_SLACK] __attribute__((aligned(64)));
    // int8: the current tile of channels' epilogue terms (gemm_block's corr and scale); and for a u8 result,
    // which cannot hold them, the int32 partial sums of the current block of pixels and channels between K's
    // cache blocks.
    int32_t qcorr[GEMM_MR_MAX] __attribute__((aligned(64)));
    // int8's direct windows: where each pixel of the current block starts in the padded image (pbuf), and
    // past the block's last pixel up to a whole tile, the first's (their sums are never stored).
    int32_t xoff[GEMM_NB_MAX + GEMM_NR_MAX];
    float qscale[GEMM_MR_MAX] __attribute__((aligned(64)));
    float qpart[GEMM_C_BLOCK_MAX] __attribute__((aligned(64)));
    // Winograd: the 16 products' sums of the current block of tiles and channels, until the output transform
    // reads them (its result is all that leaves the thread).
    float wpart[16 * GEMM_WINO_NB * GEMM_MR_MAX] __attribute__((aligned(64)));
};
static _Thread_local struct gemm_scratch scratch;

// The L1d and L2 sizes the blocks are made for: cpuid's (csrc/cache_size.h), read once, or gemm_set_cache_bytes's.
static int64_t cache_detected[2], cache_override[2];

int64_t gemm_cache_bytes(int level) {
    if (level != 1 && level != 2) return 0;
    int64_t size = __atomic_load_n(&cache_override[level - 1], __ATOMIC_RELAXED);
    if (size > 0) return size;
    size = __atomic_load_n(&cache_detected[level - 1], __ATOMIC_RELAXED);
    if (size == 0) {  // every thread that gets here computes the same value
        size = cache_bytes(level);
        __atomic_store_n(&cache_detected[level - 1], size, __ATOMIC_RELAXED);
    }
    return size;
}

void gemm_set_cache_bytes(int level, int64_t bytes) {
    if (level == 1 || level == 2) __atomic_store_n(&cache_override[level - 1], bytes > 0 ? bytes : 0, __ATOMIC_RELAXED);
}

// On Zen 5, blocks of 1024 bytes made ResNet-101 about 3% faster in f32 and 1-2% in int8 than 512, which is
// what Zen 4's 32 KiB holds.
int64_t gemm_kc_bytes(void) {
    return GEMM_MR_MAX * GEMM_KC_BYTES_MAX <= gemm_cache_bytes(1) * 2 / 3 ? GEMM_KC_BYTES_MAX : GEMM_KC_BYTES_MIN;
}

// The pixel block's rows (of kc_bytes) and the output block's floats for this L2: a quarter of it each, so that
// the two and the weights streaming past fit it together (on Zen 4's 1 MiB: 480 rows of 512 bytes, as tuned
// there, and 64 Ki floats, which measured the same as 128 Ki), within what the thread's buffers hold.
struct gemm_blocks {
    int64_t nb, c_block;
};

static struct gemm_blocks gemm_blocks_for_l2(int64_t kc_bytes) {
    const int64_t quarter = gemm_cache_bytes(2) / 4;
    int64_t nb = quarter / kc_bytes / GEMM_NB_STEP * GEMM_NB_STEP;
    int64_t c_block = quarter / (int64_t) sizeof(float);
    nb = nb < GEMM_NB_MIN ? GEMM_NB_MIN : nb > GEMM_NB_MAX ? GEMM_NB_MAX : nb;
    c_block = c_block < GEMM_C_BLOCK_MAX / 8 ? GEMM_C_BLOCK_MAX / 8 : c_block > GEMM_C_BLOCK_MAX ? GEMM_C_BLOCK_MAX : c_block;
    return (struct gemm_blocks) { nb, c_block };
}

static int folds_override = -1;

int gemm_folds_broadcasts(void) {
    const int folded = __atomic_load_n(&folds_override, __ATOMIC_RELAXED);
    if (folded >= 0) return folded;
#ifdef GEMM_X86
    __builtin_cpu_init();
    return __builtin_cpu_is("amdfam19h");
#else
    return 0;
#endif
}

void gemm_set_folds_broadcasts(int folded) {
    __atomic_store_n(&folds_override, folded < 0 ? -1 : folded != 0, __ATOMIC_RELAXED);
}

const struct gemm_kernel * gemm_kernel_for(int path) {
#ifdef GEMM_X86
    switch (path) {
        case GEMM_AVX512: return gemm_folds_broadcasts() ? &gemm_kernel_avx512_folded : &gemm_kernel_avx512;
        case GEMM_AVX2: return &gemm_kernel_avx2;
        case GEMM_AVX512_BF16: return &gemm_kernel_avx512bf16;
        case GEMM_INT8_AVX512_VNNI: return &gemm_kernel_int8_avx512vnni;
        case GEMM_INT8_AVX2: return &gemm_kernel_int8_avx2;
        case GEMM_INT8_AVX_VNNI: return &gemm_kernel_int8_avxvnni;
    }
#endif
    return path == GEMM_INT8_SCALAR ? &gemm_kernel_int8_scalar : NULL;
}

int gemm_path_supported(int path) {
#ifdef GEMM_X86
    __builtin_cpu_init();
    switch (path) {
        case GEMM_AVX512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
        case GEMM_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        case GEMM_AVX512_BF16: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
        case GEMM_INT8_AVX512_VNNI:  // BW for put_u8's packs: every CPU with AVX512-VNNI has it
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
                   && __builtin_cpu_supports("avx512vnni");
        case GEMM_INT8_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        case GEMM_INT8_AVX_VNNI:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("avxvnni");
    }
#endif
    return path == GEMM_INT8_SCALAR;
}

// The op's product C = X W^T (+ epilogue), or its 16 Winograd products, over the output tiles [m0, m1) x
// [n0, n1) of this thread.
struct gemm_problem {
    const struct gemm_kernel * kern;
    struct patch_geom geo;  // where X's rows come from (Winograd: product 0's)
    size_t es;              // bytes per weight and pixel value
    int64_t kc;             // values of k per cache block: gemm_kc_bytes()'s, read once per computation
    int64_t M, K, Kp, N;    // Kp: the packed weights' K: K, rounded up to even for bf16, to a multiple of 4 for int8
    const char * w;         // packed weights; for Winograd the 3x3 ones, transformed per block into wbuf
    int wino;               // 16 Winograd products, X of each x_step bytes after the last's, sums in wpart
    size_t x_step;
    struct winograd_out wout;  // Winograd: its result and epilogue (the products' own have none)
    char * c;               // the result (not Winograd's)
    size_t c_es;            // its bytes per value: 4 (f32), 1 (int8's u8)
    const float * bias, * res;
    const uint8_t * res_u8;  // int8: a u8 residual instead of res, dequantized with res_q
    struct gemm_res_quant res_q;
    int relu;
    int dense_rows;         // X is a dense matrix of rows of K values (the image's pixels)...
    int in_place;           // ... read whole tiles in place, not copied
    int padded;             // windows copied from this thread's padded copy of the image (pad_image)...
    int direct;             // ... or (int8) read from it in place
    int nr;                 // pixels per tile: the kernel's nr, its nr_tall where that divides N, or its nr_row
    int skip_rows;          // direct windows, zero point 0, tiles each along one output row: see clip_window
    int64_t pad_w, pad_h;   // its width and height
    const struct patch_quant * quant;  // int8: how pixels become u8 (else NULL), and the epilogue's terms
    const struct patch_quant * out_q;  // int8: how the result becomes u8, or NULL for an f32 result
    float x_scale;
    const float * w_scale;
    const int32_t * colsum;
    struct gemm_scratch * sc;  // this thread's
};

// After a block's last row (`row`, past pixel n1 - 1), zero rows up to a whole tile where the block ends at N.
static void zero_tail_rows(char * row, const struct gemm_problem * pr, int64_t n0, int64_t n1, int64_t kc) {
    const int64_t nr = pr->nr;
    if (n1 == pr->N) memset(row, 0, (size_t) ((nr - (n1 - n0) % nr) % nr) * kc * pr->es);
}

// Copies values kb..kb+kc-1 (zeros past K) of pixels n0..n1-1 of geo's image to `dst` (in xbuf), rows of kc
// values of the path's type, with zero rows after N up to a whole tile: an f32 image is rounded to bf16 where
// the type is, quantized where it is u8; an image of that type already is copied.
static void pack_pixels(char * dst, const struct gemm_problem * pr, const struct patch_geom * geo, int64_t n0,
                        int64_t n1, int64_t kb, int64_t kc) {
    const size_t es = pr->es;
    const int64_t K = pr->K;
    const patch_put put = geo->nb0 == es ? NULL : es == 1 ? pr->kern->put_u8 : patch_put_bf16;
    const int64_t k1 = kb + kc < K ? kb + kc : K;
    char * row = dst;
    struct patch_at at = patch_at_of(geo, n0, kb);
    for (int64_t n = n0; n < n1; ++n, row += kc * es, patch_next(geo, &at)) {
        if (!pr->dense_rows) {
            patch_row(row, es, put, pr->quant, geo, &at, kb, k1);
        } else if (put) {  // one run
            put(row, geo->data + n * geo->nb1 + kb * geo->nb0, k1 - kb, pr->quant);
        } else {
            memcpy(row, geo->data + n * geo->nb1 + kb * geo->nb0, (k1 - kb) * es);
        }
        if (k1 - kb < kc) memset(row + (k1 - kb) * es, 0, (kc - (k1 - kb)) * es);  // times zero weights
    }
    zero_tail_rows(row, pr, n0, n1, kc);
}

// int8: the epilogue's terms of the tile of channels from m, zx * colsum[m] (only where zx is not 0: the tiles
// read it only then) and sx * sw[m] (one float product), into qcorr and qscale; zeros past M. Loops without
// tests, which vectorise: this runs for every tile of channels of every cache block.
static void quant_terms(const struct gemm_problem * pr, int64_t m) {
    const int64_t mr = pr->kern->mr, n = pr->M - m < mr ? pr->M - m : mr;
    const int zero = pr->quant->zero;
    const float sx = pr->x_scale;
    int32_t * corr = pr->sc->qcorr;
    float * scale = pr->sc->qscale;
    const int32_t * colsum = pr->colsum + m;
    const float * sw = pr->w_scale + m;
    for (int64_t i = 0; i < n; ++i) scale[i] = sx * sw[i];
    for (int64_t i = n; i < mr; ++i) scale[i] = 0.0f;
    if (zero == 0) return;
    for (int64_t i = 0; i < n; ++i) corr[i] = zero * colsum[i];
    for (int64_t i = n; i < mr; ++i) corr[i] = 0;
}

// The padded image (set_pixels) into pbuf: [C, pad_w, pad_h, B] values of the path's type, quantized as
// pixels are packed where an int8 path's image is f32; around it zeros (int8: the byte zx).
static void pad_image(const struct gemm_problem * pr) {
    const struct patch_geom * g = &pr->geo;
    const int64_t px = g->C * (int64_t) pr->es, row = pr->pad_w * px, B = pr->N / (g->OW * g->OH);  // px, row: bytes
    uint8_t * out = pr->sc->pbuf;
    const int zero = pr->quant ? pr->quant->zero : 0;
    for (int64_t n = 0; n < B; ++n) {
        for (int64_t y = 0; y < pr->pad_h; ++y, out += row) {
            const int64_t iy = y - g->pad;
            if (iy < 0 || iy >= g->H) {
                memset(out, zero, row);
                continue;
            }
            const char * src = g->data + n * g->nb3 + iy * g->nb2;
            memset(out, zero, g->pad * px);
            if (g->nb0 == pr->es) {
                memcpy(out + g->pad * px, src, g->W * px);
            } else {
                pr->kern->put_u8(out + g->pad * px, src, g->W * g->C, pr->quant);
            }
            memset(out + (g->pad + g->W) * px, zero, (pr->pad_w - g->pad - g->W) * px);
        }
    }
}

// Where the window at `at` starts in the padded image (pad_image).
static inline int64_t window_offset(const struct gemm_problem * pr, const struct patch_at * at) {
    const struct patch_geom * g = &pr->geo;
    return ((at->n * pr->pad_h + at->oy * g->stride) * pr->pad_w + at->ox * g->stride) * g->C;
}

// Where the windows of pixels px0..px1-1 start in the padded image, into xoff; past px1 up to a whole tile, px0's.
static void window_offsets(const struct gemm_problem * pr, int64_t px0, int64_t px1) {
    struct patch_at at = patch_at_of(&pr->geo, px0, 0);
    int32_t * off = pr->sc->xoff;
    for (int64_t n = px0; n < px1; ++n, patch_next(&pr->geo, &at)) off[n - px0] = (int32_t) window_offset(pr, &at);
    for (int64_t i = px1 - px0; i < px1 - px0 + GEMM_NR_MAX; ++i) off[i] = off[0];
}

// A direct block's pixel rows from k = kb (gemm_block's x, ldx, krun, krest and kjump): the padded image's row of
// window taps kb / krun.
static void window_rows(const struct gemm_problem * pr, struct gemm_block * b, int64_t kb) {
    const int64_t krun = pr->geo.kw * pr->geo.C, row_bytes = pr->pad_w * pr->geo.C;
    b->x = (const char *) pr->sc->pbuf + kb / krun * row_bytes;
    b->ldx = pr->geo.stride * pr->geo.C;
    b->krun = krun;
    b->krest = krun - kb % krun;
    b->kjump = row_bytes;
}

// A direct tile's part of K block kb (b: the block's) where its pixels lie along one output row (skip_rows): only
// the kernel rows that reach into the image, and for its first and last pixels only the kernel columns that do
// (cseg, lcols, rcols), since the others multiply the padding's zeros (zero point 0) and integer sums are the
// same bits without them; its first and last k are the epilogue's. Whether any is left.
static int clip_window(const struct gemm_problem * pr, struct gemm_block * b, int64_t n, int64_t kb) {
    const struct patch_geom * g = &pr->geo;
    const int64_t iy = (n / g->OW) % g->OH * g->stride - g->pad, krun = g->kw * g->C;
    const int64_t r0 = (iy < 0 ? -iy : 0) * krun, r1 = (g->H - iy < g->kh ? g->H - iy : g->kh) * krun;
    const int64_t k0 = kb > r0 ? kb : r0, k1 = kb + b->kc < r1 ? kb + b->kc : r1;
    if (k0 >= k1) return 0;
    b->w = (const char *) b->w + 16 * (k0 - kb) * pr->es;
    b->kc = k1 - k0;
    b->first = k0 == r0;
    b->last = k1 == r1;
    window_rows(pr, b, k0);
    const int64_t ix0 = n % g->OW * g->stride - g->pad, ix1 = ix0 + (b->nr - 1) * g->stride;  // first, last pixel's
    b->cseg = g->C;
    b->lcols = ix0 < 0 ? (int) (-ix0 < g->kw ? -ix0 : g->kw) : 0;
    b->rcols = ix1 + g->kw > g->W ? (int) (ix1 + g->kw - g->W < g->kw ? ix1 + g->kw - g->W : g->kw) : 0;
    return 1;
}

// pack_padded's rows where they are whole windows of short rows (the stem's 7 of 21 u8 or 84 f32 values): per
// pixel, kh moves of `move` bytes (32 or GEMM_COPY_SLACK, a constant in each inlined copy), each row's excess
// overwritten by the next row's, then zeros up to Kp (times zero weights) in place of the last one's excess,
// except for int8: whatever bytes are there (the excess, or the buffer's earlier ones) times zero weights is 0.
static inline __attribute__((always_inline)) void pack_windows(char * dst, const struct gemm_problem * pr, int64_t n0,
                                                               int64_t n1, size_t move) {
    const struct patch_geom * g = &pr->geo;
    const size_t es = pr->es, run = g->kw * g->C * es, row_bytes = pr->pad_w * g->C * es;
    const size_t k_bytes = g->kh * run, kp_bytes = pr->Kp * es;
    struct patch_at at = patch_at_of(g, n0, 0);
    char * row = dst;
    for (int64_t n = n0; n < n1; ++n, row += kp_bytes, patch_next(g, &at)) {
        const char * win = (const char *) pr->sc->pbuf + window_offset(pr, &at) * es;
        for (int64_t ky = 0; ky < g->kh; ++ky) memcpy(row + ky * run, win + ky * row_bytes, move);
        if (es > 1 && k_bytes < kp_bytes) memset(row + k_bytes, 0, kp_bytes - k_bytes);  // bf16: one value
    }
    zero_tail_rows(row, pr, n0, n1, pr->Kp);
}

// pack_pixels's rows from the padded image, where the tiles cannot read it in place (set_pixels): each window
// row's values in the block one run, copied without a test of the image's edges; whole windows of short rows
// by pack_windows.
static void pack_padded(char * dst, const struct gemm_problem * pr, int64_t n0, int64_t n1, int64_t kb, int64_t kc) {
    const struct patch_geom * g = &pr->geo;
    const size_t es = pr->es;
    const int64_t krun = g->kw * g->C, row_bytes = pr->pad_w * g->C * es, k1 = kb + kc < pr->K ? kb + kc : pr->K;
    if (kb == 0 && k1 == pr->K && krun * es <= GEMM_COPY_SLACK) {  // then kc is Kp
        if (krun * es <= 32) {
            pack_windows(dst, pr, n0, n1, 32);
        } else {
            pack_windows(dst, pr, n0, n1, GEMM_COPY_SLACK);
        }
        return;
    }
    struct patch_at at = patch_at_of(g, n0, 0);
    char * row = dst;
    for (int64_t n = n0; n < n1; ++n, row += kc * es, patch_next(g, &at)) {
        const char * win = (const char *) pr->sc->pbuf + window_offset(pr, &at) * es;
        char * out = row;
        for (int64_t k = kb, ky = kb / krun, kk = kb % krun; k < k1; ++ky, kk = 0) {
            const int64_t run = krun - kk < k1 - k ? krun - kk : k1 - k;
            patch_copy(out, win + ky * row_bytes + kk * es, run * es);
            out += run * es;
            k += run;
        }
        if (k1 - kb < kc) memset(out, 0, (kc - (k1 - kb)) * es);  // times zero weights
    }
    zero_tail_rows(row, pr, n0, n1, kc);
}

// The weights of the tile at channel m for k block kb (of product t for Winograd), and the distance between its
// two panels: in the packed weights, or for Winograd in wbuf[t], transformed; a corner of G g G^T is one tap
// of g, read in place.
static const void * block_weights(const struct gemm_problem * pr, int64_t m, int64_t kb, int64_t kc, int t,
                                  int64_t * w_panel) {
    const int a = t / 4, b = t % 4;
    const int64_t k_stored = pr->wino ? 9 * pr->K : pr->Kp;  // k per stored panel
    const char * panels = pr->w + (m / 16) * 16 * k_stored * pr->es;
    *w_panel = 16 * k_stored;
    if (!pr->wino) return panels + 16 * kb * pr->es;
    if (a % 3 == 0 && b % 3 == 0) return panels + 16 * ((a / 3 * 6 + b / 3 * 2) * pr->K + kb) * pr->es;
    *w_panel = 16 * kc;
    return pr->sc->wbuf[t];
}

// Where the sums of a block of pixels and channels go between K's cache blocks: the result itself (f32), or
// (a u8 result) `part`, rows of ld floats from pixel px0 and channel m0; for Winograd wpart, each product's
// t_step floats after the last's, where they stay for the output transform.
struct gemm_partials {
    float * part;
    int64_t ld, px0, m0, t_step;
};

// The tiles of pixels px0..px1-1 for one tile of channels (b: weights, epilogue and K block set; direct windows'
// x too), X in place before packed0, from `packed` after it, the result at `out`: whole tiles, then the last
// pixels in one a pixel wider (one left over, N = 49) or in narrower ones (N = 196 leaves 4).
static void run_tiles(const struct gemm_problem * pr, struct gemm_block * b, const struct gemm_partials * sums,
                      const char * x, const char * packed, char * out, int64_t m, int64_t px0, int64_t px1,
                      int64_t packed0, int64_t kb) {
    const struct gemm_kernel * kern = pr->kern;
    const int nr = pr->nr;
    for (int64_t n = px0; n < px1;) {
        const int height = px1 - n == nr + 1 && kern->tile_wide && nr == kern->nr ? nr + 1
                           : px1 - n >= nr ? nr : kern->nr_narrow;
        if (pr->direct) {
            b->xoff = pr->sc->xoff + (n - px0);
        } else if (n < packed0) {
            b->x = x + n * pr->geo.nb1 + kb * pr->es;
            b->ldx = pr->K;
        } else {
            b->x = packed + (n - packed0) * b->kc * pr->es;
            b->ldx = b->kc;
        }
        b->out = out + (n * pr->M + m) * pr->c_es;
        b->ldo = pr->M;
        b->c = sums->part ? sums->part + (n - sums->px0) * sums->ld + (m - sums->m0) : b->out;
        b->ldc = sums->part ? sums->ld : pr->M;
        if (pr->wino) {  // the products' results stay in wpart, for the output transform
            b->out = b->c;
            b->ldo = b->ldc;
        }
        b->res = pr->res ? pr->res + n * pr->M + m : NULL;
        b->res_u8 = pr->res_u8 ? pr->res_u8 + n * pr->M + m : NULL;
        b->nr = px1 - n < height ? (int) (px1 - n) : height;
        void (*tile)(const struct gemm_block *) = height < nr ? kern->tile_narrow : height > nr ? kern->tile_wide
                                                  : nr == kern->nr ? kern->tile
                                                  : nr == kern->nr_tall ? kern->tile_tall : kern->tile_row;
        struct gemm_block clipped;
        if (!pr->skip_rows) {
            tile(b);
        } else if (clipped = *b, clip_window(pr, &clipped, n, kb)) {
            tile(&clipped);
        }
        n += height;
    }
}

// Pixels px0..px1-1 by the tiles of channels mt0..mt1-1: each K block of the pixels packed (see in_place), then
// multiplied by each tile of channels' weights.
static void pixel_block(const struct gemm_problem * pr, const struct gemm_partials * sums, int64_t mt0, int64_t mt1,
                        int64_t px0, int64_t px1) {
    const int mr = pr->kern->mr, nr = pr->nr, products = pr->wino ? 16 : 1;
    const size_t es = pr->es;
    const int64_t KC = pr->kc;
    // Pixels read in place (see in_place) up to the last whole tile; the rest, and every pixel otherwise,
    // from the thread's buffer, each product's in its own part of it: in place, at most a tile's worth
    // (zero-padded), so Winograd's 16 fit; copied, the whole block, and only single products copy. Direct
    // windows (set_pixels) are all read from the padded image.
    const int64_t packed0 = pr->direct ? px1 : pr->in_place ? px0 + (px1 - px0) / nr * nr : px0;
    const int64_t packed_rows = (px1 - packed0 + nr - 1) / nr * nr;
    if (pr->direct) window_offsets(pr, px0, px1);
    for (int64_t kb = 0; kb < pr->Kp; kb += KC) {
        const int64_t kc = pr->Kp - kb < KC ? pr->Kp - kb : KC;
        for (int t = 0; t < products && packed0 < px1; ++t) {
            struct patch_geom geo = pr->geo;
            geo.data += t * pr->x_step;
            char * dst = (char *) pr->sc->xbuf + t * packed_rows * kc * es;
            pr->padded ? pack_padded(dst, pr, packed0, px1, kb, kc) : pack_pixels(dst, pr, &geo, packed0, px1, kb, kc);
        }
        for (int64_t mt = mt0; mt < mt1; ++mt) {
            const int64_t m = mt * mr;
            // Read only by the epilogues: K's last block's, or with skip_rows any block's.
            if (pr->quant && (kb + kc == pr->Kp || pr->skip_rows)) quant_terms(pr, m);
            if (pr->wino) {
                const float * w3 = (const float *) pr->w + (m / 16) * 16 * 9 * pr->K;  // the 3x3 panels
                winograd_weights(pr->sc->wbuf[0], sizeof pr->sc->wbuf[0] / sizeof(float), w3, pr->K, kb, kc);
            }
            // The products in turn (Winograd's reusing the weights just made), each over this pixel block.
            for (int t = 0; t < products; ++t) {
                int64_t w_panel;
                struct gemm_block b = {
                    .w = block_weights(pr, m, kb, kc, t, &w_panel), .w_panel = w_panel,
                    .kc = kc, .mr = pr->M - m < mr ? (int) (pr->M - m) : mr, .out_q = pr->out_q,
                    .first = kb == 0, .last = kb + kc == pr->Kp,
                    .bias = pr->bias ? pr->bias + m : NULL,
                    .relu = pr->relu, .corr = pr->quant && pr->quant->zero ? pr->sc->qcorr : NULL,
                    .scale = pr->sc->qscale, .res_q = pr->res_q,
                };
                if (pr->direct) window_rows(pr, &b, kb);
                // Weights stream from memory once per block: ask for the next tile's while this one computes:
                // the next channels', else the next K block's first, else the first K block of the channels
                // after these (a thread's next chunk, gemm_share), or of these again (the next pixels). Winograd's
                // are made in wbuf.
                if (!pr->wino) {
                    int64_t next_m = m + mr, next_kb = kb;
                    if (mt + 1 == mt1) {
                        next_kb = kb + KC < pr->Kp ? kb + KC : 0;
                        next_m = next_kb > 0 || mt1 * mr >= pr->M ? mt0 * mr : mt1 * mr;
                    }
                    b.next_w = pr->w + ((next_m / 16) * 16 * pr->Kp + 16 * next_kb) * es;
                }
                struct gemm_partials st = *sums;
                if (st.part) st.part += t * st.t_step;
                run_tiles(pr, &b, &st, pr->geo.data + t * pr->x_step,
                          (const char *) pr->sc->xbuf + t * packed_rows * kc * es, pr->c, m, px0, px1, packed0, kb);
            }
        }
    }
}

// Winograd: the output transform (and epilogue) of tiles sums->px0..px1-1, channels sums->m0..m1-1, from their
// products' sums in wpart.
static void winograd_outputs(const struct gemm_problem * pr, const struct gemm_partials * sums, int64_t px1,
                             int64_t m1) {
    for (int64_t n = sums->px0; n < px1; ++n) {
        winograd_output_tile(&pr->wout, n, sums->part + (n - sums->px0) * sums->ld, sums->t_step, sums->m0, m1);
    }
}

static void gemm_tiles(const struct gemm_problem * pr, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    const int mr = pr->kern->mr, nr = pr->nr;
    const int64_t N = pr->N, KC = pr->kc;
    // The block's output is read again by each K block after the first, so should stay in L2 (for Winograd,
    // only one product's: making the weights again for smaller blocks costs more than L3 does).
    const struct gemm_blocks bl = gemm_blocks_for_l2(KC * (int64_t) pr->es);
    int64_t nb_tiles = pr->Kp <= KC ? bl.nb / nr : bl.c_block / ((m1 - m0) * mr * nr);
    const int64_t nb_max = pr->wino && GEMM_WINO_NB < bl.nb ? GEMM_WINO_NB / nr : bl.nb / nr;
    nb_tiles = nb_tiles < 1 ? 1 : nb_tiles > nb_max ? nb_max : nb_tiles;
    // Blocks of equal size: each block reads all of its weights again, and a last block of a few pixels
    // would do that for almost no work (ResNet-101's 2048 x 1024 conv at 7x7: blocks of 48 pixels and 1).
    const int64_t n_blocks = (n1 - n0 + nb_tiles - 1) / nb_tiles;
    nb_tiles = (n1 - n0 + n_blocks - 1) / n_blocks;
    // A u8 result's partial sums go to qpart, as many tiles of channels at a time as fit it (all, but for
    // thousands of channels); Winograd's to wpart, one tile of channels at a time where K is one block (the
    // output transform then reads them while they are fresh in cache), else as many as fit.
    const int partials = pr->out_q && pr->Kp > KC;
    int64_t mt_block = partials ? bl.c_block / (nb_tiles * nr * mr) : m1 - m0;
    if (pr->wino) mt_block = pr->Kp <= KC ? 1 : GEMM_WINO_NB * GEMM_MR_MAX / (nb_tiles * nr * mr);
    mt_block = mt_block < 1 ? 1 : mt_block;
    for (int64_t nb = n0; nb < n1; nb += nb_tiles) {
        const int64_t nb_end = nb + nb_tiles < n1 ? nb + nb_tiles : n1;
        const int64_t px0 = nb * nr, px1 = nb_end * nr < N ? nb_end * nr : N;
        for (int64_t mt = m0; mt < m1; mt += mt_block) {
            const int64_t mt_end = mt + mt_block < m1 ? mt + mt_block : m1;
            const int64_t ld = (mt_end - mt) * mr;
            const struct gemm_partials sums = {
                pr->wino ? pr->sc->wpart : partials ? pr->sc->qpart : NULL, ld, px0, mt * mr, (nb_end - nb) * nr * ld,
            };
            pixel_block(pr, &sums, mt, mt_end, px0, px1);
            if (pr->wino) winograd_outputs(pr, &sums, px1, mt_end * mr < pr->M ? mt_end * mr : pr->M);
        }
    }
}

// Where the problem's pixel rows X come from (pr->geo, for Winograd pr->N and the products' steps too), whether
// they are read in place, and the tile height that suits them (pr->nr, pr->skip_rows: they need N and the geometry).
static void set_pixels(struct gemm_problem * pr, const struct ggml_tensor * dst, int kh) {
    const struct ggml_tensor * x = dst->src[1];
    if (pr->wino) {  // 16 products of [M, C] x [C, T], one per slice of x and of the result
        const int64_t ne[4] = { x->ne[0], x->ne[1], 1, 1 };
        const size_t nb[4] = { x->nb[0], x->nb[1], x->nb[2], x->nb[2] };
        pr->geo = patch_geom_of(x->data, ne, nb, x->ne[0], 1, 1, 1, 0);
        pr->N = x->ne[1];
        pr->x_step = x->nb[2];
    } else {
        pr->geo = patch_geom_of(x->data, x->ne, x->nb, x->ne[0], kh, kh, op_param(dst, GP_STRIDE),
                                 op_param(dst, GP_PAD));
    }
    // A 1x1 stride-1 conv's pixels are already rows of K values: copying them would only cost time, except
    // where rows GEMM_ALIAS_BYTES apart make the tile's loads collide in L1, or where they must be converted
    // (to bf16, or quantized for int8): those are copied a row at a time. Winograd's (winograd_input's dense
    // [C, T, 16] result) are always read in place: its 16 products' whole blocks would not fit the buffer.
    const struct patch_geom * geo = &pr->geo;
    pr->dense_rows = geo->kh == 1 && geo->stride == 1 && geo->pad == 0 && geo->nb1 == pr->K * geo->nb0
                     && geo->nb2 == geo->W * geo->nb1 && (geo->nb3 == geo->H * geo->nb2 || dst->ne[3] == 1);
    pr->in_place = pr->wino || (pr->dense_rows && geo->nb0 == pr->es && pr->K == pr->Kp
                                && geo->nb1 % GEMM_ALIAS_BYTES != 0);
    // int8 windows of more than one pixel come from a padded copy of the image, made once per thread (a ninth or
    // less of what copying each window makes), where it fits the buffer: read in place where the tiles' pairs
    // of pixel rows (GEMM_INT8_XGROUP) stay on one output row (its width even, or each tile on one row) and a
    // group of 4 k within a window row (channels a multiple of 4), else copied into blocks (pack_padded). So are
    // other paths' windows of short rows (the stem's), where the copy holds the path's type; for long rows,
    // patch_row's one copy per row costs less than each thread's copy of the image (ResNet-101 f32, batch 1:
    // 1-2% slower).
    pr->pad_w = geo->W + 2 * geo->pad;
    pr->pad_h = geo->H + 2 * geo->pad;
    pr->padded = !pr->wino && geo->kh > 1 && geo->nb1 == geo->C * geo->nb0
                 && (pr->es == 1 || (geo->nb0 == pr->es && geo->kw * geo->C * (int64_t) pr->es <= GEMM_COPY_SLACK))
                 && pr->pad_w * pr->pad_h * geo->C * (pr->N / (geo->OW * geo->OH)) * (int64_t) pr->es <= GEMM_PAD_BYTES;
    const int windows = pr->padded && pr->es == 1 && geo->C % 4 == 0;
    const struct gemm_kernel * kern = pr->kern;
    pr->nr = kern->nr_tall && pr->N % kern->nr_tall == 0 ? kern->nr_tall : kern->nr;
    // Windows with zero point 0 on rows that the row tile covers and the others do not (7 x 7): that tile, whose
    // windows then skip the padding too (skip_rows). Layer4's 3x3 convs: 11% faster (batch 8, one thread).
    if (windows && pr->quant->zero == 0 && kern->nr_row && geo->OW % kern->nr_row == 0 && geo->OW % pr->nr != 0) {
        pr->nr = kern->nr_row;
    }
    pr->direct = windows && (geo->OW % GEMM_INT8_XGROUP == 0 || geo->OW % pr->nr == 0);
    pr->skip_rows = pr->direct && pr->quant->zero == 0 && geo->OW % pr->nr == 0;
}


// Chunks of work per thread (more balance the threads finer, fewer repack a conv's pixels less often), and the
// claims record's bits for chunks: the other 12 count the threads done (up to 4095, above MAX_THREADS).
#define GEMM_CHUNKS 4
#define GEMM_CLAIM_BITS 20

// Takes chunk c for this thread: whether no other thread had.
static int gemm_claim(uint32_t * claims, int c) {
    return !(__atomic_fetch_or(claims, 1u << c, __ATOMIC_ACQ_REL) & (1u << c));
}

// Chunk c of the run of chunks r0..r1-1 that thread_range gives one thread, over the other dimension whole
// (nothing where it is empty: a short run). The run covers its equal share of the split dimension's `units`
// tiles; each chunk but the last is half of what is left of the run (4 chunks: 1/2, 1/4, 1/8, 1/8), so the
// chunks a thread done with its own takes first, from the run's end, are small and leave it little to wait for
// at the barrier after the op (about 1% faster on Zen 5 than equal chunks, f32 and int8).
static void gemm_chunk(const struct gemm_problem * pr, int split_m, int64_t units, int chunks, int64_t r0, int64_t r1,
                       int64_t c, int64_t m_tiles, int64_t n_tiles) {
    const int64_t end = units * r1 / chunks, len = end - units * r0 / chunks;  // the run's tiles
    const int64_t u0 = end - (len >> (c - r0)), u1 = c + 1 == r1 ? end : end - (len >> (c + 1 - r0));
    if (u0 == u1) return;
    if (split_m) {
        gemm_tiles(pr, u0, u1, 0, n_tiles);
    } else {
        gemm_tiles(pr, 0, m_tiles, u0, u1);
    }
}

// Thread ith's part of the product (claims: the op's record of taken chunks, zero between computations).
static void gemm_share(const struct gemm_problem * pr, uint32_t * claims, int ith, int nth) {
    const int mr = pr->kern->mr, nr = pr->nr;
    const int64_t m_tiles = (pr->M + mr - 1) / mr, n_tiles = (pr->N + nr - 1) / nr;

    if (nth == 1) {
        gemm_tiles(pr, 0, m_tiles, 0, n_tiles);
        return;
    }
    // Never split K (it fixes the sums' order). Each thread's share is a run of chunks (GEMM_CHUNKS per thread)
    // that it takes in order; a thread done with its own takes the chunks another has not started, from the end
    // of that one's run. So a thread that gets less of its CPU (another process on it, or a VM host's other
    // tenants) holds the rest up for a chunk, not for its whole share. Every output is still summed by one
    // thread over all of K, in the same order.
    // Split output channels or pixels, whichever gives the busiest thread less work (on a tie: channels where
    // they outnumber pixels, so that each thread reads the smaller of weights and pixels whole); but pixels
    // packed as they are read are split wherever they are enough for every chunk, since each chunk of channels
    // would pack all of them again (where channels are split all the same, each thread takes one chunk).
    const int64_t by_m = (m_tiles + nth - 1) / nth * n_tiles, by_n = (n_tiles + nth - 1) / nth * m_tiles;
    const int split_m = (pr->in_place || pr->direct || n_tiles < (int64_t) GEMM_CHUNKS * nth)
                        && (by_m < by_n || (by_m == by_n && pr->M >= pr->N));
    const int64_t units = split_m ? m_tiles : n_tiles;
    const int per_thread = pr->in_place || pr->direct || !split_m ? GEMM_CHUNKS : 1;
    int chunks = per_thread * nth < GEMM_CLAIM_BITS ? per_thread * nth : GEMM_CLAIM_BITS;
    if (units < chunks) chunks = (int) units;
    int64_t c0, c1;  // this thread's chunks
    thread_range(chunks, ith, nth, &c0, &c1);
    for (int64_t c = c0; c < c1 && gemm_claim(claims, (int) c); ++c) {
        gemm_chunk(pr, split_m, units, chunks, c0, c1, c, m_tiles, n_tiles);
    }
    for (int t = 1; t < nth; ++t) {
        int64_t o0, o1;
        thread_range(chunks, (ith + t) % nth, nth, &o0, &o1);
        for (int64_t c = o1 - 1; c >= o0; --c) {
            if (gemm_claim(claims, (int) c)) gemm_chunk(pr, split_m, units, chunks, o0, o1, c, m_tiles, n_tiles);
        }
    }
    // The last thread out clears the record for the next computation (which starts after ggml's barrier).
    if (__atomic_fetch_add(claims, 1u << GEMM_CLAIM_BITS, __ATOMIC_ACQ_REL) >> GEMM_CLAIM_BITS == (uint32_t) nth - 1) {
        __atomic_store_n(claims, 0, __ATOMIC_RELEASE);
    }
}

static void gemm_run(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const struct ggml_tensor * w = dst->src[0];
    const struct ggml_tensor * x = dst->src[1];
    const int flags = op_param(dst, GP_FLAGS), wino = (flags & GF_WINO) != 0, has_bias = (flags & GF_BIAS) != 0;
    const int kh = wino ? 1 : op_param(dst, GP_KH);
    const struct gemm_kernel * kern = gemm_kernel_for(op_param(dst, GP_PATH));
    // int8: the weights' scales and column sums come before the epilogue's operands.
    const int quant = kern->es == 1, extra = quant ? 4 : 2;
    const float x_scale = op_param_f32(dst, GP_X_SCALE);
    const int zeros = op_param(dst, GP_ZEROS);
    const struct patch_quant q = { quant ? 1.0f / x_scale : 0.0f, zeros & 0xff };
    const float y_scale = op_param_f32(dst, GP_Y_SCALE);  // as x_scale: the next product's 1 / sx, bit for bit
    const struct patch_quant qy = { y_scale != 0.0f ? 1.0f / y_scale : 0.0f, (zeros >> 8) & 0xff };
    const float r_scale = op_param_f32(dst, GP_R_SCALE);
    const void * res = flags & GF_RES ? dst->src[extra + has_bias]->data : NULL;
    struct gemm_problem pr = {
        .kern = kern, .es = kern->es, .kc = gemm_kc_bytes() / (int64_t) kern->es,
        .M = dst->ne[0], .K = (int64_t) kh * kh * x->ne[0],
        .Kp = wino ? x->ne[0] : w->ne[1] * (int64_t) ggml_type_size(w->type) / kern->es,
        .N = dst->ne[1] * dst->ne[2] * dst->ne[3], .w = w->data, .wino = wino,
        .c = dst->data, .c_es = ggml_type_size(dst->type),
        .bias = has_bias ? (const float *) dst->src[extra]->data : NULL,
        .res = r_scale == 0.0f ? res : NULL, .res_u8 = r_scale != 0.0f ? res : NULL,
        .res_q = { r_scale, (zeros >> 16) & 0xff },
        .relu = (flags & GF_RELU) != 0,
        .quant = quant ? &q : NULL, .out_q = y_scale != 0.0f ? &qy : NULL, .x_scale = x_scale,
        .w_scale = quant ? (const float *) dst->src[2]->data : NULL,
        .colsum = quant ? (const int32_t *) dst->src[3]->data : NULL,
        .sc = &scratch,
    };
    if (wino) {  // the epilogue is the output transform's
        pr.wout = (struct winograd_out) {
            dst->data, dst->nb[1], dst->nb[2], dst->nb[3], dst->ne[1], dst->ne[2], pr.bias, (const char *) res, pr.relu,
        };
        pr.bias = NULL;
        pr.res = NULL;
        pr.relu = 0;
    }
    set_pixels(&pr, dst, kh);
    if (pr.padded) pad_image(&pr);
    gemm_share(&pr, (uint32_t *) dst->op_params + OP_PARAMS_FIRST + GP_CLAIMS, ith, nth);
}

// int8's quantization of the pixels (x), of a u8 result (y; scale 0: f32) and of a u8 residual (r; scale 0: f32).
struct gemm_quant_args {
    float x_scale;
    int x_zero;
    float y_scale;
    int y_zero;
    float r_scale;
    int r_zero;
};

// A convolution's product: args holds w, x (for Winograd, winograd_input's v) and (int8) the scales and column
// sums; bias and residual follow. The result is shaped by the convolution of `image` (x itself, or what v was
// made from); `wino`: Winograd's 16 products (gemm_winograd).
static struct ggml_tensor * gemm_conv(struct ggml_context * ctx, struct ggml_tensor ** args, int n_args,
                                      const struct ggml_tensor * image, int64_t m, int kh, int stride, int pad,
                                      struct ggml_tensor * bias, struct ggml_tensor * residual, int relu, int wino,
                                      int path, struct gemm_quant_args qa) {
    if (bias) args[n_args++] = bias;
    if (residual) args[n_args++] = residual;
    const int32_t params[GP_N_PARAMS] = {
        [GP_PATH] = path, [GP_KH] = kh, [GP_STRIDE] = stride, [GP_PAD] = pad,
        [GP_FLAGS] = (bias ? GF_BIAS : 0) | (residual ? GF_RES : 0) | (relu ? GF_RELU : 0) | (wino ? GF_WINO : 0),
        [GP_X_SCALE] = op_param_of_f32(qa.x_scale), [GP_Y_SCALE] = op_param_of_f32(qa.y_scale),
        [GP_R_SCALE] = op_param_of_f32(qa.r_scale), [GP_ZEROS] = qa.x_zero | qa.y_zero << 8 | qa.r_zero << 16,
    };
    const int64_t OW = (image->ne[1] + 2 * pad - kh) / stride + 1, OH = (image->ne[2] + 2 * pad - kh) / stride + 1;
    const enum ggml_type type = qa.y_scale != 0.0f ? GGML_TYPE_I8 : GGML_TYPE_F32;
    return op_params_set(ggml_custom_4d(ctx, type, m, OW, OH, image->ne[3], args, n_args, gemm_run,
                                        GGML_N_TASKS_MAX, NULL), params, GP_N_PARAMS);
}

struct ggml_tensor * gemm_packed(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * x,
                                 int64_t m, int kh, int stride, int pad, struct ggml_tensor * bias,
                                 struct ggml_tensor * residual, int relu, int path) {
    struct ggml_tensor * args[4] = { w, x };
    const struct gemm_quant_args none = { 0 };
    return gemm_conv(ctx, args, 2, x, m, kh, stride, pad, bias, residual, relu, 0, path, none);
}

struct ggml_tensor * gemm_int8(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * x, int64_t m,
                               int kh, int stride, int pad, struct ggml_tensor * scales, struct ggml_tensor * colsums,
                               float x_scale, int x_zero, struct ggml_tensor * bias, struct ggml_tensor * residual,
                               float r_scale, int r_zero, int relu, float y_scale, int y_zero, int path) {
    struct ggml_tensor * args[6] = { w, x, scales, colsums };
    const struct gemm_quant_args qa = { x_scale, x_zero, y_scale, y_zero, r_scale, r_zero };
    return gemm_conv(ctx, args, 4, x, m, kh, stride, pad, bias, residual, relu, 0, path, qa);
}

struct ggml_tensor * gemm_winograd(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * v,
                                   struct ggml_tensor * x, int64_t m, struct ggml_tensor * bias,
                                   struct ggml_tensor * residual, int relu, int path) {
    struct ggml_tensor * args[4] = { w, v };
    const struct gemm_quant_args none = { 0 };
    return gemm_conv(ctx, args, 2, x, m, 3, 1, 1, bias, residual, relu, 1, path, none);
}

#include "gemm.h"

#include <stdint.h>
#include <string.h>

#include "gemm_tile.h"
#include "isa_clones.h"
#include "patch_row.h"
#include "thread_range.h"

// Cache blocks: GEMM_KC values of k for f32, as many bytes of bf16 (the weights' tile reused from L1), of up to
// GEMM_NB pixels (240 KB of X, copied once per block into a thread's buffer, or read in place, and kept in L2
// while every weight tile passes over it), fewer when the thread's channels are many so that the block's
// output, GEMM_C_BLOCK floats at most, stays in L2 across its K blocks. They order the work, not the
// arithmetic. A block holds whole summation blocks (GEMM_KS for f32, GEMM_KS_BF16 for bf16); GEMM_NB is a
// multiple of every path's tile heights. Pixel rows GEMM_ALIAS_BYTES apart are always copied (see in_place).
#define GEMM_KC 128
#define GEMM_NB 480
#define GEMM_C_BLOCK (128 * 1024)
#define GEMM_ALIAS_BYTES 4096
// The buffer also holds the last partial tile of each of Winograd's 16 products (read in place otherwise).
_Static_assert(16 * 12 <= GEMM_NB, "16 partial tiles (each padded to a tile of at most 12 pixels) fit xbuf");

// Op parameters, packed into the userdata pointer so nothing needs freeing.
#define P_PATH(u) ((int) ((uintptr_t) (u) & 0xf))
#define P_RELU(u) ((int) (((uintptr_t) (u) >> 4) & 1))
#define P_BIAS(u) ((int) (((uintptr_t) (u) >> 5) & 1))
#define P_RES(u) ((int) (((uintptr_t) (u) >> 6) & 1))
#define P_KH(u) ((int) (((uintptr_t) (u) >> 8) & 0xf))
#define P_STRIDE(u) ((int) (((uintptr_t) (u) >> 12) & 0xf))
#define P_PAD(u) ((int) (((uintptr_t) (u) >> 16) & 0xf))
#define P_WINO(u) ((int) (((uintptr_t) (u) >> 7) & 1))

// A thread's copy of the current block of pixels: rows of kc values (the path's type), zero rows after N;
// and, for Winograd, the current tile's transformed weights for each of the 16 products: two panels of kc x 16
// each (the four corners' stay unused: they are read in place).
static _Thread_local float xbuf[GEMM_NB * GEMM_KC] __attribute__((aligned(64)));
static _Thread_local float wbuf[16][2 * GEMM_KC * 16] __attribute__((aligned(64)));

static const struct gemm_kernel * kernel_for(int path) {
#ifdef GEMM_X86
    switch (path) {
        case GEMM_AVX512: return &gemm_kernel_avx512;
        case GEMM_AVX2: return &gemm_kernel_avx2;
        case GEMM_AVX512_BF16: return &gemm_kernel_avx512bf16;
    }
#endif
    (void) path;
    return NULL;
}

int gemm_path_supported(int path) {
#ifdef GEMM_X86
    __builtin_cpu_init();
    switch (path) {
        case GEMM_AVX512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
        case GEMM_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        case GEMM_AVX512_BF16: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
    }
#endif
    (void) path;
    return 0;
}

// Copies values kb..kb+kc-1 (zeros past K) of pixels n0..n1-1 to `dst` (in xbuf), rows of kc values, with zero
// rows after N up to a whole tile of `nr`. es: bytes per value in xbuf (the weights'); an f32 image is rounded
// to bf16 where es is 2.
static void pack_pixels(char * dst, const struct patch_geom * geo, int64_t K, int64_t N, int64_t n0, int64_t n1,
                        int64_t kb, int64_t kc, int nr, size_t es) {
    const patch_put put = es == sizeof(float) ? patch_put_f32 : geo->nb0 == es ? patch_put_bf16_copy : patch_put_bf16;
    const int64_t k1 = kb + kc < K ? kb + kc : K;
    char * row = dst;
    for (int64_t n = n0; n < n1; ++n, row += kc * es) {
        patch_row(row, es, put, geo, n, kb, k1);
        if (k1 - kb < kc) memset(row + (k1 - kb) * es, 0, (kc - (k1 - kb)) * es);
    }
    if (n1 == N) memset(row, 0, (size_t) ((nr - (n1 - n0) % nr) % nr) * kc * es);
}

// Winograd F(2x2, 3x3) weights of every product t = 4a + b but the corners, U_t = (G g G^T)[a][b], for k (input
// channels) kb..kb+kc-1 of the two panels of 3x3 weights at w (packed as above, K = 9 C, k = (ky, kx, c)), made
// into wbuf[t]: panels kc * 16 floats apart, each k-major. G's rows are (1 0 0), (1 1 1)/2, (1 -1 1)/2, (0 0 1);
// the halving is exact, so each value is rounded by its sums only, in this order whatever the path: each row
// of g combined by G's row b, then those three by G's row a. All 16 are made together, each row combination
// once, from the 9 taps read once. Written over whole 16-lane vectors (one panel's channels, 64 bytes),
// which GCC maps to the widest registers the build targets: element-wise loops were left scalar.
typedef float wino_vec __attribute__((vector_size(64), aligned(4)));

// Row s of G times (v0, v1, v2).
static inline wino_vec wino_comb(int s, wino_vec v0, wino_vec v1, wino_vec v2) {
    switch (s) {
        case 0: return v0;
        case 1: return (v0 + v1 + v2) * 0.5f;
        case 2: return (v0 - v1 + v2) * 0.5f;
        default: return v2;
    }
}

ISA_CLONES
static void wino_weights(const float * w, int64_t C, int64_t kb, int64_t kc) {
    const int64_t K = 9 * C, tap = C * 16;  // tap (ky, kx) of channel c at (3 ky + kx) * tap + c * 16
    for (int j = 0; j < 2; ++j) {
        const float * panel = w + j * 16 * K + kb * 16;
        for (int64_t c = 0; c < kc; ++c) {
            wino_vec g[9], h[3][4];
#pragma GCC unroll 9
            for (int i = 0; i < 9; ++i) g[i] = *(const wino_vec *) (panel + i * tap + c * 16);
#pragma GCC unroll 3
            for (int ky = 0; ky < 3; ++ky) {
#pragma GCC unroll 4
                for (int b = 0; b < 4; ++b) h[ky][b] = wino_comb(b, g[3 * ky], g[3 * ky + 1], g[3 * ky + 2]);
            }
#pragma GCC unroll 16
            for (int t = 0; t < 16; ++t) {
                const int a = t / 4, b = t % 4;
                if (a % 3 == 0 && b % 3 == 0) continue;
                *(wino_vec *) (wbuf[t] + (j * kc + c) * 16) = wino_comb(a, h[0][b], h[1][b], h[2][b]);
            }
        }
    }
}

// The op's product C = X W^T (+ epilogue), or its 16 Winograd products, over the output tiles [m0, m1) x
// [n0, n1) of this thread.
struct gemm_problem {
    const struct gemm_kernel * kern;
    struct patch_geom geo;  // where X's rows come from (Winograd: product 0's)
    size_t es;              // bytes per weight and pixel value
    int64_t M, K, Kp, N;    // Kp: K, or K rounded up to even for bf16 (the packed weights' K)
    const char * w;         // packed weights; for Winograd the 3x3 ones, transformed per block into wbuf
    int wino;               // 16 Winograd products, X and C of each x_step and c_step bytes after the last's
    size_t x_step, c_step;
    float * c;
    const float * bias, * res;
    int relu;
    int in_place;           // X is a dense matrix of rows of K values: read whole tiles in place, not copied
};

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
    return wbuf[t];
}

// The tiles of pixels px0..px1-1 for one tile of channels (b: weights, epilogue and K block set), X in place
// before packed0, from `packed` after it, C at c: whole tiles, then the last pixels in one a pixel wider (one
// left over, N = 49) or in narrower ones (N = 196 leaves 4).
static void run_tiles(const struct gemm_problem * pr, struct gemm_block * b, const char * x, const char * packed,
                      float * c, int64_t m, int64_t px0, int64_t px1, int64_t packed0, int64_t kb) {
    const struct gemm_kernel * kern = pr->kern;
    const int nr = kern->nr;
    for (int64_t n = px0; n < px1;) {
        const int height = px1 - n == nr + 1 && kern->tile_wide ? nr + 1 : px1 - n >= nr ? nr : kern->nr_narrow;
        if (n < packed0) {
            b->x = x + n * pr->geo.nb1 + kb * pr->es;
            b->ldx = pr->K;
        } else {
            b->x = packed + (n - packed0) * b->kc * pr->es;
            b->ldx = b->kc;
        }
        b->c = c + n * pr->M + m;
        b->res = pr->res ? pr->res + n * pr->M + m : NULL;
        b->nr = px1 - n < height ? (int) (px1 - n) : height;
        (height == nr ? kern->tile : height > nr ? kern->tile_wide : kern->tile_narrow)(b);
        n += height;
    }
}

static void gemm_tiles(const struct gemm_problem * pr, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    const int mr = pr->kern->mr, nr = pr->kern->nr;
    const int64_t M = pr->M, N = pr->N;
    const size_t es = pr->es;
    const int64_t KC = GEMM_KC * sizeof(float) / es;  // bytes, not values, make the cache block
    const int products = pr->wino ? 16 : 1;
    // The block's output is read again by each K block after the first, so should stay in L2 (for Winograd,
    // only one product's: making the weights again for smaller blocks costs more than L3 does).
    int64_t nb_tiles = pr->Kp <= KC ? GEMM_NB / nr : GEMM_C_BLOCK / ((m1 - m0) * mr * nr);
    nb_tiles = nb_tiles < 1 ? 1 : nb_tiles > GEMM_NB / nr ? GEMM_NB / nr : nb_tiles;
    // Blocks of equal size: each block reads all of its weights again, and a last block of a few pixels
    // would do that for almost no work (ResNet-101's 2048 x 1024 conv at 7x7: blocks of 48 pixels and 1).
    const int64_t n_blocks = (n1 - n0 + nb_tiles - 1) / nb_tiles;
    nb_tiles = (n1 - n0 + n_blocks - 1) / n_blocks;
    for (int64_t nb = n0; nb < n1; nb += nb_tiles) {
        const int64_t nb_end = nb + nb_tiles < n1 ? nb + nb_tiles : n1;
        const int64_t px0 = nb * nr, px1 = nb_end * nr < N ? nb_end * nr : N;
        // Pixels read in place (see in_place) up to the last whole tile; the rest, and every pixel otherwise,
        // from the thread's buffer, each product's in its own part of it: in place, at most a tile's worth
        // (zero-padded), so Winograd's 16 fit; copied, the whole block, and only direct products copy.
        const int64_t packed0 = pr->in_place ? px0 + (px1 - px0) / nr * nr : px0;
        const int64_t packed_rows = (px1 - packed0 + nr - 1) / nr * nr;
        for (int64_t kb = 0; kb < pr->Kp; kb += KC) {
            const int64_t kc = pr->Kp - kb < KC ? pr->Kp - kb : KC;
            for (int t = 0; t < products && packed0 < px1; ++t) {
                struct patch_geom geo = pr->geo;
                geo.data += t * pr->x_step;
                pack_pixels((char *) xbuf + t * packed_rows * kc * es, &geo, pr->K, N, packed0, px1, kb, kc, nr, es);
            }
            for (int64_t mt = m0; mt < m1; ++mt) {
                const int64_t m = mt * mr;
                if (pr->wino) wino_weights((const float *) pr->w + (m / 16) * 16 * 9 * pr->K, pr->K, kb, kc);
                // The products in turn (Winograd's reusing the weights just made), each over this pixel block.
                for (int t = 0; t < products; ++t) {
                    int64_t w_panel;
                    struct gemm_block b = {
                        .w = block_weights(pr, m, kb, kc, t, &w_panel), .w_panel = w_panel,
                        .kc = kc, .ldc = M,
                        .mr = M - m < mr ? (int) (M - m) : mr,
                        .first = kb == 0, .last = kb + kc == pr->Kp,
                        .bias = pr->bias ? pr->bias + m : NULL,
                        .relu = pr->relu,
                    };
                    // Weights stream from memory once per block: ask for the next tile's (the next channels',
                    // else the next K block's first) while this one computes. Winograd's are made in wbuf.
                    if (!pr->wino && (mt + 1 < m1 || kb + KC < pr->Kp)) {
                        const int64_t next_m = mt + 1 < m1 ? m + mr : m0 * mr, next_kb = mt + 1 < m1 ? kb : kb + KC;
                        b.next_w = pr->w + ((next_m / 16) * 16 * pr->Kp + 16 * next_kb) * es;
                    }
                    run_tiles(pr, &b, pr->geo.data + t * pr->x_step, (const char *) xbuf + t * packed_rows * kc * es,
                              (float *) ((char *) pr->c + t * pr->c_step), m, px0, px1, packed0, kb);
                }
            }
        }
    }
}

static void gemm_run(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct ggml_tensor * w = dst->src[0];
    const struct ggml_tensor * x = dst->src[1];
    const int wino = P_WINO(userdata), kh = wino ? 1 : P_KH(userdata);
    struct gemm_problem pr = {
        .kern = kernel_for(P_PATH(userdata)), .es = ggml_type_size(w->type),
        .M = dst->ne[0], .K = (int64_t) kh * kh * x->ne[0], .Kp = wino ? x->ne[0] : w->ne[1],
        .N = dst->ne[1] * dst->ne[2] * dst->ne[3], .w = w->data, .wino = wino, .c = dst->data,
        .bias = P_BIAS(userdata) ? (const float *) dst->src[2]->data : NULL,
        .res = P_RES(userdata) ? (const float *) dst->src[2 + P_BIAS(userdata)]->data : NULL,
        .relu = P_RELU(userdata),
    };
    const int mr = pr.kern->mr, nr = pr.kern->nr;
    if (wino) {  // 16 products of [M, C] x [C, T], one per slice of x and of the result
        const int64_t ne[4] = { x->ne[0], x->ne[1], 1, 1 };
        const size_t nb[4] = { x->nb[0], x->nb[1], x->nb[2], x->nb[2] };
        pr.geo = patch_geom_of(x->data, ne, nb, x->ne[0], 1, 1, 1, 0);
        pr.N = dst->ne[1];
        pr.x_step = x->nb[2];
        pr.c_step = dst->nb[2];
    } else {
        pr.geo = patch_geom_of(x->data, x->ne, x->nb, x->ne[0], kh, kh, P_STRIDE(userdata), P_PAD(userdata));
    }
    // A 1x1 stride-1 conv's pixels are already rows of K values: copying them would only cost time, except
    // where rows GEMM_ALIAS_BYTES apart make the tile's loads collide in L1. Winograd's (winograd_input's dense
    // [C, T, 16] result) are always read in place: its 16 products' whole blocks would not fit the buffer.
    const struct patch_geom * geo = &pr.geo;
    pr.in_place = wino || (geo->kh == 1 && geo->stride == 1 && geo->pad == 0 && geo->nb0 == pr.es
                           && geo->nb1 == pr.K * pr.es && geo->nb2 == geo->W * geo->nb1
                           && (geo->nb3 == geo->H * geo->nb2 || dst->ne[3] == 1) && pr.K == pr.Kp
                           && geo->nb1 % GEMM_ALIAS_BYTES != 0);
    const int64_t m_tiles = (pr.M + mr - 1) / mr, n_tiles = (pr.N + nr - 1) / nr;

    // Split output channels or pixels, whichever gives the busiest thread less work (on a tie: output
    // channels when they outnumber pixel tiles, MLAS's rule); never K (it fixes the sums' order).
    int64_t m0 = 0, m1 = m_tiles, n0 = 0, n1 = n_tiles;
    const int64_t by_m = (m_tiles + nth - 1) / nth * n_tiles, by_n = (n_tiles + nth - 1) / nth * m_tiles;
    if (by_m < by_n || (by_m == by_n && m_tiles >= n_tiles)) {
        thread_range(m_tiles, ith, nth, &m0, &m1);
    } else {
        thread_range(n_tiles, ith, nth, &n0, &n1);
    }
    if (m0 < m1 && n0 < n1) gemm_tiles(&pr, m0, m1, n0, n1);
}

struct ggml_tensor * gemm_packed(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * x,
                                 int64_t m, int kh, int stride, int pad, struct ggml_tensor * bias,
                                 struct ggml_tensor * residual, int relu, int path) {
    struct ggml_tensor * args[4] = { w, x };
    int n_args = 2;
    if (bias) args[n_args++] = bias;
    if (residual) args[n_args++] = residual;
    const uintptr_t packed = (uintptr_t) path | (uintptr_t) (relu != 0) << 4 | (uintptr_t) (bias != NULL) << 5
                             | (uintptr_t) (residual != NULL) << 6 | (uintptr_t) kh << 8 | (uintptr_t) stride << 12
                             | (uintptr_t) pad << 16;
    const int64_t OW = (x->ne[1] + 2 * pad - kh) / stride + 1, OH = (x->ne[2] + 2 * pad - kh) / stride + 1;
    return ggml_custom_4d(ctx, GGML_TYPE_F32, m, OW, OH, x->ne[3], args, n_args, gemm_run, GGML_N_TASKS_MAX,
                          (void *) packed);
}

struct ggml_tensor * gemm_winograd(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * v,
                                   int64_t m, int path) {
    struct ggml_tensor * args[2] = { w, v };
    const uintptr_t packed = (uintptr_t) path | (uintptr_t) 1 << 7;
    return ggml_custom_4d(ctx, GGML_TYPE_F32, m, v->ne[1], 16, 1, args, 2, gemm_run, GGML_N_TASKS_MAX,
                          (void *) packed);
}

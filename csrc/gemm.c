#include "gemm.h"

#include <stdint.h>
#include <string.h>

#include "gemm_tile.h"
#include "thread_range.h"

// Cache blocks: GEMM_KC values of k (the weights' tile reused from L1) of GEMM_NB pixels (240 KB of X, kept
// in L2 while every weight tile passes over them). They order the work, not the arithmetic. GEMM_KC is a
// multiple of GEMM_KS and GEMM_KS_BF16; GEMM_NB of every path's tile height.
#define GEMM_KC 128
#define GEMM_NB 480
#define GEMM_NR_MAX 12

// Op parameters, packed into the userdata pointer so nothing needs freeing.
#define P_PATH(u) ((int) ((uintptr_t) (u) & 0xff))
#define P_RELU(u) ((int) (((uintptr_t) (u) >> 8) & 1))
#define P_BIAS(u) ((int) (((uintptr_t) (u) >> 9) & 1))
#define P_RES(u) ((int) (((uintptr_t) (u) >> 10) & 1))

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

// One tile of up to `height` pixels from pixel n: b arrives set for the tile's channels and K block. Fewer
// pixels than `height` (at N's end) are copied, zero-padded, into xtail so the tile reads whole rows.
// es: bytes per weight and pixel value.
static void tile_at(struct gemm_block b, void (*tile)(const struct gemm_block *), int height, int64_t n, int64_t N,
                    size_t es, char * xtail) {
    const int64_t K = b.ldx;
    b.x = (const char *) b.x + n * K * es;
    b.c += n * b.ldc;
    if (b.res) b.res += n * b.ldc;
    b.nr = N - n < height ? (int) (N - n) : height;
    if (b.nr < height) {
        memset(xtail, 0, es * height * b.kc);
        for (int i = 0; i < b.nr; ++i) memcpy(xtail + i * b.kc * es, (const char *) b.x + i * K * es, es * b.kc);
        b.x = xtail;
        b.ldx = b.kc;
    }
    tile(&b);
}

static void gemm_run(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct gemm_kernel * kern = kernel_for(P_PATH(userdata));
    const struct ggml_tensor * w = dst->src[0];
    const struct ggml_tensor * x = dst->src[1];
    const float * bias = P_BIAS(userdata) ? (const float *) dst->src[2]->data : NULL;
    const float * res = P_RES(userdata) ? (const float *) dst->src[2 + P_BIAS(userdata)]->data : NULL;
    const int64_t M = dst->ne[0], K = x->ne[0], N = x->ne[1] * x->ne[2] * x->ne[3];
    const int mr = kern->mr, nr = kern->nr;
    const int64_t m_tiles = (M + mr - 1) / mr, n_tiles = (N + nr - 1) / nr;

    // Split output channels or pixels, whichever gives the busiest thread less work (on a tie: output
    // channels when they outnumber pixel tiles, MLAS's rule); never K (it fixes the sums' order).
    int64_t m0 = 0, m1 = m_tiles, n0 = 0, n1 = n_tiles;
    const int64_t by_m = (m_tiles + nth - 1) / nth * n_tiles, by_n = (n_tiles + nth - 1) / nth * m_tiles;
    if (by_m < by_n || (by_m == by_n && m_tiles >= n_tiles)) {
        thread_range(m_tiles, ith, nth, &m0, &m1);
    } else {
        thread_range(n_tiles, ith, nth, &n0, &n1);
    }
    const size_t es = ggml_type_size(x->type);
    float xtail[GEMM_NR_MAX * GEMM_KC];  // room for f32; bf16 uses half

    const int64_t nb_tiles = GEMM_NB / nr;
    for (int64_t kb = 0; kb < K; kb += GEMM_KC) {
        const int64_t kc = K - kb < GEMM_KC ? K - kb : GEMM_KC;
        for (int64_t nb = n0; nb < n1; nb += nb_tiles) {
            const int64_t nb_end = nb + nb_tiles < n1 ? nb + nb_tiles : n1;
            for (int64_t mt = m0; mt < m1; ++mt) {
                const int64_t m = mt * mr;
                const struct gemm_block b = {  // at pixel 0: tile_at moves it
                    .w = (const char *) w->data + ((m / 16) * 16 * K + 16 * kb) * es, .w_panel = 16 * K,
                    .x = (const char *) x->data + kb * es, .ldx = K, .kc = kc,
                    .mr = M - m < mr ? (int) (M - m) : mr,
                    .c = (float *) dst->data + m, .ldc = M,
                    .first = kb == 0, .last = kb + kc == K,
                    .bias = bias ? bias + m : NULL, .res = res ? res + m : NULL,
                    .relu = P_RELU(userdata),
                };
                for (int64_t nt = nb; nt < nb_end; ++nt) {
                    if (N - nt * nr >= nr) {
                        tile_at(b, kern->tile, nr, nt * nr, N, es, (char *) xtail);
                    } else {  // the last pixels: narrower tiles waste less
                        for (int64_t n = nt * nr; n < N; n += kern->nr_narrow) {
                            tile_at(b, kern->tile_narrow, kern->nr_narrow, n, N, es, (char *) xtail);
                        }
                    }
                }
            }
        }
    }
}

struct ggml_tensor * gemm_packed(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * x,
                                 int64_t m, struct ggml_tensor * bias, struct ggml_tensor * residual,
                                 int relu, int path) {
    struct ggml_tensor * args[4] = { w, x };
    int n_args = 2;
    if (bias) args[n_args++] = bias;
    if (residual) args[n_args++] = residual;
    const uintptr_t packed = (uintptr_t) path | (uintptr_t) (relu != 0) << 8 | (uintptr_t) (bias != NULL) << 9
                             | (uintptr_t) (residual != NULL) << 10;
    return ggml_custom_4d(ctx, GGML_TYPE_F32, m, x->ne[1], x->ne[2], x->ne[3], args, n_args, gemm_run,
                          GGML_N_TASKS_MAX, (void *) packed);
}

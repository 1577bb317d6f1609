#include "gemm.h"

#include <stdint.h>
#include <string.h>

#include "gemm_tile.h"
#include "patch_row.h"
#include "thread_range.h"

// Cache blocks: GEMM_KC values of k (the weights' tile reused from L1) of up to GEMM_NB pixels (240 KB of
// X, copied once per block into a thread's buffer and kept in L2 while every weight tile passes over it),
// fewer when M is large so that the block's output, GEMM_C_BLOCK floats at most, stays in L2 across its K
// blocks. They order the work, not the arithmetic. GEMM_KC is a multiple of GEMM_KS and GEMM_KS_BF16;
// GEMM_NB of every path's tile heights.
#define GEMM_KC 128
#define GEMM_NB 480
#define GEMM_C_BLOCK (96 * 1024)

// Op parameters, packed into the userdata pointer so nothing needs freeing.
#define P_PATH(u) ((int) ((uintptr_t) (u) & 0xf))
#define P_RELU(u) ((int) (((uintptr_t) (u) >> 4) & 1))
#define P_BIAS(u) ((int) (((uintptr_t) (u) >> 5) & 1))
#define P_RES(u) ((int) (((uintptr_t) (u) >> 6) & 1))
#define P_KH(u) ((int) (((uintptr_t) (u) >> 8) & 0xf))
#define P_STRIDE(u) ((int) (((uintptr_t) (u) >> 12) & 0xf))
#define P_PAD(u) ((int) (((uintptr_t) (u) >> 16) & 0xf))

// A thread's copy of the current block of pixels: rows of kc values (the path's type), zero rows after N.
static _Thread_local float xbuf[GEMM_NB * GEMM_KC] __attribute__((aligned(64)));

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

// Copies values kb..kb+kc-1 (zeros past K) of pixels n0..n1-1 into xbuf, rows of kc values, with zero rows
// after N up to a whole tile of `nr`. es: bytes per value.
static void pack_pixels(const struct patch_geom * geo, int64_t K, int64_t N, int64_t n0, int64_t n1, int64_t kb,
                        int64_t kc, int nr, size_t es) {
    const patch_put put = es == 2 ? patch_put_bf16 : patch_put_f32;
    const int64_t k1 = kb + kc < K ? kb + kc : K;
    char * row = (char *) xbuf;
    for (int64_t n = n0; n < n1; ++n, row += kc * es) {
        patch_row(row, es, put, geo, n, kb, k1);
        if (k1 - kb < kc) memset(row + (k1 - kb) * es, 0, (kc - (k1 - kb)) * es);
    }
    if (n1 == N) memset(row, 0, (size_t) ((nr - (n1 - n0) % nr) % nr) * kc * es);
}

static void gemm_run(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct gemm_kernel * kern = kernel_for(P_PATH(userdata));
    const struct ggml_tensor * w = dst->src[0];
    const struct ggml_tensor * x = dst->src[1];
    const float * bias = P_BIAS(userdata) ? (const float *) dst->src[2]->data : NULL;
    const float * res = P_RES(userdata) ? (const float *) dst->src[2 + P_BIAS(userdata)]->data : NULL;
    const int kh = P_KH(userdata);
    const struct patch_geom geo = patch_geom_of(x->data, x->ne, x->nb, x->ne[0], kh, kh, P_STRIDE(userdata),
                                                P_PAD(userdata));
    const size_t es = ggml_type_size(w->type);
    const int64_t M = dst->ne[0], K = (int64_t) kh * kh * x->ne[0], Kp = w->ne[1];  // Kp: K, or even for bf16
    const int64_t N = dst->ne[1] * dst->ne[2] * dst->ne[3];
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
    if (m0 >= m1 || n0 >= n1) return;

    int64_t nb_tiles = GEMM_C_BLOCK / (M * nr);
    nb_tiles = nb_tiles < 1 ? 1 : nb_tiles > GEMM_NB / nr ? GEMM_NB / nr : nb_tiles;
    for (int64_t nb = n0; nb < n1; nb += nb_tiles) {
        const int64_t nb_end = nb + nb_tiles < n1 ? nb + nb_tiles : n1;
        const int64_t px0 = nb * nr, px1 = nb_end * nr < N ? nb_end * nr : N;
        for (int64_t kb = 0; kb < Kp; kb += GEMM_KC) {
            const int64_t kc = Kp - kb < GEMM_KC ? Kp - kb : GEMM_KC;
            pack_pixels(&geo, K, N, px0, px1, kb, kc, nr, es);
            for (int64_t mt = m0; mt < m1; ++mt) {
                const int64_t m = mt * mr;
                struct gemm_block b = {
                    .w = (const char *) w->data + ((m / 16) * 16 * Kp + 16 * kb) * es, .w_panel = 16 * Kp,
                    .ldx = kc, .kc = kc, .ldc = M,
                    .mr = M - m < mr ? (int) (M - m) : mr,
                    .first = kb == 0, .last = kb + kc == Kp,
                    .bias = bias ? bias + m : NULL,
                    .relu = P_RELU(userdata),
                };
                // Whole tiles, then the last pixels (N = 49 or 196 leaves 1 or 4) in narrower ones.
                for (int64_t n = px0; n < px1;) {
                    const int height = px1 - n >= nr ? nr : kern->nr_narrow;
                    b.x = (const char *) xbuf + (n - px0) * kc * es;
                    b.c = (float *) dst->data + n * M + m;
                    b.res = res ? res + n * M + m : NULL;
                    b.nr = px1 - n < height ? (int) (px1 - n) : height;
                    (height == nr ? kern->tile : kern->tile_narrow)(&b);
                    n += height;
                }
            }
        }
    }
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

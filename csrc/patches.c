#include "patches.h"

#include <stdint.h>
#include <string.h>

#include "isa_clones.h"
#include "op_params.h"
#include "patch_row.h"
#include "thread_range.h"

ISA_CLONES
static void gather_patches_run(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct ggml_tensor * x = dst->src[0];
    (void) userdata;
    const int kh = op_param(dst, 0), kw = op_param(dst, 1), stride = op_param(dst, 2), pad = op_param(dst, 3);
    const int64_t P = ((x->ne[1] + 2 * pad - kw) / stride + 1) * ((x->ne[2] + 2 * pad - kh) / stride + 1) * x->ne[3];
    // Both layouts hold one row per (group, patch), groups slowest: the row count gives the group count.
    const int64_t groups = ggml_nrows(dst) / P;
    const int64_t Cg = x->ne[0] / groups;  // channels per group
    const int64_t K = (int64_t) kh * kw * Cg, k_pad = dst->ne[0];
    const size_t esize = ggml_type_size(dst->type);
    const patch_put put = dst->type == GGML_TYPE_BF16 ? patch_put_bf16 : NULL;  // NULL: f32, copied
    int64_t first, last;
    thread_range(P, ith, nth, &first, &last);

    // A block of patches at a time, all groups of it before the next: the block's input windows stay in
    // cache while each group's rows are written in sequence. Group by group over all patches would read the
    // whole input once per group (64 times for ResNeXt-101 64x4d); all groups of one patch at a time would
    // write rows a group apart, which alias in the cache when that distance is a multiple of 4 KiB.
    enum { BLOCK = 64 };
    for (int64_t p0 = first; p0 < last; p0 += BLOCK) {
        const int64_t p1 = p0 + BLOCK < last ? p0 + BLOCK : last;
        for (int64_t g = 0; g < groups; ++g) {
            const struct patch_geom geo = patch_geom_of((const char *) x->data + g * Cg * x->nb[0], x->ne, x->nb, Cg,
                                                        kh, kw, stride, pad);
            struct patch_at at = patch_at_of(&geo, p0, 0);
            for (int64_t p = p0; p < p1; ++p, patch_next(&geo, &at)) {
                char * out = (char *) dst->data + (g * P + p) * dst->nb[1];
                patch_row(out, esize, put, NULL, &geo, &at, 0, K);
                if (k_pad > K) memset(out + K * esize, 0, (k_pad - K) * esize);
            }
        }
    }
}

struct ggml_tensor * gather_patches(struct ggml_context * ctx, struct ggml_tensor * x,
                                    int kh, int kw, int stride, int pad, int groups, int64_t k_pad,
                                    enum ggml_type type) {
    const int64_t OW = (x->ne[1] + 2 * pad - kw) / stride + 1;
    const int64_t OH = (x->ne[2] + 2 * pad - kh) / stride + 1;
    const int32_t params[4] = { kh, kw, stride, pad };
    struct ggml_tensor * args[1] = { x };
    struct ggml_tensor * t = groups == 1
        ? ggml_custom_4d(ctx, type, k_pad, OW, OH, x->ne[3], args, 1, gather_patches_run, GGML_N_TASKS_MAX, NULL)
        : ggml_custom_4d(ctx, type, k_pad, OW * OH * x->ne[3], groups, 1, args, 1, gather_patches_run,
                         GGML_N_TASKS_MAX, NULL);
    return op_params_set(t, params, 4);
}

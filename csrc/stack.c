#include "stack.h"

#include <stdint.h>
#include <string.h>

#include "thread_range.h"

// Each thread copies an equal share of the result's bytes, from whichever sources hold them.
static void stack_batch_run(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    int64_t first, last;
    thread_range((int64_t) ggml_nbytes(dst), ith, nth, &first, &last);
    int64_t offset = 0;
    for (int i = 0; i < GGML_MAX_SRC && dst->src[i] && offset < last; ++i) {
        const int64_t size = (int64_t) ggml_nbytes(dst->src[i]);
        const int64_t lo = first > offset ? first : offset, hi = last < offset + size ? last : offset + size;
        if (lo < hi) memcpy((char *) dst->data + lo, (const char *) dst->src[i]->data + (lo - offset), hi - lo);
        offset += size;
    }
}

struct ggml_tensor * stack_batch(struct ggml_context * ctx, struct ggml_tensor ** srcs, int n) {
    int64_t batch = 0;
    for (int i = 0; i < n; ++i) batch += srcs[i]->ne[3];
    return ggml_custom_4d(ctx, srcs[0]->type, srcs[0]->ne[0], srcs[0]->ne[1], srcs[0]->ne[2], batch, srcs, n,
                          stack_batch_run, GGML_N_TASKS_MAX, NULL);
}

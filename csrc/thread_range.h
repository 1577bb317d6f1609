// How the custom ops in csrc/ share their rows among ggml's worker threads.
#pragma once

#include <stdint.h>

// Rows [*first, *last) of n for thread ith of nth: contiguous, equal shares (the last may be shorter).
static inline void thread_range(int64_t n, int ith, int nth, int64_t * first, int64_t * last) {
    const int64_t per_thread = (n + nth - 1) / nth;
    *first = per_thread * ith < n ? per_thread * ith : n;
    *last = *first + per_thread < n ? *first + per_thread : n;
}

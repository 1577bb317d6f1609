// The size of this CPU's level-2 cache (one core's: data or unified), which the packed GEMM sizes its blocks
// for (csrc/gemm.c). Internal to csrc/.
#pragma once

#include <stdint.h>

// Where cpuid does not say (no x86, or a hypervisor that hides the leaves): the L2 the constants were first
// tuned on (AMD Zen 4).
#define CACHE_L2_DEFAULT (1 << 20)

// Read with cpuid: Intel's leaf 4, else AMD's leaf 0x8000001D (same format), each cache's ways x partitions x
// line size x sets; CACHE_L2_DEFAULT where neither lists a level-2 data or unified cache.
int64_t cache_l2_bytes(void);

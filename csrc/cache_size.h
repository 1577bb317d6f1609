// The sizes of this CPU's level-1 data and level-2 caches (one core's), which the packed GEMM sizes its blocks
// for (csrc/gemm.c). Internal to csrc/.
#pragma once

#include <stdint.h>

// Where cpuid does not say (no x86, or a hypervisor that hides the leaves): the caches the constants were first
// tuned on (AMD Zen 4).
#define CACHE_L1D_DEFAULT (32 << 10)
#define CACHE_L2_DEFAULT (1 << 20)

// level 1: the level-1 data cache; level 2: the level-2 data or unified cache. Read with cpuid: Intel's leaf 4,
// else AMD's leaf 0x8000001D (same format), the cache's ways x partitions x line size x sets; the default
// above where neither lists it.
int64_t cache_bytes(int level);

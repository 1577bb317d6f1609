#include "cache_size.h"

#ifdef GEMM_X86
#include <cpuid.h>

// The data or unified cache of `level` that cpuid `leaf` lists (subleaf by subleaf, until a null entry), or 0.
static int64_t cache_of_leaf(unsigned leaf, int level) {
    for (unsigned i = 0; i < 16; ++i) {
        unsigned a, b, c, d;
        if (!__get_cpuid_count(leaf, i, &a, &b, &c, &d)) return 0;
        const unsigned type = a & 31;
        if (type == 0) return 0;
        if ((int) ((a >> 5) & 7) == level && (type == 1 || type == 3)) {  // 1: data, 2: instructions, 3: unified
            return (int64_t) (((b >> 22) & 0x3ff) + 1) * (((b >> 12) & 0x3ff) + 1) * ((b & 0xfff) + 1) * ((int64_t) c + 1);
        }
    }
    return 0;
}
#endif

int64_t cache_bytes(int level) {
#ifdef GEMM_X86
    int64_t size = cache_of_leaf(4, level);
    unsigned a, b, c, d;
    // AMD's leaf needs TopologyExtensions (cpuid 0x80000001 ecx bit 22); its leaf 4 lists nothing.
    if (size == 0 && __get_cpuid(0x80000001, &a, &b, &c, &d) && (c >> 22) & 1) size = cache_of_leaf(0x8000001D, level);
    if (size > 0) return size;
#endif
    return level == 1 ? CACHE_L1D_DEFAULT : CACHE_L2_DEFAULT;
}

#include "cache_size.h"

#ifdef GEMM_X86
#include <cpuid.h>

// The level-2 data or unified cache that cpuid `leaf` lists (subleaf by subleaf, until a null entry), or 0.
static int64_t l2_of_leaf(unsigned leaf) {
    for (unsigned i = 0; i < 16; ++i) {
        unsigned a, b, c, d;
        if (!__get_cpuid_count(leaf, i, &a, &b, &c, &d)) return 0;
        const unsigned type = a & 31, level = (a >> 5) & 7;
        if (type == 0) return 0;
        if (level == 2 && (type == 2 || type == 3)) {  // 1: instructions only
            return (int64_t) (((b >> 22) & 0x3ff) + 1) * (((b >> 12) & 0x3ff) + 1) * ((b & 0xfff) + 1) * ((int64_t) c + 1);
        }
    }
    return 0;
}
#endif

int64_t cache_l2_bytes(void) {
#ifdef GEMM_X86
    int64_t l2 = l2_of_leaf(4);
    unsigned a, b, c, d;
    // AMD's leaf needs TopologyExtensions (cpuid 0x80000001 ecx bit 22); its leaf 4 lists nothing.
    if (l2 == 0 && __get_cpuid(0x80000001, &a, &b, &c, &d) && (c >> 22) & 1) l2 = l2_of_leaf(0x8000001D);
    if (l2 > 0) return l2;
#endif
    return CACHE_L2_DEFAULT;
}

#include "q8_0.h"

#include <float.h>
#include <string.h>

#include "ggml.h"

// GCC/Clang vector extensions: 8 lanes, lowered to whatever SIMD the target has (AVX2 with -march=native).
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int8_t v8b __attribute__((vector_size(8)));

static inline v8f v_abs(v8f a) {
    return (v8f) ((v8i) a & 0x7FFFFFFF);
}

static inline v8f v_max(v8f a, v8f b) {
    const v8i gt = a > b;
    return (v8f) ((gt & (v8i) a) | (~gt & (v8i) b));
}

void q8_0_encode(const float * x, uint8_t * dst, int64_t n) {
    for (int64_t b = 0; b < n / 32; b++, x += 32, dst += 34) {
        v8f v[4];
        memcpy(v, x, sizeof v);
        const v8f m = v_max(v_max(v_abs(v[0]), v_abs(v[1])), v_max(v_abs(v[2]), v_abs(v[3])));
        float amax = 0.0f;  // max is exact in any order
        for (int l = 0; l < 8; l++) {
            amax = m[l] > amax ? m[l] : amax;
        }
        const float d = amax / 127;  // as quantize_row_q8_0_ref computes it
        float id = d ? 1.0f / d : 0.0f;
        if (id > FLT_MAX) {
            id = 0.0f;  // 1/d overflows: quants 0, as the pyggml_resnet.dtypes table defines (max|x| < 4e-37)
        }
        const ggml_fp16_t h = ggml_fp32_to_fp16(d);
        dst[0] = (uint8_t) (h & 0xFF);
        dst[1] = (uint8_t) (h >> 8);
        for (int k = 0; k < 4; k++) {
            // roundf(x0): x0 - trunc(x0) is exact, and a fraction of 0.5 or more steps away from zero.
            const v8f x0 = v[k] * id;
            const v8i t = __builtin_convertvector(x0, v8i);  // truncates; |x0| <= 127 plus rounding
            const v8i away = v_abs(x0 - __builtin_convertvector(t, v8f)) >= 0.5f;
            const v8b q = __builtin_convertvector(t + (away & ((x0 < 0) | 1)), v8b);
            memcpy(dst + 2 + 8 * k, &q, sizeof q);
        }
    }
}

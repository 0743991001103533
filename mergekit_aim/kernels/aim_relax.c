/*
 * The CPU loop of AIM's relaxation: out = lerp(base, merged, factor), one pass.
 *
 * The factor f = 1 - s(1 - omega) is computed by the torch code (one vector per
 * tensor, mergekit_aim/kernels/_formula.py: relax_factor); this file only applies
 * it. It exists because torch's CPU ops need four passes over each block for
 * a bf16 relaxation (two upcasts, the lerp, the downcast): fused, the loop reads
 * merged and base once and writes out once, which is what keeps AIM's share of
 * a CPU merge small.
 *
 * Every result is bit-identical to the torch implementation: the lerp is
 * evaluated the way torch's vectorised CPU lerp evaluates it (one fused
 * multiply-add from the nearer end point), in float32, and rounded to the
 * storage dtype the way torch rounds (nearest even; NaN to the canonical
 * quiet NaN for bf16).
 *
 * Built on first use by mergekit_aim/kernels/_native.py with the system C
 * compiler and called through ctypes; each call handles a contiguous range so
 * that the caller can split a tensor across threads.
 *
 * Layouts (T is the storage type; out may equal merged, never base):
 *   rows:  [rows, channels], factor[channels] along the contiguous last axis
 *          (Linear [out, in], 1-D norm weights).
 *   lines: [lines, inner], line l scaled by factor[(first_channel + l) mod
 *          channels] (GPT-2 Conv1D [in, out], inner axes of N-D weights).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_load(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint16_t bf16_store(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return value != value ? (uint16_t)0x7FC0u : (uint16_t)rounded;
}

static inline float f32_load(float v) { return v; }
static inline float f32_store(float v) { return v; }

static inline float lerp_f32(float start, float end, float weight) {
    /* torch: |w| < 0.5 ? start + w (end - start) : end - (end - start)(1 - w),
       as one fma from the nearer end point. */
    int small = fabsf(weight) < 0.5f;
    float coeff = small ? weight : weight - 1.0f;
    float origin = small ? start : end;
    return fmaf(coeff, end - start, origin);
}

#define DEFINE_RELAX(NAME, T, LOAD, STORE)                                      \
    void aim_relax_rows_##NAME(T *out, const T *merged, const T *base,          \
                               const float *factor, int64_t rows,               \
                               int64_t channels) {                              \
        for (int64_t r = 0; r < rows; ++r) {                                    \
            T *o = out + r * channels;                                          \
            const T *m = merged + r * channels;                                 \
            const T *b = base + r * channels;                                   \
            for (int64_t c = 0; c < channels; ++c)                              \
                o[c] = STORE(lerp_f32(LOAD(b[c]), LOAD(m[c]), factor[c]));      \
        }                                                                       \
    }                                                                           \
    void aim_relax_lines_##NAME(T *out, const T *merged, const T *base,         \
                                const float *factor, int64_t lines,             \
                                int64_t channels, int64_t first_channel,        \
                                int64_t inner) {                                \
        int64_t c = first_channel;                                              \
        for (int64_t l = 0; l < lines; ++l) {                                   \
            T *o = out + l * inner;                                             \
            const T *m = merged + l * inner;                                    \
            const T *b = base + l * inner;                                      \
            float w = factor[c];                                                \
            for (int64_t k = 0; k < inner; ++k)                                 \
                o[k] = STORE(lerp_f32(LOAD(b[k]), LOAD(m[k]), w));              \
            if (++c == channels) c = 0;                                         \
        }                                                                       \
    }

DEFINE_RELAX(bf16, uint16_t, bf16_load, bf16_store)
DEFINE_RELAX(f32, float, f32_load, f32_store)

#ifdef __FLT16_MAX__
/* IEEE half through the compiler's _Float16 (GCC >= 12, Clang): the
   conversions round to nearest even, as torch's do. */
static inline float f16_load(_Float16 h) { return (float)h; }
static inline _Float16 f16_store(float v) { return (_Float16)v; }
DEFINE_RELAX(f16, _Float16, f16_load, f16_store)
int aim_relax_has_f16(void) { return 1; }
#else
int aim_relax_has_f16(void) { return 0; }
#endif

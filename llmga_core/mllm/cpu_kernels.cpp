// Matrix-vector products for the MLLM's one-token decode step on x86-64 CPUs (llmga_core/mllm/cpu_kernels.py).
//
// A decode step multiplies one activation row by every weight matrix once, so its speed is the rate at which
// the weights stream from memory, if the arithmetic per weight byte is cheap enough. Two weight formats:
//   - bfloat16 rows, multiplied with AVX-512 BF16's VDPBF16PS (32 products per instruction, accumulated in
//     float32); the activations are bfloat16 already in a bfloat16 model;
//   - int8 rows in blocks of 32 values with one float16 scale per block. The activations are rounded to 16-bit
//     integers per block of 32 (a relative error of at most 2^-16 of the block's largest value, finer than
//     bfloat16's 2^-9), so one VPMADDWD multiplies 32 weights exactly in integers; each block's sums are
//     scaled in float32 and accumulated in float32.
// Each thread reads one contiguous range of rows, one row after the other, so the hardware prefetcher sees a
// single sequential stream (interleaving rows halved the read rate). Every entry point returns 0 when it ran,
// 1 when this processor lacks the instructions or the shape does not fit (the caller then uses torch's code).
// Built without -march so the library runs on any x86-64; the AVX-512 paths are chosen per call from CPUID.
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMGA_X86 1
#endif

namespace {

constexpr int64_t kBlock = 32;  // int8 values per scale

#ifdef LLMGA_X86
#define LLMGA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c")))
#define LLMGA_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

LLMGA_AVX512_BF16 void rows_bf16(const uint16_t* x, const uint16_t* w, float* out, int64_t rows, int64_t k) {
    const int64_t full = k / 64 * 64;
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t* row = w + r * k;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int64_t i = 0; i < full; i += 64) {
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + i), (__m512bh)_mm512_loadu_si512(row + i));
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(x + i + 32),
                                  (__m512bh)_mm512_loadu_si512(row + i + 32));
        }
        for (int64_t i = full; i < k; i += 32) {  // the last 1–63 values, under a mask
            const int64_t left = k - i < 32 ? k - i : 32;
            const __mmask32 m = (__mmask32)(left == 32 ? 0xffffffffu : ((1u << left) - 1));
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(m, x + i),
                                  (__m512bh)_mm512_maskz_loadu_epi16(m, row + i));
        }
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

LLMGA_AVX512 inline __m512i block_products(const int8_t* w, const int16_t* xq) {
    return _mm512_madd_epi16(_mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)w)), _mm512_loadu_si512(xq));
}

// xq: the activations as 16-bit integers, xs[b]: block b's scale; scales: the rows' float16 scales.
LLMGA_AVX512 void rows_int8(const int16_t* xq, const float* xs, const int8_t* w, const uint16_t* scales,
                            float* out, int64_t rows, int64_t k) {
    const int64_t blocks = k / kBlock;
    std::vector<float> combined(blocks + 16);  // this row's weight scale × activation scale, per block
    for (int64_t r = 0; r < rows; ++r) {
        const int8_t* row = w + r * k;
        const uint16_t* s = scales + r * blocks;
        for (int64_t b = 0; b < blocks; b += 16) {
            const int64_t left = blocks - b < 16 ? blocks - b : 16;
            const __mmask16 m = (__mmask16)((1u << left) - 1);
            _mm512_mask_storeu_ps(combined.data() + b, m,
                                  _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s + b)),
                                                _mm512_maskz_loadu_ps(m, xs + b)));
        }
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        int64_t b = 0;
        for (; b + 2 <= blocks; b += 2) {
            const __m512i p0 = block_products(row + kBlock * b, xq + kBlock * b);
            const __m512i p1 = block_products(row + kBlock * (b + 1), xq + kBlock * (b + 1));
            a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_set1_ps(combined[b]), a0);
            a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_set1_ps(combined[b + 1]), a1);
        }
        if (b < blocks)
            a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(block_products(row + kBlock * b, xq + kBlock * b)),
                                 _mm512_set1_ps(combined[b]), a0);
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

// Each block of 32 activations as 16-bit integers, round(x / step) to nearest even, step = the block's largest
// magnitude / 32767 (0 for a block of zeros), in xs.
LLMGA_AVX512 void quantize_activations(const float* x, int64_t blocks, int16_t* xq, float* xs) {
    for (int64_t b = 0; b < blocks; ++b) {
        const __m512 lo = _mm512_loadu_ps(x + kBlock * b), hi = _mm512_loadu_ps(x + kBlock * b + 16);
        const float largest = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        const float step = largest / 32767.0f, inverse = step > 0.0f ? 1.0f / step : 0.0f;
        xs[b] = step;
        const __m512 scale = _mm512_set1_ps(inverse);
        // the conversions round to nearest even (the default rounding mode) and saturate to int16
        _mm256_storeu_si256((__m256i*)(xq + kBlock * b),
                            _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(lo, scale))));
        _mm256_storeu_si256((__m256i*)(xq + kBlock * b + 16),
                            _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(hi, scale))));
    }
}

bool has_avx512() {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c");
}
bool has_avx512_bf16() { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }
#endif

// Calls body(begin, end) on each of `threads` threads with its contiguous share of the `n` rows.
template <typename Body>
void parallel_rows(int64_t n, int threads, Body body) {
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int64_t id = omp_get_thread_num(), total = omp_get_num_threads();
#else
        const int64_t id = 0, total = 1;
#endif
        const int64_t begin = n * id / total, end = n * (id + 1) / total;
        if (begin < end) body(begin, end);
    }
}

}  // namespace

extern "C" {

// Bit 1: the bfloat16 kernel runs on this processor; bit 2: the int8 kernel does.
int llmga_kernels_available(void) {
#ifdef LLMGA_X86
    return (has_avx512_bf16() ? 1 : 0) | (has_avx512() ? 2 : 0);
#else
    return 0;
#endif
}

// out[i][n] = sum_k x[i][k] * w[n][k] for i < m; x and w bfloat16 (row-major), out float32.
int llmga_gemv_bf16(const uint16_t* x, const uint16_t* w, float* out, int64_t m, int64_t n, int64_t k,
                    int threads) {
#ifdef LLMGA_X86
    if (!has_avx512_bf16()) return 1;
    for (int64_t i = 0; i < m; ++i)
        parallel_rows(n, threads, [&](int64_t begin, int64_t end) {
            rows_bf16(x + i * k, w + begin * k, out + i * n + begin, end - begin, k);
        });
    return 0;
#else
    return 1;
#endif
}

// out[i][n] = sum_b scale[n][b] * sum_{j in block b} x[i][j] * w[n][j] for i < m; x float32, w int8, scale
// float16 (n × k/32), k a multiple of 32.
int llmga_gemv_int8(const float* x, const int8_t* w, const uint16_t* scale, float* out, int64_t m, int64_t n,
                    int64_t k, int threads) {
#ifdef LLMGA_X86
    if (!has_avx512() || k % kBlock != 0) return 1;
    const int64_t blocks = k / kBlock;
    std::vector<int16_t> xq(k);
    std::vector<float> xs(blocks + 16);
    for (int64_t i = 0; i < m; ++i) {
        quantize_activations(x + i * k, blocks, xq.data(), xs.data());
        parallel_rows(n, threads, [&](int64_t begin, int64_t end) {
            rows_int8(xq.data(), xs.data(), w + begin * k, scale + begin * blocks, out + i * n + begin,
                      end - begin, k);
        });
    }
    return 0;
#else
    return 1;
#endif
}

}  // extern "C"

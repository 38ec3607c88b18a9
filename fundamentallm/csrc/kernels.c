/* Kernels for bf16 work on a CPU that eager PyTorch does in several passes where one would do
 * (fundamentallm/native.py builds this file with the machine's C compiler):
 *
 * - causal attention's softmax and dropout, one pass over each row of a tile of scores
 *   (fundamentallm/model.py, `_SlicedAttention`). Eager PyTorch runs the same work as several passes over
 *   the tile, each reading and writing it whole: the softmax, the random bytes, the mask made of them, the
 *   product with it; in the backward pass the product with the dropped weights, the row sums, the
 *   subtraction.
 * - dropout of a tensor, added to another (the residual addition) or not, one pass (`model.add_dropout`,
 *   `model.dropout`): where PyTorch draws the random bytes, compares them into a mask and multiplies.
 *
 * Attention: a tile is `rows` = b x t rows of `cols` scores, bf16 (uint16 here), one piece: b (batch x
 * heads) blocks of t queries, the block's first query at position `start`, against keys 0..cols-1. Query
 * start + i sees keys 0..start + i (causal); the rest of its row is the future: the weights there are
 * written 0 and never read.
 *
 * Dropout's keep byte: element i (of a tile, r x cols + j, or of a tensor) is kept where the top byte of
 * a hash of i and two seeds is at least `threshold` (probability (256 - threshold) / 256). The seeds come
 * from PyTorch's generator, so a run's masks follow its seed. */
#include <stdint.h>
#include <string.h>

/* AVX-512 only (F, BW and VL: Intel since Skylake-SP, AMD since Zen 4): attention's rows in plain C
 * measured slower than PyTorch's own AVX-512 operators (forward 3.7 against 2.3 ms on a tile of 128 x 64 x
 * 256), and CPUs without AVX-512 train in fp32, which does not come here. */
#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__))
#error "the kernels need AVX-512 (F, BW, VL)"
#endif
#include <immintrin.h>

static inline uint32_t mix_one(uint32_t h, uint32_t seed2) {
    h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16;
    h ^= seed2; h *= 0x2C1B3C6Du; h ^= h >> 15;
    return h;
}

#define GOLDEN 0x9E3779B1u
#define MAX_COLS 8192

/* The keep byte of element `index` (of a tile, or of a tensor for `fundamentallm_dropout`), one at a time
 * (the tests rebuild masks with it). */
uint32_t fundamentallm_keep_byte(uint32_t index, uint32_t seed1, uint32_t seed2) {
    return mix_one(index * GOLDEN + seed1, seed2) >> 24;
}

static inline int64_t visible(int64_t r, int64_t t, int64_t cols, int64_t start) {
    int64_t n = start + (r % t) + 1;
    return n < cols ? n : cols;
}

static inline __mmask16 lanes(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }

static inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* fp32 to bf16, rounding to nearest even (as PyTorch does); a NaN stays a NaN. */
static inline __m256i round_bf16(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

/* exp(x) for x <= 0: 2^(x log2 e) as 2^n times a degree-6 polynomial for 2^f, |f| <= 1/2 (relative error
 * about 1e-7, far below bf16's 4e-3); below 2^-126 it is held at 2^-126. */
static inline __m512 exp_nonpositive(__m512 x) {
    __m512 t = _mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)), _mm512_set1_ps(-126.0f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.5403530393381608e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512i mix(__m512i h, __m512i seed2) {
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32((int)0x85EBCA6Bu));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32((int)0xC2B2AE35u));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(_mm512_xor_si512(h, seed2), _mm512_set1_epi32(0x2C1B3C6D));
    return _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
}

/* Which of 16 elements, indices index..index + 15, dropout keeps: their keep bytes at least `thr`. */
static inline __mmask16 keep_mask(__m512i index, __m512i s1, __m512i s2, __m512i thr) {
    __m512i h = mix(_mm512_add_epi32(_mm512_mullo_epi32(index, _mm512_set1_epi32((int)GOLDEN)), s1), s2);
    return _mm512_cmpge_epi32_mask(_mm512_srli_epi32(h, 24), thr);
}

static inline __m512i first_indices(uint32_t first) {
    return _mm512_add_epi32(_mm512_set1_epi32((int)first), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

static void softmax_row(const uint16_t *x, uint16_t *w, uint16_t *dropped, int64_t n, int64_t cols, uint32_t first,
                        int threshold, uint32_t seed1, uint32_t seed2) {
    float e[MAX_COLS] __attribute__((aligned(64)));
    __m512 m = _mm512_set1_ps(-__builtin_inff());
    for (int64_t j = 0; j < n; j += 16)
        m = _mm512_mask_max_ps(m, lanes(n - j), m, load_bf16(x + j, lanes(n - j)));
    __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 k = lanes(n - j);
        __m512 v = _mm512_maskz_mov_ps(k, exp_nonpositive(_mm512_sub_ps(load_bf16(x + j, k), top)));
        _mm512_store_ps(e + j, v);
        sum = _mm512_add_ps(sum, v);
    }
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    __m512i index = first_indices(first);
    __m512i s1 = _mm512_set1_epi32((int)seed1), s2 = _mm512_set1_epi32((int)seed2), thr = _mm512_set1_epi32(threshold);
    int64_t j = 0;
    for (; j < n; j += 16) {  /* the last 16 may pass n (e is 0 there): written up to cols */
        __mmask16 out = lanes(cols - j);
        __m256i y = round_bf16(_mm512_mul_ps(_mm512_load_ps(e + j), inv));
        _mm256_mask_storeu_epi16(w + j, out, y);
        if (dropped) {
            __mmask16 keep = keep_mask(index, s1, s2, thr);
            _mm256_mask_storeu_epi16(dropped + j, out, _mm256_maskz_mov_epi16(keep, y));
            index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
        }
    }
    if (j < cols) {
        memset(w + j, 0, (size_t)(cols - j) * 2);
        if (dropped) memset(dropped + j, 0, (size_t)(cols - j) * 2);
    }
}

static void backward_row(uint16_t *g, const uint16_t *w, const uint16_t *dropped, int64_t n, int64_t cols) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 k = lanes(n - j);
        acc = _mm512_fmadd_ps(load_bf16(g + j, k), load_bf16(dropped + j, k), acc);
    }
    __m512 sum = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
    int64_t j = 0;
    for (; j < n; j += 16) {
        __mmask16 k = lanes(n - j);
        __m512 e = _mm512_mul_ps(load_bf16(g + j, k), load_bf16(dropped + j, k));
        _mm256_mask_storeu_epi16(g + j, lanes(cols - j), round_bf16(_mm512_fnmadd_ps(load_bf16(w + j, k), sum, e)));
    }
    if (j < cols) memset(g + j, 0, (size_t)(cols - j) * 2);
}

/* Forward: the causal softmax of each row of `scores`, written to `w` (which may be `scores` itself), and
 * when `dropped` is not NULL the weights with dropout's mask applied (unscaled). Returns 0, or -1 where
 * a row is longer than this file handles (nothing written). */
int fundamentallm_softmax_dropout(const uint16_t *scores, uint16_t *w, uint16_t *dropped, int64_t rows, int64_t t,
                                  int64_t cols, int64_t start, int threshold, uint32_t seed1, uint32_t seed2,
                                  int threads) {
    if (cols > MAX_COLS || t <= 0) return -1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++)
        softmax_row(scores + r * cols, w + r * cols, dropped ? dropped + r * cols : 0, visible(r, t, cols, start), cols,
                    (uint32_t)(r * cols), threshold, seed1, seed2);
    return 0;
}

/* Backward, in place: `g`, the gradient of the dropped weights (rows of the tile), becomes the scores'
 * gradient e - w sum(e) with e = g x dropped: the softmax's backward pass, y (d - sum(y d)), of the gradient
 * d = g x mask that dropout lets through (y d = g x dropped). Without dropout pass `dropped` = `w`. */
int fundamentallm_softmax_dropout_backward(uint16_t *g, const uint16_t *w, const uint16_t *dropped, int64_t rows,
                                           int64_t t, int64_t cols, int64_t start, int threads) {
    if (cols > MAX_COLS || t <= 0) return -1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++)
        backward_row(g + r * cols, w + r * cols, dropped + r * cols, visible(r, t, cols, start), cols);
    return 0;
}

/* Elements a thread takes at a time in the dropout kernels: a multiple of 16, so that each 16 of them
 * are one word of the keep bits. */
#define DROPOUT_CHUNK 16384

/* Dropout of `h` (n elements, bf16), added to `x` if it is not NULL: out = x + h x keep x scale, the
 * arithmetic in fp32 and rounded once (as PyTorch's addcmul does it). Which elements were kept is written
 * to `bits`, one bit per element (bit l of word w: element 16 w + l), for the backward pass. Returns 0,
 * or -1 where n is out of range (nothing written). */
int fundamentallm_dropout(const uint16_t *x, const uint16_t *h, uint16_t *out, uint16_t *bits, int64_t n,
                          int threshold, float scale, uint32_t seed1, uint32_t seed2, int threads) {
    if (n < 0 || n > 0xFFFFFFFFll) return -1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < n; c += DROPOUT_CHUNK) {
        int64_t end = c + DROPOUT_CHUNK < n ? c + DROPOUT_CHUNK : n;
        __m512i index = first_indices((uint32_t)c);
        __m512i s1 = _mm512_set1_epi32((int)seed1), s2 = _mm512_set1_epi32((int)seed2), thr = _mm512_set1_epi32(threshold);
        __m512 sc = _mm512_set1_ps(scale);
        for (int64_t j = c; j < end; j += 16) {
            __mmask16 k = lanes(end - j), keep = keep_mask(index, s1, s2, thr) & k;
            __m512 v = _mm512_maskz_mul_ps(keep, load_bf16(h + j, keep), sc);
            if (x) v = _mm512_add_ps(v, load_bf16(x + j, k));
            _mm256_mask_storeu_epi16(out + j, k, round_bf16(v));
            bits[j / 16] = (uint16_t)keep;
            index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
        }
    }
    return 0;
}

/* Dropout's backward pass: out = g x keep x scale, the kept elements read from `bits` (as
 * `fundamentallm_dropout` wrote them). Returns 0, or -1 where n is out of range. */
int fundamentallm_dropout_backward(const uint16_t *g, const uint16_t *bits, uint16_t *out, int64_t n, float scale,
                                   int threads) {
    if (n < 0 || n > 0xFFFFFFFFll) return -1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < n; c += DROPOUT_CHUNK) {
        int64_t end = c + DROPOUT_CHUNK < n ? c + DROPOUT_CHUNK : n;
        __m512 sc = _mm512_set1_ps(scale);
        for (int64_t j = c; j < end; j += 16) {
            __mmask16 k = lanes(end - j), keep = (__mmask16)bits[j / 16] & k;
            _mm256_mask_storeu_epi16(out + j, k, round_bf16(_mm512_maskz_mul_ps(keep, load_bf16(g + j, keep), sc)));
        }
    }
    return 0;
}

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
 * - causal attention whole on AMX tile units, forward and backward (`model._AmxAttention`; below, after the
 *   dropout kernels).
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

/* fp32 to bf16, rounding to nearest even (as PyTorch does); a NaN stays a NaN. With AVX512_BF16 (Intel
 * since Cooper Lake, AMD since Zen 4) one instruction, which flushes subnormal inputs (below 1.2e-38) to 0
 * where PyTorch keeps them: the dropout kernel 1.19-1.25x faster, the attention tiles' 1.11x, the AMX
 * attention's 1.02-1.16x (AMX Xeon, benchmarks/RESULTS.md, "The AMX Xeon, 2026-12-07 (morning)"); else
 * the integer sequence. */
static inline __m256i round_bf16(__m512 x) {
#ifdef __AVX512BF16__
    return (__m256i)_mm512_cvtneps_pbh(x);
#else
    __m512i u = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
#endif
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
 * arithmetic in fp32 and rounded once (as PyTorch's addcmul does it; subnormal results: `round_bf16`).
 * Which elements were kept is written to `bits`, one bit per element (bit l of word w: element 16 w + l),
 * for the backward pass. Returns 0, or -1 where n is out of range (nothing written). */
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

/* ------------------------------------------------------------------------------------------------------
 * Causal attention whole, on AMX tiles (Intel Xeons since Sapphire Rapids): softmax(Q K^T / sqrt(D)) V
 * with dropout of the weights, forward and backward, one call each for all of a layer's batch x heads.
 * Eager PyTorch runs it as many small batched products (64 queries x up to 256 keys x 64 dims, where
 * oneDNN reaches a small part of the matrix units' rate and copies operands whose matrices are not one
 * piece) with passes over the scores between them, and copies q, k, v and the output between layouts.
 * Here each (batch, head) is one thread's work from start to end: its keys and values rearranged once
 * into the layouts the tile products read (below), then 16 queries at a time their scores (fp32, from
 * the tiles), softmax and dropout in AVX-512, and the product with the values; the output written
 * straight into the (B, T, H, D) layout the projection reads.
 *
 * A tile product (`_tile_dpbf16ps`) takes 16 rows of 32 bf16 (A, row-major) and 16 rows of 16 bf16 pairs
 * (B: row k holds for each of 16 columns n the pair of rows 2k, 2k+1 of the right-hand matrix, "VNNI"),
 * and adds the 16 x 16 fp32 product to a third tile. Every tile here is 16 rows of 64 bytes.
 *
 * Layouts (per (batch, head), T positions, D dims padded with zeros to Dp, a multiple of 32):
 *   pairs along dims, transposed (`dim_pairs`): [Dp/2][T] 32-bit words, word (p, t) = x[t][2p], x[t][2p+1]:
 *     B of Q K^T (x = K) and of dO V^T (x = V);
 *   pairs along positions (`position_pairs`): [T/2][Dp] words, word (p, d) = x[2p][d], x[2p+1][d]:
 *     B of P V (x = V) and of dS K (x = K);
 *   transposed (`dim_pairs`' `split`): [Dp][T] bf16: A of dO^T P (dV^T) and of Q^T dS (dK^T).
 * The scores of the causal future are not computed past the block of 16 queries' last (its rows padded
 * with zeros to a multiple of 32 keys for the products). Nothing of the (T, T) weights is kept between the
 * passes: the backward pass recomputes them from each row's largest score and inverse sum. While one
 * (batch, head) is worked on, the next one's rows are prefetched into L2. Dropout's keep bytes: four per
 * hash (`keep64`, `fundamentallm_attention_keep`). Without AMX (or AVX512_BF16) in the compiler's target
 * the entry points return -2. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <math.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
#endif

#define ATTENTION_MAX_T 2048  /* its per-thread buffers hold 4 T^2 bytes for the backward pass */
#define ATTENTION_MAX_D 256

/* 1 where the tile units can be used by this process (the kernel grants the permission to use their
 * state: Linux 5.16 and later), else 0. */
int fundamentallm_amx(void) {
#ifdef HAVE_AMX
    unsigned long features = 0;
    if (syscall(SYS_arch_prctl, 0x1022 /* ARCH_GET_XCOMP_PERM */, &features) == 0 && (features & (1ul << 18)))
        return 1;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
    return 0;
#endif
}

#ifdef HAVE_AMX
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static void configure_tiles(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) c.colsb[i] = 64, c.rows[i] = 16;
    _tile_loadconfig(&c);
}

/* A (batch, head)'s view of q, k, v, an output or a gradient: element (t, d) at p[t x st + d]. */
typedef struct { const uint16_t *p; int64_t st; } rows_view;

static inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

/* 16 rows of 16 32-bit elements transposed in place: r[i] element j becomes r[j] element i. */
static inline void transpose16(__m512i r[16]) {
    __m512i a[16], b[16];
    for (int i = 0; i < 16; i += 2) {  /* in each 128-bit lane, pairs of rows interleaved */
        a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  /* lane L of b[i + j]: column 4L + j of rows i..i + 3 */
        b[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
        b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
        b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
        b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
    }
    for (int j = 0; j < 4; j++) {  /* column 4L + j: lane L of b[j], b[4 + j], b[8 + j], b[12 + j] */
        __m512i c0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x44), c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xEE);
        __m512i d0 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x44), d1 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xEE);
        r[j] = _mm512_shuffle_i32x4(c0, d0, 0x88);
        r[4 + j] = _mm512_shuffle_i32x4(c0, d0, 0xDD);
        r[8 + j] = _mm512_shuffle_i32x4(c1, d1, 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(c1, d1, 0xDD);
    }
}

/* [Dp/2][T] words, word (p, t) = x[t][2p], x[t][2p + 1] (0 past D); with `split` not NULL also x transposed,
 * [Dp][T] bf16 (row 2p the words' low halves, row 2p + 1 their high halves). 16 x 16 words at a time. */
static void dim_pairs(rows_view x, int64_t T, int64_t D, int64_t Dp, uint32_t *out, uint16_t *split) {
    for (int64_t t0 = 0; t0 < T; t0 += 16)
        for (int64_t p0 = 0; p0 < Dp / 2; p0 += 16) {
            __mmask32 l = 2 * p0 < D ? (__mmask32)(D - 2 * p0 >= 32 ? 0xFFFFFFFFu : (1u << (D - 2 * p0)) - 1u) : 0;
            __m512i r[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_maskz_loadu_epi16(l, x.p + (t0 + i) * x.st + 2 * p0);
            transpose16(r);
            for (int i = 0; i < 16; i++) {
                if (out) _mm512_storeu_si512(out + (p0 + i) * T + t0, r[i]);
                if (split) {
                    _mm256_storeu_si256((__m256i *)(split + 2 * (p0 + i) * T + t0), _mm512_cvtepi32_epi16(r[i]));
                    _mm256_storeu_si256((__m256i *)(split + (2 * (p0 + i) + 1) * T + t0),
                                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(r[i], 16)));
                }
            }
        }
}

/* Two bf16 rows of 16 (rows 2p and 2p + 1) as 16 pairs: a row of a `position_pairs` layout. */
static inline __m512i interleave(__m256i even, __m256i odd) {
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                           21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(order, _mm512_inserti64x4(_mm512_castsi256_si512(even), odd, 1));
}

/* [T/2][Dp] words, word (p, d) = x[2p][d], x[2p + 1][d] (0 past D). */
static void position_pairs(rows_view x, int64_t T, int64_t D, int64_t Dp, uint32_t *out) {
    for (int64_t p = 0; p < T / 2; p++) {
        const uint16_t *a = x.p + 2 * p * x.st, *b = a + x.st;
        for (int64_t d = 0; d < Dp; d += 16) {
            __mmask16 l = d < D ? lanes(D - d) : 0;
            _mm512_storeu_si512(out + p * Dp + d,
                                interleave(_mm256_maskz_loadu_epi16(l, a + d), _mm256_maskz_loadu_epi16(l, b + d)));
        }
    }
}

/* Ask for rows t0..t0 + 15 of x to be brought into the core's L2 cache (the next (batch, head)'s, while
 * this one is worked on). */
static inline void prefetch_rows(rows_view x, int64_t t0, int64_t D) {
    if (!x.p) return;
    for (int64_t i = 0; i < 16; i++)
        for (int64_t d = 0; d < D; d += 32) _mm_prefetch((const char *)(x.p + (t0 + i) * x.st + d), _MM_HINT_T1);
}

/* Rows t0..t0 + 15 of x, padded to Dp dims: an A operand. */
static void padded_rows(rows_view x, int64_t t0, int64_t D, int64_t Dp, uint16_t *out) {
    for (int64_t i = 0; i < 16; i++) {
        memcpy(out + i * Dp, x.p + (t0 + i) * x.st, (size_t)D * 2);
        memset(out + i * Dp + D, 0, (size_t)(Dp - D) * 2);
    }
}

/* out (16 x n fp32, row stride T) = a (16 x Dp bf16, row-major) times the matrix whose dim pairs are
 * `pairs` ([Dp/2][T]), for its columns 0..n - 1 (n a multiple of 16): Q K^T, or dO V^T. */
static void rows_by_pairs(const uint16_t *a, const uint32_t *pairs, int64_t T, int64_t Dp, int64_t n, float *out) {
    for (int64_t c0 = 0; c0 < n; c0 += 64) {
        int64_t tiles = (n - c0) / 16 < 4 ? (n - c0) / 16 : 4;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t k = 0; k < Dp; k += 32) {
            const uint32_t *b = pairs + (k / 2) * T + c0;
            _tile_loadd(4, a + k, Dp * 2);
            _tile_loadd(5, b, T * 4); _tile_dpbf16ps(0, 4, 5);
            if (tiles > 1) { _tile_loadd(6, b + 16, T * 4); _tile_dpbf16ps(1, 4, 6); }
            if (tiles > 2) { _tile_loadd(7, b + 32, T * 4); _tile_dpbf16ps(2, 4, 7); }
            if (tiles > 3) { _tile_loadd(5, b + 48, T * 4); _tile_dpbf16ps(3, 4, 5); }
        }
        _tile_stored(0, out + c0, T * 4);
        if (tiles > 1) _tile_stored(1, out + c0 + 16, T * 4);
        if (tiles > 2) _tile_stored(2, out + c0 + 32, T * 4);
        if (tiles > 3) _tile_stored(3, out + c0 + 48, T * 4);
    }
}

/* out (16 x Dp fp32) = a (16 x n bf16, row stride T) times the matrix whose position pairs are `pairs`
 * ([T/2][Dp]), its rows 0..n - 1 (n a multiple of 32): P V, or dS K. */
static void rows_by_position_pairs(const uint16_t *a, const uint32_t *pairs, int64_t T, int64_t Dp, int64_t n,
                                   float *out) {
    for (int64_t d0 = 0; d0 < Dp; d0 += 64) {
        int64_t tiles = (Dp - d0) / 16 < 4 ? (Dp - d0) / 16 : 4;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t k = 0; k < n; k += 32) {
            const uint32_t *b = pairs + (k / 2) * Dp + d0;
            _tile_loadd(4, a + k, T * 2);
            _tile_loadd(5, b, Dp * 4); _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(6, b + 16, Dp * 4); _tile_dpbf16ps(1, 4, 6);
            if (tiles > 2) { _tile_loadd(7, b + 32, Dp * 4); _tile_dpbf16ps(2, 4, 7); }
            if (tiles > 3) { _tile_loadd(5, b + 48, Dp * 4); _tile_dpbf16ps(3, 4, 5); }
        }
        _tile_stored(0, out + d0, Dp * 4);
        _tile_stored(1, out + d0 + 16, Dp * 4);
        if (tiles > 2) _tile_stored(2, out + d0 + 32, Dp * 4);
        if (tiles > 3) _tile_stored(3, out + d0 + 48, Dp * 4);
    }
}

/* out (Dp x 16 fp32) = at (Dp x T bf16: a matrix transposed) times the 16 columns k0..k0 + 15 of the
 * matrix whose position pairs are `pairs` ([T/2][T]), over positions from..T - 1 (from a multiple of 32):
 * dO^T P and Q^T dS, the gradients of 16 values' and keys' rows, transposed. */
static void transposed_by_pairs(const uint16_t *at, const uint32_t *pairs, int64_t T, int64_t Dp, int64_t k0,
                                int64_t from, float *out) {
    for (int64_t d0 = 0; d0 < Dp; d0 += 64) {
        int64_t tiles = (Dp - d0) / 16 < 4 ? (Dp - d0) / 16 : 4;
        const uint16_t *a = at + d0 * T;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t q = from; q < T; q += 32) {
            _tile_loadd(4, pairs + (q / 2) * T + k0, T * 4);
            _tile_loadd(5, a + q, T * 2); _tile_dpbf16ps(0, 5, 4);
            _tile_loadd(6, a + 16 * T + q, T * 2); _tile_dpbf16ps(1, 6, 4);
            if (tiles > 2) { _tile_loadd(7, a + 32 * T + q, T * 2); _tile_dpbf16ps(2, 7, 4); }
            if (tiles > 3) { _tile_loadd(5, a + 48 * T + q, T * 2); _tile_dpbf16ps(3, 5, 4); }
        }
        _tile_stored(0, out + d0 * 16, 64);
        _tile_stored(1, out + (d0 + 16) * 16, 64);
        if (tiles > 2) _tile_stored(2, out + (d0 + 32) * 16, 64);
        if (tiles > 3) _tile_stored(3, out + (d0 + 48) * 16, 64);
    }
}

/* Row i of 16 fp32 rows (row stride `stride`), times `scale`, rounded, to dst row i (row stride dst_st),
 * its first D elements. */
static void write_rows(const float *src, int64_t stride, float scale, uint16_t *dst, int64_t dst_st, int64_t D) {
    __m512 s = _mm512_set1_ps(scale);
    for (int64_t i = 0; i < 16; i++)
        for (int64_t d = 0; d < D; d += 16)
            _mm256_mask_storeu_epi16(dst + i * dst_st + d, lanes(D - d),
                                     round_bf16(_mm512_mul_ps(_mm512_loadu_ps(src + i * stride + d), s)));
}

/* `src` (Dp x 16 fp32: 16 rows' gradients transposed), times `scale`, to rows k0..k0 + 15 of dst. */
static void write_transposed(const float *src, float scale, uint16_t *dst, int64_t dst_st, int64_t k0, int64_t D) {
    __m512 s = _mm512_set1_ps(scale);
    for (int64_t d = 0; d < D; d += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(src + (d + i) * 16);
        transpose16(r);
        for (int j = 0; j < 16; j++)
            _mm256_mask_storeu_epi16(dst + (k0 + j) * dst_st + d, lanes(D - d),
                                     round_bf16(_mm512_mul_ps(_mm512_castsi512_ps(r[j]), s)));
    }
}

typedef struct { int64_t B, H, T, D; } shape4;

static inline rows_view view_of(const uint16_t *p, const int64_t *strides, int64_t bh, int64_t H) {
    rows_view v = {p + (bh / H) * strides[0] + (bh % H) * strides[1], strides[2]};
    return v;
}

/* Which of the 64 elements j0..j0 + 63 (j0 a multiple of 64) of attention row `row` dropout keeps: bit i
 * for element j0 + i. Their keep bytes are the four bytes of 16 hashes (byte b of word w: element 4w + b),
 * a quarter of the hashing of one per element; word w of the row is index row x round_up(T, 64) / 4 + w of
 * the hash (`fundamentallm_attention_keep` gives one element's byte). */
static inline __mmask64 keep64(int64_t row, int64_t T, int64_t j0, __m512i s1, __m512i s2, __m512i thr8) {
    __m512i index = first_indices((uint32_t)((row * round_up(T, 64) + j0) / 4));
    __m512i h = mix(_mm512_add_epi32(_mm512_mullo_epi32(index, _mm512_set1_epi32((int)GOLDEN)), s1), s2);
    return _mm512_cmpge_epu8_mask(h, thr8);
}

/* The keep byte of element (row, j) of the attention kernels' dropout (T positions). */
uint32_t fundamentallm_attention_keep(int64_t row, int64_t j, int64_t T, uint32_t seed1, uint32_t seed2) {
    uint32_t word = (uint32_t)((row * round_up(T, 64) + j) / 4);
    return mix_one(word * GOLDEN + seed1, seed2) >> (8 * (j % 4)) & 0xFF;
}

/* exp(alpha x - top) for columns j..j + 15 of a row of scores x whose first n are seen (0 from n on): top is
 * the row's largest scaled score. */
static inline __m512 exponentials(const float *x, int64_t j, int64_t n, __m512 alpha, __m512 top) {
    return _mm512_maskz_mov_ps(lanes(n - j), exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(x + j), alpha, top)));
}

/* The softmax's weights, exponentials(...) x inv rounded to bf16 (inv: 1 / the sum of the row's
 * exponentials), as the forward pass computes them (from the exponentials it kept) and the backward pass
 * recomputes them from the row's top and inv: bit for bit the same. */
static inline __m256i weights16(const float *x, int64_t j, int64_t n, __m512 alpha, __m512 top, __m512 inv) {
    if (j >= n) return _mm256_setzero_si256();
    return round_bf16(_mm512_mul_ps(exponentials(x, j, n, alpha, top), inv));
}

/* The largest of the row's first n scores. */
static inline float row_max(const float *x, int64_t n) {
    __m512 m = _mm512_set1_ps(-__builtin_inff());
    for (int64_t j = 0; j < n; j += 16) m = _mm512_mask_max_ps(m, lanes(n - j), m, _mm512_maskz_loadu_ps(lanes(n - j), x + j));
    return _mm512_reduce_max_ps(m);
}

/* Forward of one (batch, head): see `fundamentallm_attention`. */
static void attention_head(shape4 s, int64_t bh, rows_view q, rows_view k, rows_view v, const rows_view *next,
                           uint16_t *out, int64_t out_st, float *stats, int threshold, float scale, uint32_t seed1,
                           uint32_t seed2, char *work) {
    int64_t T = s.T, D = s.D, Dp = round_up(D, 32);
    uint32_t *kpairs = (uint32_t *)work, *vpairs = kpairs + Dp / 2 * T;
    uint16_t *qrows = (uint16_t *)(vpairs + T / 2 * Dp), *p = qrows + 16 * Dp;
    float *scores = (float *)(p + 16 * T), *o = scores + 16 * T;
    dim_pairs(k, T, D, Dp, kpairs, 0);
    position_pairs(v, T, D, Dp, vpairs);
    float alpha = 1.0f / sqrtf((float)D);
    __m512 valpha = _mm512_set1_ps(alpha);
    __m512i s1 = _mm512_set1_epi32((int)seed1), s2 = _mm512_set1_epi32((int)seed2), thr8 = _mm512_set1_epi8((char)threshold);
    for (int64_t q0 = 0; q0 < T; q0 += 16) {
        int64_t seen = q0 + 16, padded = round_up(seen, 32);
        for (int i = 0; i < 3; i++) prefetch_rows(next[i], q0, D);
        padded_rows(q, q0, D, Dp, qrows);
        rows_by_pairs(qrows, kpairs, T, Dp, seen, scores);
        for (int64_t i = 0; i < 16; i++) {
            int64_t n = q0 + i + 1;
            float *x = scores + i * T, top = row_max(x, n) * alpha;
            __m512 sum = _mm512_setzero_ps(), vtop = _mm512_set1_ps(top);
            for (int64_t j = 0; j < n; j += 16) {  /* the exponentials, kept in x (0 past n, to `seen`) */
                __m512 e = exponentials(x, j, n, valpha, vtop);
                _mm512_storeu_ps(x + j, e);
                sum = _mm512_add_ps(sum, e);
            }
            float inv = 1.0f / _mm512_reduce_add_ps(sum);
            if (stats) stats[2 * (bh * T + q0 + i)] = top, stats[2 * (bh * T + q0 + i) + 1] = inv;
            __mmask64 keep = ~(__mmask64)0;
            for (int64_t j = 0; j < padded; j += 16) {  /* 0 from n on */
                if (threshold && j % 64 == 0) keep = keep64(bh * T + q0 + i, T, j, s1, s2, thr8);
                __m256i y = j < n ? round_bf16(_mm512_mul_ps(_mm512_loadu_ps(x + j), _mm512_set1_ps(inv))) : _mm256_setzero_si256();
                _mm256_storeu_si256((__m256i *)(p + i * T + j), _mm256_maskz_mov_epi16((__mmask16)(keep >> (j % 64)), y));
            }
        }
        rows_by_position_pairs(p, vpairs, T, Dp, padded, o);
        write_rows(o, Dp, scale, out + q0 * out_st, out_st, D);
    }
}

/* Backward of one (batch, head): see `fundamentallm_attention_backward`. */
static void attention_head_backward(shape4 s, int64_t bh, rows_view q, rows_view k, rows_view v, rows_view g,
                                    const rows_view *next, const float *stats, uint16_t *dq, uint16_t *dk, uint16_t *dv, int64_t d_st,
                                    int threshold, float scale, uint32_t seed1, uint32_t seed2, char *work) {
    int64_t T = s.T, D = s.D, Dp = round_up(D, 32);
    uint32_t *kdims = (uint32_t *)work, *vdims = kdims + Dp / 2 * T, *kpositions = vdims + Dp / 2 * T;
    uint32_t *dropped = kpositions + T / 2 * Dp, *ds_pairs = dropped + T / 2 * T;
    uint16_t *qt = (uint16_t *)(ds_pairs + T / 2 * T), *gt = qt + Dp * T, *rows = gt + Dp * T, *ds = rows + 16 * Dp;
    uint16_t *w = ds + 16 * T;
    float *scores = (float *)(w + 16 * T), *dd = scores + 16 * T, *o = dd + 16 * T;
    __mmask16 *kept = (__mmask16 *)(o + 16 * Dp);
    dim_pairs(k, T, D, Dp, kdims, 0);
    dim_pairs(v, T, D, Dp, vdims, 0);
    position_pairs(k, T, D, Dp, kpositions);
    dim_pairs(q, T, D, Dp, 0, qt);
    dim_pairs(g, T, D, Dp, 0, gt);
    float alpha = 1.0f / sqrtf((float)D);
    __m512 valpha = _mm512_set1_ps(alpha), sc = _mm512_set1_ps(scale);
    __m512i s1 = _mm512_set1_epi32((int)seed1), s2 = _mm512_set1_epi32((int)seed2), thr8 = _mm512_set1_epi8((char)threshold);
    float sums[16];
    for (int64_t q0 = 0; q0 < T; q0 += 16) {
        int64_t seen = q0 + 16, padded = round_up(seen, 32);
        for (int i = 0; i < 4; i++) prefetch_rows(next[i], q0, D);
        padded_rows(q, q0, D, Dp, rows);
        rows_by_pairs(rows, kdims, T, Dp, seen, scores);  /* the scores again */
        padded_rows(g, q0, D, Dp, rows);
        rows_by_pairs(rows, vdims, T, Dp, seen, dd);  /* the gradient of the dropped weights, unscaled */
        for (int64_t i = 0; i < 16; i++) {  /* the weights again, which elements were kept, sum(w x dw) */
            int64_t n = q0 + i + 1, row = bh * T + q0 + i;
            const float *x = scores + i * T;
            __m512 top = _mm512_set1_ps(stats[2 * row]), inv = _mm512_set1_ps(stats[2 * row + 1]);
            __m512 acc = _mm512_setzero_ps();
            __mmask64 keep = ~(__mmask64)0;
            for (int64_t j = 0; j < padded; j += 16) {
                if (threshold && j % 64 == 0) keep = keep64(row, T, j, s1, s2, thr8);
                __mmask16 l = (j < n ? lanes(n - j) : 0) & (__mmask16)(keep >> (j % 64));
                kept[i * (T / 16) + j / 16] = l;
                __m256i wj = weights16(x, j, n, valpha, top, inv);
                _mm256_storeu_si256((__m256i *)(w + i * T + j), wj);
                acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(l, dd + i * T + j), load_bf16(w + i * T + j, l), acc);
            }
            sums[i] = _mm512_reduce_add_ps(acc) * scale;
        }
        for (int64_t i = 0; i < 16; i += 2)  /* two rows at a time: one row of pairs along queries */
            for (int64_t j = 0; j < padded; j += 16) {
                __m256i dsr[2], dpr[2];
                for (int64_t r = 0; r < 2; r++) {
                    __mmask16 l = kept[(i + r) * (T / 16) + j / 16];
                    __m512 wv = load_bf16(w + (i + r) * T + j, 0xFFFF);
                    __m512 dw = _mm512_maskz_mul_ps(l, _mm512_loadu_ps(dd + (i + r) * T + j), sc);
                    dsr[r] = round_bf16(_mm512_mul_ps(wv, _mm512_sub_ps(dw, _mm512_set1_ps(sums[i + r]))));
                    dpr[r] = _mm256_maskz_mov_epi16(l, _mm256_loadu_si256((const __m256i *)(w + (i + r) * T + j)));
                    _mm256_storeu_si256((__m256i *)(ds + (i + r) * T + j), dsr[r]);
                }
                int64_t pair = (q0 + i) / 2;
                _mm512_storeu_si512(dropped + pair * T + j, interleave(dpr[0], dpr[1]));
                _mm512_storeu_si512(ds_pairs + pair * T + j, interleave(dsr[0], dsr[1]));
            }
        rows_by_position_pairs(ds, kpositions, T, Dp, padded, o);
        write_rows(o, Dp, alpha, dq + q0 * d_st, d_st, D);
    }
    for (int64_t k0 = 0; k0 < T; k0 += 16) {
        int64_t from = k0 / 32 * 32;
        transposed_by_pairs(gt, dropped, T, Dp, k0, from, o);
        write_transposed(o, scale, dv, d_st, k0, D);
        transposed_by_pairs(qt, ds_pairs, T, Dp, k0, from, o);
        write_transposed(o, alpha, dk, d_st, k0, D);
    }
}
#endif

static int attention_shape_ok(int64_t T, int64_t D) {
    return T > 0 && T % 32 == 0 && T <= ATTENTION_MAX_T && D > 0 && D % 2 == 0 && D <= ATTENTION_MAX_D;
}

#ifdef HAVE_AMX
/* One call's arguments, for the per-(batch, head) work of either pass. */
typedef struct {
    shape4 s;
    const uint16_t *q, *k, *v, *g;
    const int64_t *qs, *ks, *vs, *gs, *ds;
    uint16_t *out, *dq, *dk, *dv;
    float *stats;
    int threshold;
    float scale;
    uint32_t seed1, seed2;
} attention_call;

static void forward_head(const attention_call *c, int64_t bh, char *work) {
    int64_t H = c->s.H, last = bh + 1 == c->s.B * H;
    rows_view next[3] = {{0, 0}, {0, 0}, {0, 0}};
    if (!last) next[0] = view_of(c->q, c->qs, bh + 1, H), next[1] = view_of(c->k, c->ks, bh + 1, H),
               next[2] = view_of(c->v, c->vs, bh + 1, H);
    attention_head(c->s, bh, view_of(c->q, c->qs, bh, H), view_of(c->k, c->ks, bh, H), view_of(c->v, c->vs, bh, H),
                   next, c->out + (bh / H) * c->s.T * H * c->s.D + (bh % H) * c->s.D, H * c->s.D, c->stats,
                   c->threshold, c->scale, c->seed1, c->seed2, work);
}

static void backward_head(const attention_call *c, int64_t bh, char *work) {
    int64_t H = c->s.H, last = bh + 1 == c->s.B * H, off = (bh / H) * c->ds[0] + (bh % H) * c->ds[1];
    rows_view next[4] = {{0, 0}, {0, 0}, {0, 0}, {0, 0}};
    if (!last) next[0] = view_of(c->q, c->qs, bh + 1, H), next[1] = view_of(c->k, c->ks, bh + 1, H),
               next[2] = view_of(c->v, c->vs, bh + 1, H), next[3] = view_of(c->g, c->gs, bh + 1, H);
    attention_head_backward(c->s, bh, view_of(c->q, c->qs, bh, H), view_of(c->k, c->ks, bh, H),
                            view_of(c->v, c->vs, bh, H), view_of(c->g, c->gs, bh, H), next, c->stats, c->dq + off,
                            c->dk + off, c->dv + off, c->ds[2], c->threshold, c->scale, c->seed1, c->seed2, work);
}

/* `head` for every (batch, head) of the call, `threads` OpenMP threads, each with `bytes` of buffers and
 * the tile units configured for its products (released after). Returns 0, or -3 where a thread's buffers
 * could not be allocated. */
static int each_head(const attention_call *c, int64_t bytes, int threads,
                     void (*head)(const attention_call *, int64_t, char *)) {
    if (!fundamentallm_amx()) return -2;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        char *work = aligned_alloc(64, (size_t)round_up(bytes, 64));
        if (work) {
            configure_tiles();
        } else {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < c->s.B * c->s.H; bh++)
            if (work) head(c, bh, work);
        if (work) _tile_release();
        free(work);
    }
    return failed ? -3 : 0;
}
#endif

/* Forward: q, k, v of B x H (batch, head) pairs, T positions (a multiple of 32) and D dims (even, at most
 * 256), bf16, each given by a base and its strides for (batch, head, position) in elements (dims one apart).
 * `out` (B, T, H, D) = softmax(Q K^T / sqrt(D)) with dropout, times V: the scores in fp32, the weights rounded
 * to bf16 before dropout's mask (elements whose keep byte is at least `threshold`; 0: no dropout) and the
 * product with the values times `scale`. With `stats` not NULL ((B x H, T, 2) fp32) each row's largest
 * scaled score and 1 / its sum of exponentials are kept there, from which the backward pass recomputes the
 * weights (bit for bit) rather than keeping them. Returns 0; -1 for shapes it does not take, -2 without AMX
 * (nothing written), -3 where a thread's buffers could not be allocated (the output incomplete). */
int fundamentallm_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, const int64_t *shape,
                            const int64_t *qs, const int64_t *ks, const int64_t *vs, uint16_t *out,
                            float *stats, int threshold, float scale, uint32_t seed1, uint32_t seed2, int threads) {
    shape4 s = {shape[0], shape[1], shape[2], shape[3]};
    if (!attention_shape_ok(s.T, s.D)) return -1;
#ifdef HAVE_AMX
    attention_call c = {s, q, k, v, 0, qs, ks, vs, 0, 0, out, 0, 0, 0, stats, threshold, scale, seed1, seed2};
    int64_t Dp = round_up(s.D, 32);
    return each_head(&c, 4 * Dp * s.T + 2 * 16 * Dp + 2 * 16 * s.T + 4 * 16 * s.T + 4 * 16 * Dp, threads, forward_head);
#else
    (void)q; (void)k; (void)v; (void)qs; (void)ks; (void)vs; (void)out; (void)stats; (void)threshold;
    (void)scale; (void)seed1; (void)seed2; (void)threads;
    return -2;
#endif
}

/* Backward: from q, k, v as the forward pass took them, the gradient of its output `g` (strides for batch,
 * head, position) and the forward pass's `stats`, the gradients of q, k and v, written to dq, dk, dv (the
 * strides `ds` for each: batch, head, position). Returns as `fundamentallm_attention`. */
int fundamentallm_attention_backward(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *g,
                                     const int64_t *shape, const int64_t *qs, const int64_t *ks, const int64_t *vs,
                                     const int64_t *gs, const float *stats, uint16_t *dq, uint16_t *dk,
                                     uint16_t *dv, const int64_t *ds, int threshold, float scale, uint32_t seed1,
                                     uint32_t seed2, int threads) {
    shape4 s = {shape[0], shape[1], shape[2], shape[3]};
    if (!attention_shape_ok(s.T, s.D)) return -1;
#ifdef HAVE_AMX
    attention_call c = {s, q, k, v, g, qs, ks, vs, gs, ds, 0, dq, dk, dv, (float *)stats, threshold, scale, seed1, seed2};
    int64_t T = s.T, Dp = round_up(s.D, 32);
    int64_t bytes = 6 * Dp * T + 4 * T * T + 2 * 2 * Dp * T + 2 * 16 * Dp + 2 * 2 * 16 * T + 2 * 4 * 16 * T
                    + 4 * Dp * 16 + 2 * 16 * (T / 16);
    return each_head(&c, bytes, threads, backward_head);
#else
    (void)q; (void)k; (void)v; (void)g; (void)qs; (void)ks; (void)vs; (void)gs; (void)stats; (void)dq; (void)dk;
    (void)dv; (void)ds; (void)threshold; (void)scale; (void)seed1; (void)seed2; (void)threads;
    return -2;
#endif
}

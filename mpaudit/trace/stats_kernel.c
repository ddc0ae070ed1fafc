/* One pass over a tensor's values for mpaudit's traced statistics (see mpaudit/trace/native.py).
 *
 * For n values it adds to one row of the statistics buffer (int64, ROW_WIDTH wide, float columns holding
 * float64 bit patterns), exactly as mpaudit/trace/reduce.py's torch reductions do:
 *   row[0 .. 1023]  histogram of key = (int32 bits >> 22) + 512: sign, exponent field, top mantissa bit;
 *   row[1024]       (double) count of finite nonzero values;
 *   row[1025]       (double) sum of finite |x|            (full only);
 *   row[1026]       (double) max of finite |x|            (full only);
 *   row[1027]       min of 2 * bits(|x|) + 2^31 - 2, wrapping int32, over finite values (full only):
 *                   that is 2^31 - 2 for zeros (and non-finite values, zeroed first), below it for nonzero ones.
 * Histogram, count, max and min are exact. The sum adds fp32 partial sums of 1024 values in double, piece by piece
 * (PIECE values) in piece order, whatever the thread count: the same bits on one thread or many.
 *
 * The values are fp32 bit patterns, or (mpaudit_update_f32) the relative updates of sampled weights, computed
 * here as the tracer's torch ops compute them. C11 with GCC / Clang vector extensions: the histogram is four
 * sub-histograms (so consecutive values do not wait on each other's increments), kept per thread from call to call
 * and cleared bin range by bin range, the other statistics 32 lanes of int32 / fp32 accumulators. Built with
 * -fopenmp, pieces are shared among `threads` threads of the OpenMP runtime torch already runs; without it,
 * `threads` is ignored. Calls from several threads at once are safe (each thread has its own accumulator).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define BINS 1024
#define KEY_SHIFT 22
#define SIGN_BIN 512
#define COL_NONZERO 1024
#define COL_SUM 1025
#define COL_MAX 1026
#define COL_MIN 1027
#define ROW_WIDTH 1028
#define MIN_KEY_ZERO 0x7ffffffe
#define BLOCK 1024              /* values summed in fp32 before the double accumulation */
#define PIECE (1 << 14)         /* values per piece: the unit of work of a thread and of the sum's order */
#define MAX_CALL ((int64_t)1 << 30)  /* values per call: a thread's uint32 sub-histograms cannot overflow */
#define EXP_MASK 0x7f800000
#define TWO_POW_MINUS_E 0x7f000000

typedef int32_t vi __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef float vf __attribute__((vector_size(32)));

typedef struct {
    uint32_t hist[4][BINS];  /* all zero between calls: a call clears the bins it touched */
    int64_t count;
    uint32_t max, min;  /* of finite |x| bit patterns; min over nonzero ones (0x7fffffff: none) */
    int64_t values;     /* values accumulated */
} acc_t;

/* One accumulator per thread, kept from call to call: a small tensor's call then merges and clears only the bins
 * its values fell in, not 4 x 1024 of them (most of the cost of a call for a tensor of a few thousand values). */
static _Thread_local acc_t thread_acc;

/* The calling thread's accumulator, behind a call the optimiser does not see through: otherwise it propagates the
 * thread-local address into the loops, which then look it up again and again (a third slower). */
#if defined(__clang__) || !defined(__GNUC__)
__attribute__((noinline))
#else
__attribute__((noipa))
#endif
static acc_t *own_acc(void) {
    return &thread_acc;
}

/* The layout this file was written for; mpaudit checks it against its own before using the kernel. */
void mpaudit_stats_layout(int64_t *out) {
    out[0] = BINS;
    out[1] = KEY_SHIFT;
    out[2] = ROW_WIDTH;
    out[3] = MIN_KEY_ZERO;
}

/* Whether this build shares pieces among threads. */
int mpaudit_stats_threaded(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static void histogram(const uint32_t *u, int64_t n, uint32_t (*h)[BINS]) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        h[0][((int32_t)u[i] >> KEY_SHIFT) + SIGN_BIN]++;
        h[1][((int32_t)u[i + 1] >> KEY_SHIFT) + SIGN_BIN]++;
        h[2][((int32_t)u[i + 2] >> KEY_SHIFT) + SIGN_BIN]++;
        h[3][((int32_t)u[i + 3] >> KEY_SHIFT) + SIGN_BIN]++;
    }
    for (; i < n; i++)
        h[0][((int32_t)u[i] >> KEY_SHIFT) + SIGN_BIN]++;
}

/* |x| of eight values with non-finite ones zeroed (as bit patterns, non-negative int32). */
static inline vi finite_abs(vi x) {
    vi a = x & 0x7fffffff;
    return a & (a < 0x7f800000);
}

/* The relative update of eight sampled weights, as the tracer's torch ops compute it: (after - before) times
 * 2^-e, e the binade of `before`, whose fp32 pattern is 0x7f000000 - (before & 0x7f800000). */
static inline vi relative_update(vi before, vi after) {
    vf delta = (vf)after - (vf)before;
    vi scale = TWO_POW_MINUS_E - (before & EXP_MASK);
    return (vi)(delta * (vf)scale);
}

/* Statistics of one block (at most BLOCK values) into acc and the lanes; returns the block's fp32 sum. */
static inline float block(const uint32_t *p, int64_t m, acc_t *acc, vi *count, vi *max, vi *min) {
    histogram(p, m, acc->hist);
    vf s[4] = {{0}, {0}, {0}, {0}};
    int64_t j = 0;
    for (; j + 32 <= m; j += 32) {
        for (int k = 0; k < 4; k++) {
            vi x;
            memcpy(&x, p + j + 8 * k, sizeof x);
            vi v = finite_abs(x);
            vi nonzero = v != 0;                 /* -1 or 0 */
            count[k] -= nonzero;
            s[k] += (vf)v;
            vi up = v > max[k];
            max[k] = (max[k] & ~up) | (v & up);
            vi q = v | (~nonzero & 0x7fffffff);  /* zeros above every finite pattern */
            vi down = q < min[k];
            min[k] = (min[k] & ~down) | (q & down);
        }
    }
    float tail = 0.0f;
    for (; j < m; j++) {
        uint32_t a = p[j] & 0x7fffffffu;
        uint32_t v = a < 0x7f800000u ? a : 0u;
        if (v == 0)
            continue;
        acc->count++;
        float f;
        memcpy(&f, &v, sizeof f);
        tail += f;
        acc->max = v > acc->max ? v : acc->max;
        acc->min = v < acc->min ? v : acc->min;
    }
    vf t = (s[0] + s[1]) + (s[2] + s[3]);
    float sum = 0.0f;
    for (int k = 0; k < 8; k++)
        sum += t[k];
    return sum + tail;
}

/* Where a call's values come from: fp32 patterns, relative updates of fp32 weights (before = data), or bf16 / fp16
 * values, widened to fp32 exactly. */
enum { SRC_F32, SRC_UPDATE, SRC_BF16, SRC_FP16 };
typedef struct {
    const void *data, *after;
    int kind;
} source_t;

typedef uint16_t vh __attribute__((vector_size(16)));

/* Eight fp16 values as fp32 patterns, exactly; NaNs quieted (top mantissa bit set), as the F16C conversion does. */
static inline vi widen_fp16(vh h) {
    vi x = __builtin_convertvector(h, vi);
    vi sign = (vi)(((vu)x & 0x8000u) << 16);  /* (unsigned: a signed shift into the sign bit is undefined) */
    vi e = (x >> 10) & 0x1f;
    vi m = x & 0x3ff;
    vi normal = ((e + 112) << 23) | (m << 13);
    vi special = 0x7f800000 | (m << 13) | ((m != 0) & 0x00400000);  /* Inf, or a quiet NaN */
    vi subnormal = (vi)(__builtin_convertvector(m, vf) * 0x1p-24f);  /* m * 2^-24, exact; zero for m = 0 */
    vi is_special = e == 31, is_small = e == 0;
    return sign | (normal & ~(is_special | is_small)) | (special & is_special) | (subnormal & is_small);
}

/* Values i .. i + m of a source as fp32 patterns: in place for fp32, else widened or computed into buf. */
static const uint32_t *values(const source_t *src, int64_t i, int64_t m, uint32_t *buf) {
    if (src->kind == SRC_F32)
        return (const uint32_t *)src->data + i;
    int64_t j = 0;
    if (src->kind == SRC_UPDATE) {
        const uint32_t *u = (const uint32_t *)src->data + i, *after = (const uint32_t *)src->after + i;
        for (; j + 8 <= m; j += 8) {
            vi b, a;
            memcpy(&b, u + j, sizeof b);
            memcpy(&a, after + j, sizeof a);
            vi r = relative_update(b, a);
            memcpy(buf + j, &r, sizeof r);
        }
        for (; j < m; j++) {
            float b, a, delta, scale, r;
            uint32_t bits = u[j], s = TWO_POW_MINUS_E - (bits & EXP_MASK);
            memcpy(&b, &bits, sizeof b);
            memcpy(&a, after + j, sizeof a);
            memcpy(&scale, &s, sizeof scale);
            delta = a - b;
            r = delta * scale;
            memcpy(buf + j, &r, sizeof r);
        }
        return buf;
    }
    const uint16_t *h = (const uint16_t *)src->data + i;
    if (src->kind == SRC_BF16) {
        for (j = 0; j < m; j++)
            buf[j] = (uint32_t)h[j] << 16;
        return buf;
    }
    for (; j + 8 <= m; j += 8) {
        vh x;
        memcpy(&x, h + j, sizeof x);
        vi w = widen_fp16(x);
        memcpy(buf + j, &w, sizeof w);
    }
    if (j < m) {  /* the tail, through the same conversion */
        vh x = {0};
        memcpy(&x, h + j, (size_t)(m - j) * sizeof *h);
        vi w = widen_fp16(x);
        memcpy(buf + j, &w, (size_t)(m - j) * sizeof *buf);
    }
    return buf;
}

/* Values start .. start + n (at most PIECE) of a source into acc; returns their sum. */
static double piece(const source_t *src, int64_t start, int64_t n, acc_t *acc) {
    vi count[4], max[4], min[4];
    for (int k = 0; k < 4; k++) {
        count[k] = (vi){0};
        max[k] = (vi){0};
        min[k] = (vi){0} + 0x7fffffff;
    }
    uint32_t buf[BLOCK];
    double sum = 0.0;
    acc->values += n;
    for (int64_t i = 0; i < n; i += BLOCK) {
        int64_t m = n - i < BLOCK ? n - i : BLOCK;
        sum += (double)block(values(src, start + i, m, buf), m, acc, count, max, min);
    }
    for (int k = 0; k < 4; k++) {
        for (int lane = 0; lane < 8; lane++) {
            acc->count += (uint32_t)count[k][lane];
            acc->max = (uint32_t)max[k][lane] > acc->max ? (uint32_t)max[k][lane] : acc->max;
            acc->min = (uint32_t)min[k][lane] < acc->min ? (uint32_t)min[k][lane] : acc->min;
        }
    }
    return sum;
}

static void merge_bins(acc_t *acc, int64_t *row, int from, int to) {
    for (int half = 0; half < BINS; half += SIGN_BIN) {
        for (int b = half + from; b <= half + to; b++) {
            row[b] += (int64_t)acc->hist[0][b] + acc->hist[1][b] + acc->hist[2][b] + acc->hist[3][b];
            acc->hist[0][b] = acc->hist[1][b] = acc->hist[2][b] = acc->hist[3][b] = 0;
        }
    }
}

/* Add acc to the row and clear the bins it can have touched. A value's bin is its key: the sign, then
 * m = key & 511, the exponent field and top mantissa bit, which is 0 or 1 for zeros, 510 or 511 for non-finite
 * values, and for finite nonzero ones between m of the least and of the largest |x|: those ranges, either sign. */
static void merge(acc_t *acc, int64_t *row, int full) {
    if (acc->values == 0)
        return;
    merge_bins(acc, row, 0, 1);
    if (acc->count > 0) {
        int lo = (int)(acc->min >> KEY_SHIFT), hi = (int)(acc->max >> KEY_SHIFT);
        merge_bins(acc, row, lo > 2 ? lo : 2, hi < 509 ? hi : 509);
    }
    merge_bins(acc, row, 510, 511);
    double *floats = (double *)row;
    floats[COL_NONZERO] += (double)acc->count;
    if (!full)
        return;
    float top;
    memcpy(&top, &acc->max, sizeof top);
    if ((double)top > floats[COL_MAX])
        floats[COL_MAX] = top;
    /* min nonzero pattern a -> 2a + MIN_KEY_ZERO wrapping; no nonzero value -> MIN_KEY_ZERO (a zero's key) */
    int32_t key = acc->min == 0x7fffffffu ? MIN_KEY_ZERO : (int32_t)(2u * acc->min + (uint32_t)MIN_KEY_ZERO);
    if (key < row[COL_MIN])
        row[COL_MIN] = key;
}

/* Ready acc for a call (its histogram is already clear). */
static void reset(acc_t *acc) {
    acc->count = 0;
    acc->max = 0;
    acc->min = 0x7fffffffu;
    acc->values = 0;
}

/* Pieces of one call (at most MAX_CALL values) on up to `threads` threads; returns -1 when out of memory. */
static int run(const source_t *src, int64_t start, int64_t n, int64_t *row, int full, int threads) {
    int64_t pieces = (n + PIECE - 1) / PIECE;
    if (threads > pieces)
        threads = (int)pieces;
    if (threads <= 1) {
        acc_t *acc = own_acc();
        reset(acc);
        double sum = 0.0;
        for (int64_t p = 0; p < pieces; p++) {
            int64_t at = p * PIECE;
            sum += piece(src, start + at, n - at < PIECE ? n - at : PIECE, acc);
        }
        merge(acc, row, full);
        if (full)
            ((double *)row)[COL_SUM] += sum;
        return 0;
    }
    acc_t **accs = calloc((size_t)threads, sizeof *accs);
    double *sums = malloc((size_t)pieces * sizeof *sums);
    if (accs == NULL || sums == NULL) {
        free(accs);
        free(sums);
        return -1;
    }
#pragma omp parallel num_threads(threads)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        acc_t *mine = own_acc();
        reset(mine);
        accs[t] = mine;
#pragma omp for schedule(static)
        for (int64_t p = 0; p < pieces; p++) {
            int64_t at = p * PIECE;
            sums[p] = piece(src, start + at, n - at < PIECE ? n - at : PIECE, mine);
        }
    }
    double sum = 0.0;
    for (int64_t p = 0; p < pieces; p++)
        sum += sums[p];
    for (int t = 0; t < threads; t++)
        if (accs[t] != NULL)  /* (a runtime may start fewer threads than asked) */
            merge(accs[t], row, full);
    if (full)
        ((double *)row)[COL_SUM] += sum;
    free(accs);
    free(sums);
    return 0;
}

static void calls(const source_t *src, int64_t n, int64_t *row, int full, int threads) {
    for (int64_t i = 0; i < n; i += MAX_CALL) {
        int64_t m = n - i < MAX_CALL ? n - i : MAX_CALL;
        if (run(src, i, m, row, full, threads) != 0)
            run(src, i, m, row, full, 1);  /* one thread needs no allocation: the same statistics, only slower */
    }
}

/* Add n fp32 values (as bit patterns) to the statistics row; full = 0 leaves sum, max and min unmeasured. */
void mpaudit_stats_f32(const uint32_t *u, int64_t n, int64_t *row, int full, int threads) {
    source_t src = {u, NULL, SRC_F32};
    calls(&src, n, row, full, threads);
}

/* The same for n 16-bit values: bf16 (fp16 = 0) or fp16 (fp16 = 1). */
void mpaudit_stats_half(const uint16_t *h, int64_t n, int64_t *row, int full, int threads, int fp16) {
    source_t src = {h, NULL, fp16 ? SRC_FP16 : SRC_BF16};
    calls(&src, n, row, full, threads);
}

/* Add the relative updates of n sampled weights, from `before` to `after` (fp32), to the row: histogram and
 * finite nonzero count (a partial row, as the tracer keeps for updates). */
void mpaudit_update_f32(const uint32_t *before, const uint32_t *after, int64_t n, int64_t *row, int threads) {
    source_t src = {before, after, SRC_UPDATE};
    calls(&src, n, row, 0, threads);
}

/* Merge n_rows statistics rows into running ones, as mpaudit.trace.reduce.merge_rows does: histograms, counts and
 * sums add, max |x| and the min key take the max and the min. */
void mpaudit_merge_rows(int64_t *into, const int64_t *rows, int64_t n_rows) {
    for (int64_t r = 0; r < n_rows; r++) {
        int64_t *a = into + r * ROW_WIDTH;
        const int64_t *b = rows + r * ROW_WIDTH;
        for (int k = 0; k < BINS; k++)
            a[k] += b[k];
        double *fa = (double *)a;
        const double *fb = (const double *)b;
        fa[COL_NONZERO] += fb[COL_NONZERO];
        fa[COL_SUM] += fb[COL_SUM];
        if (fb[COL_MAX] > fa[COL_MAX])
            fa[COL_MAX] = fb[COL_MAX];
        if (b[COL_MIN] < a[COL_MIN])
            a[COL_MIN] = b[COL_MIN];
    }
}

/* routelog._native: the per-token kernels, one pass over each row while it is in the cache.
 *
 * numpy computes a statistic of a batch in one pass over it per operation (a maximum, a log,
 * a product, an argmax, ...); each pass is fast, but a batch of 65,536 x 64 probabilities
 * went through a dozen of them. Here each row is read once from memory and every statistic
 * of it is formed while it sits in the L1 cache, in loops the compiler vectorizes. The
 * callers (routelog/kernels.py) check shapes, dtypes and contiguity; this file checks them
 * again, because a wrong length here would read or write outside a buffer.
 *
 * token_stats expects validated probabilities (finite, non-negative): other values give
 * unspecified statistics, never an access outside a buffer. row_sums and softmax take any
 * values; they are the checks. Every build gives the same bits, whatever the vector width
 * chosen for the CPU (AVX-512, AVX2 or SSE2): sums are taken in fixed lanes (LANES, below)
 * and setup.py turns floating-point contraction off (a fused multiply-add rounds once where
 * a multiply and an add round twice, and only some levels have it). So Dask workers on
 * different CPUs give the client the same statistics, byte for byte.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(ROUTELOG_NO_DISPATCH)
/* one compiled copy per instruction-set level, chosen at load time for the CPU at hand (an
 * ifunc: glibc's); tests/test_native.py builds each level alone, with ROUTELOG_NO_DISPATCH,
 * and checks it. Elsewhere one copy for the compiler's default target. */
#define DISPATCH __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DISPATCH
#endif

/* ln x from the bits of a positive normal float x. The reduction and polynomial are those of
 * Arm's optimized-routines v_logf (relative error below 3.5 ulp): x = 2^n (1 + r) with
 * 2/3 < 1 + r < 4/3, ln x = n ln 2 + r + r^2 P(r). Plain arithmetic, so loops over it
 * vectorize, unlike a call to logf. ln 1 is exactly 0. */
static inline float log_bits(uint32_t u) {
    u -= 0x3f2aaaabu;
    int32_t n = (int32_t)u >> 23;
    u = (u & 0x007fffffu) + 0x3f2aaaabu;
    float m;
    memcpy(&m, &u, sizeof m);
    float r = m - 1.0f;
    float r2 = r * r;
    float p = 0x1.5a9aa2p-3f * r - 0x1.4f9934p-3f;
    float q = 0x1.961348p-3f * r - 0x1.00187cp-2f;
    float y = 0x1.555d7cp-2f * r - 0x1.ffffc8p-2f;
    p = -0x1.3e737cp-3f * r2 + p;
    q = p * r2 + q;
    y = q * r2 + y;
    return y * r2 + ((float)n * 0x1.62e43p-1f + r);
}

/* Sums over a row are taken in LANES lanes (element j in lane j % LANES), then the lanes
 * are folded pairwise in a fixed order: the same additions in the same order whatever the
 * vector width (one AVX-512 register of floats, two of AVX2, four of SSE2). */
#define LANES 16

static inline float fold_floats(float *lane) {
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) lane[l] += lane[l + width];
    return lane[0];
}

static inline double fold_doubles(double *lane) {
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) lane[l] += lane[l + width];
    return lane[0];
}

/* p ln p, with 0 ln 0 = 0: a zero is raised to the smallest normal float before the log
 * (compared as an integer, which orders non-negative floats), so its term is 0 x ln(tiny). */
static inline float entropy_term(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    u = u > 0x00800000u ? u : 0x00800000u;
    return v * log_bits(u);
}

/* -sum_j p_j ln p_j: terms summed in float32 lanes, the row total returned in float64. */
static inline double row_entropy(const float *restrict p, Py_ssize_t e) {
    float lane[LANES] = {0.0f};
    Py_ssize_t j = 0;
    for (; j + LANES <= e; j += LANES) {
#pragma omp simd
        for (int l = 0; l < LANES; l++) lane[l] += entropy_term(p[j + l]);
    }
    for (int l = 0; j + l < e; l++) lane[l] += entropy_term(p[j + l]);
    return -(double)fold_floats(lane);
}

/* The k largest of a row, largest first, ties to the lower index: k passes, each a maximum
 * and the first index holding it; a chosen entry is set to -inf in a copy of the row. */
static inline void row_top_k(const float *restrict p, Py_ssize_t e, Py_ssize_t k,
                             int32_t *restrict ids, float *restrict top1, float *restrict copy) {
    const float *row = p;
    for (Py_ssize_t slot = 0; slot < k; slot++) {
        float peak = -INFINITY;
#pragma omp simd reduction(max : peak)
        for (Py_ssize_t j = 0; j < e; j++) peak = row[j] > peak ? row[j] : peak;
        int32_t at = (int32_t)e;
#pragma omp simd reduction(min : at)
        for (Py_ssize_t j = 0; j < e; j++) {
            int32_t here = row[j] == peak ? (int32_t)j : (int32_t)e;
            at = here < at ? here : at;
        }
        ids[slot] = at;
        if (slot == 0) *top1 = peak;
        if (slot + 1 < k) {
            if (slot == 0) {
                memcpy(copy, p, (size_t)e * sizeof *copy);
                row = copy;
            }
            copy[at] = -INFINITY;
        }
    }
}

/* e^x for x <= 0 in float32: 0 below -87.33 (where e^x leaves the normal floats, and for
 * -inf). The reduction and polynomial are those of Arm's optimized-routines v_expf (error
 * below 2 ulp): x = n ln 2 + r, |r| <= ln 2 / 2, e^x = 2^n (1 + P(r)). Plain arithmetic, so
 * loops over it vectorize, unlike a call to expf. */
static inline float exp_nonpositive(float x) {
    const float shift = 0x1.8p23f;
    float z = x * 0x1.715476p+0f + shift; /* n, rounded, in the low bits of z */
    float n = z - shift;
    float r = x - n * 0x1.62e4p-1f - n * 0x1.7f7d1cp-20f;
    uint32_t bits;
    memcpy(&bits, &z, sizeof bits);
    uint32_t e = (bits << 23) + 0x3f800000u; /* 2^n as a float's bits */
    float scale;
    memcpy(&scale, &e, sizeof scale);
    float r2 = r * r;
    float p = 0x1.0e4020p-7f * r + 0x1.573e2ep-5f;
    float q = 0x1.555e66p-3f * r + 0x1.fffdb6p-2f;
    q = p * r2 + q;
    float poly = q * r2 + 0x1.ffffecp-1f * r;
    float value = poly * scale + scale;
    return x < -0x1.5d589ep+6f ? 0.0f : value; /* -87.33654 = ln of the smallest normal */
}

/* ln x for a positive normal double x, in plain arithmetic: the C library's log may pick
 * another code path (with fused multiply-adds) on another CPU, and its last bit with it.
 * x = 2^n m with sqrt(1/2) <= m < sqrt(2); ln m = 2 atanh(s) with s = (m - 1) / (m + 1),
 * |s| < 0.1716, whose series to s^23 leaves out less than 1e-19 of it; ln 2 is split in two
 * so that n ln 2 is exact. Within a few ulp of the C library's log (tests/test_native.py). */
static inline double log_double(double x) {
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    int64_t n = (int64_t)(u >> 52) - 1023;
    u = (u & 0x000fffffffffffffull) | 0x3ff0000000000000ull;
    double m;
    memcpy(&m, &u, sizeof m);
    if (m > 0x1.6a09e667f3bcdp+0) { /* sqrt(2) */
        m *= 0.5;
        n += 1;
    }
    static const double inverse_odd[12] = {1.0 / 23, 1.0 / 21, 1.0 / 19, 1.0 / 17,
                                           1.0 / 15, 1.0 / 13, 1.0 / 11, 1.0 / 9,
                                           1.0 / 7,  1.0 / 5,  1.0 / 3,  1.0};
    double s = (m - 1.0) / (m + 1.0), s2 = s * s, series = 0.0;
    for (int i = 0; i < 12; i++) series = series * s2 + inverse_odd[i];
    return (double)n * 0x1.62e42fee00000p-1 + ((double)n * 0x1.a39ef35793c76p-33 + 2.0 * s * series);
}

/* Per row of logits (float32 or float64, one function for each, below): what is wrong with
 * it, if anything (1: NaN or +inf, 2: every logit -inf, 3: a logit beyond +-max_logit;
 * -DBL_MAX counts as -inf, as JSON writes it), and for a good row the softmax of
 * logits / temperature (float32; the division is a multiplication by 1 / temperature,
 * the subtraction of the row's largest is in float64) and its logsumexp. */
#define SOFTMAX_ROWS(NAME, TYPE)                                                                  \
    DISPATCH                                                                                      \
    static void NAME(const TYPE *restrict logits, Py_ssize_t n, Py_ssize_t e, double temperature, \
                     double max_logit, float *restrict probs, double *restrict lse,              \
                     uint8_t *restrict problems) {                                                \
        const double scale = 1.0 / temperature; /* exact for the usual temperature of 1 */       \
        for (Py_ssize_t t = 0; t < n; t++) {                                                      \
            const TYPE *row = logits + t * e;                                                     \
            float *out = probs + t * e;                                                           \
            /* the largest logit, the smallest above -inf, and whether any is NaN */              \
            double high = -INFINITY, low = INFINITY, nans = 0.0;                                  \
            _Pragma("omp simd reduction(max : high) reduction(min : low) reduction(+ : nans)")    \
            for (Py_ssize_t j = 0; j < e; j++) {                                                  \
                double x = row[j];                                                                \
                high = x > high ? x : high;                                                       \
                low = x > -DBL_MAX && x < low ? x : low;                                          \
                nans += x != x ? 1.0 : 0.0;                                                       \
            }                                                                                     \
            problems[t] = nans > 0.0 || high == INFINITY             ? 1                          \
                          : high <= -DBL_MAX                         ? 2                          \
                          : high > max_logit || low < -max_logit     ? 3                          \
                                                                     : 0;                         \
            if (problems[t]) {                                                                    \
                lse[t] = 0.0;                                                                     \
                memset(out, 0, (size_t)e * sizeof *out);                                          \
                continue;                                                                         \
            }                                                                                     \
            double peak = high * scale;                                                           \
            _Pragma("omp simd")                                                                   \
            for (Py_ssize_t j = 0; j < e; j++) {                                                  \
                double x = row[j];                                                                \
                out[j] = x > -DBL_MAX ? (float)(x * scale - peak) : -INFINITY;                    \
            }                                                                                     \
            _Pragma("omp simd")                                                                   \
            for (Py_ssize_t j = 0; j < e; j++) out[j] = exp_nonpositive(out[j]);                  \
            double lane[LANES] = {0.0}; /* the sum in fixed lanes, as row_entropy */            \
            Py_ssize_t at = 0;                                                                    \
            for (; at + LANES <= e; at += LANES) {                                                \
                _Pragma("omp simd")                                                               \
                for (int l = 0; l < LANES; l++) lane[l] += (double)out[at + l];                   \
            }                                                                                     \
            for (int l = 0; at + l < e; l++) lane[l] += (double)out[at + l];                      \
            double total = fold_doubles(lane);                                                    \
            lse[t] = peak + log_double(total);                                                    \
            float inverse = (float)(1.0 / total);                                                 \
            _Pragma("omp simd")                                                                   \
            for (Py_ssize_t j = 0; j < e; j++) out[j] *= inverse;                                 \
        }                                                                                         \
    }

SOFTMAX_ROWS(softmax_rows_float, float)
SOFTMAX_ROWS(softmax_rows_double, double)

/* sums += row in float64 */
static inline void add_row(const float *restrict row, Py_ssize_t e, double *restrict sums) {
#pragma omp simd
    for (Py_ssize_t j = 0; j < e; j++) sums[j] += (double)row[j];
}

/* Whether a selection of ks experts differs, as a set, from the top-ks of the row: whether
 * an expert left out has a higher probability than the lowest one selected (ties are not a
 * difference). */
static inline uint8_t row_differs(const float *restrict p, Py_ssize_t e,
                                  const int32_t *restrict selected, Py_ssize_t ks,
                                  float *restrict copy) {
    if (ks >= e) return 0;
    float lowest = INFINITY;
    memcpy(copy, p, (size_t)e * sizeof *copy);
    for (Py_ssize_t s = 0; s < ks; s++) {
        float chosen = p[selected[s]];
        lowest = chosen < lowest ? chosen : lowest;
        copy[selected[s]] = -INFINITY;
    }
    float other = -INFINITY;
#pragma omp simd reduction(max : other)
    for (Py_ssize_t j = 0; j < e; j++) other = copy[j] > other ? copy[j] : other;
    return other > lowest;
}

/* Everything per row in one visit: entropy, top-k, (when groups is not NULL) the row added
 * to its group's column sums, rows in order, and (when selected is not NULL) whether the
 * selection differs from the top of the row. */
DISPATCH
static void token_stats_rows(const float *restrict probs, Py_ssize_t n, Py_ssize_t e,
                             Py_ssize_t k, int entropy, double *restrict entropies,
                             float *restrict top1, int32_t *restrict ids,
                             const int64_t *restrict groups, double *restrict sums,
                             const int32_t *restrict selected, Py_ssize_t ks,
                             uint8_t *restrict differs, float *restrict copy) {
    for (Py_ssize_t t = 0; t < n; t++) {
        const float *row = probs + t * e;
        if (entropy) entropies[t] = row_entropy(row, e);
        row_top_k(row, e, k, ids + t * k, top1 + t, copy);
        if (groups) add_row(row, e, sums + groups[t] * e);
        if (selected) differs[t] = row_differs(row, e, selected + t * ks, ks, copy);
    }
}

static int check_length(const Py_buffer *buffer, Py_ssize_t items, Py_ssize_t item_size,
                        const char *name) {
    if (buffer->len != items * item_size) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, expected %zd", name, buffer->len,
                     items * item_size);
        return -1;
    }
    return 0;
}

/* rows of float32 probabilities, E wide: n rows when the length is a whole number of rows */
static Py_ssize_t count_rows(const Py_buffer *probs, Py_ssize_t e) {
    if (e < 1 || e > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "the number of experts must be in 1..2^31-1");
        return -1;
    }
    if (probs->len % (e * (Py_ssize_t)sizeof(float)) != 0) {
        PyErr_SetString(PyExc_ValueError, "the buffer is not a whole number of float32 rows");
        return -1;
    }
    return probs->len / (e * (Py_ssize_t)sizeof(float));
}

/* the groups of n rows, each in 0..n_groups-1 (checked, as they index into the sums) */
static int check_groups(const Py_buffer *groups, Py_ssize_t n, Py_ssize_t n_groups) {
    if (check_length(groups, n, sizeof(int64_t), "groups") < 0) return -1;
    const int64_t *ids = groups->buf;
    for (Py_ssize_t t = 0; t < n; t++) {
        if (ids[t] < 0 || ids[t] >= n_groups) {
            PyErr_Format(PyExc_ValueError, "group %lld of row %zd is outside 0..%zd",
                         (long long)ids[t], t, n_groups - 1);
            return -1;
        }
    }
    return 0;
}

/* expert ids, each in 0..e-1 (checked, as they index into a row) */
static int check_experts(const Py_buffer *selected, Py_ssize_t e) {
    const int32_t *ids = selected->buf;
    Py_ssize_t count = selected->len / (Py_ssize_t)sizeof(int32_t);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (ids[i] < 0 || ids[i] >= e) {
            PyErr_Format(PyExc_ValueError, "selected expert %d is outside 0..%zd", ids[i], e - 1);
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(
    token_stats_doc,
    "token_stats(probs, n_experts, k, entropy, entropies, top1, ids, groups, sums, selected, "
    "differs)\n\n"
    "From C-ordered float32 probabilities (n x n_experts), fill entropies (float64, n; left "
    "alone when entropy is false), top1 (float32, n) and ids (int32, n x k); when groups "
    "(int64, n) is not None, add each row to row groups[i] of sums (float64, n_groups x "
    "n_experts); when selected (int32, n x ks: experts chosen) is not None, set differs "
    "(uint8, n) to whether the selection differs, as a set, from the row's top ks.");

static PyObject *token_stats(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer probs, entropies, top1, ids, groups = {0}, sums = {0}, selected = {0}, differs = {0};
    Py_ssize_t e, k, ks = 0;
    int entropy;
    PyObject *groups_arg, *sums_arg, *selected_arg, *differs_arg;
    if (!PyArg_ParseTuple(args, "y*nnpw*w*w*OOOO", &probs, &e, &k, &entropy, &entropies, &top1,
                          &ids, &groups_arg, &sums_arg, &selected_arg, &differs_arg))
        return NULL;
    PyObject *result = NULL;
    float *copy = NULL;
    Py_ssize_t n = count_rows(&probs, e);
    if (n < 0) goto done;
    if (k < 1 || k > e) {
        PyErr_SetString(PyExc_ValueError, "k must be in 1..n_experts");
        goto done;
    }
    if (check_length(&entropies, n, sizeof(double), "entropies") < 0 ||
        check_length(&top1, n, sizeof(float), "top1") < 0 ||
        check_length(&ids, n * k, sizeof(int32_t), "ids") < 0)
        goto done;
    if ((groups_arg == Py_None) != (sums_arg == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "groups and sums go together");
        goto done;
    }
    if (groups_arg != Py_None) {
        if (PyObject_GetBuffer(groups_arg, &groups, PyBUF_SIMPLE) < 0) goto done;
        if (PyObject_GetBuffer(sums_arg, &sums, PyBUF_WRITABLE) < 0) goto done;
        Py_ssize_t n_groups = sums.len / (e * (Py_ssize_t)sizeof(double));
        if (check_length(&sums, n_groups * e, sizeof(double), "sums") < 0 ||
            check_groups(&groups, n, n_groups) < 0)
            goto done;
    }
    if ((selected_arg == Py_None) != (differs_arg == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "selected and differs go together");
        goto done;
    }
    if (selected_arg != Py_None) {
        if (PyObject_GetBuffer(selected_arg, &selected, PyBUF_SIMPLE) < 0) goto done;
        if (PyObject_GetBuffer(differs_arg, &differs, PyBUF_WRITABLE) < 0) goto done;
        ks = n ? selected.len / (n * (Py_ssize_t)sizeof(int32_t)) : 0;
        if ((n && ks < 1) || check_length(&selected, n * ks, sizeof(int32_t), "selected") < 0 ||
            check_length(&differs, n, sizeof(uint8_t), "differs") < 0 ||
            check_experts(&selected, e) < 0)
            goto done;
    }
    copy = PyMem_RawMalloc((size_t)e * sizeof *copy);
    if (copy == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    token_stats_rows(probs.buf, n, e, k, entropy, entropies.buf, top1.buf, ids.buf, groups.buf,
                     sums.buf, selected.buf, ks, differs.buf, copy);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyMem_RawFree(copy);
    PyBuffer_Release(&probs);
    PyBuffer_Release(&entropies);
    PyBuffer_Release(&top1);
    PyBuffer_Release(&ids);
    if (groups.obj) PyBuffer_Release(&groups);
    if (sums.obj) PyBuffer_Release(&sums);
    if (selected.obj) PyBuffer_Release(&selected);
    if (differs.obj) PyBuffer_Release(&differs);
    return result;
}

/* Row sums in float32 lanes and the smallest value, for the check that rows are
 * probabilities: one pass instead of a row sum and a global minimum. */
DISPATCH
static float row_sums_rows(const float *restrict values, Py_ssize_t n, Py_ssize_t e,
                           float *restrict sums) {
    float low[LANES]; /* the smallest value, per lane over all rows */
    for (int l = 0; l < LANES; l++) low[l] = INFINITY;
    for (Py_ssize_t t = 0; t < n; t++) {
        const float *row = values + t * e;
        float lane[LANES] = {0.0f}; /* the row's sum in fixed lanes */
        Py_ssize_t j = 0;
        for (; j + LANES <= e; j += LANES) {
#pragma omp simd
            for (int l = 0; l < LANES; l++) {
                lane[l] += row[j + l];
                low[l] = row[j + l] < low[l] ? row[j + l] : low[l];
            }
        }
        for (int l = 0; j + l < e; l++) {
            lane[l] += row[j + l];
            low[l] = row[j + l] < low[l] ? row[j + l] : low[l];
        }
        sums[t] = fold_floats(lane);
    }
    float lowest = INFINITY;
    for (int l = 0; l < LANES; l++) lowest = low[l] < lowest ? low[l] : lowest;
    return lowest;
}

PyDoc_STRVAR(row_sums_doc,
             "row_sums(values, n_columns, sums) -> float\n\n"
             "Fill sums (float32, n) with the row sums of C-ordered float32 values "
             "(n x n_columns) and return their smallest value (inf when there is none; NaN "
             "values are not seen by the minimum but make their row's sum NaN).");

static PyObject *row_sums(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer values, sums;
    Py_ssize_t e;
    if (!PyArg_ParseTuple(args, "y*nw*", &values, &e, &sums)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = count_rows(&values, e);
    if (n >= 0 && check_length(&sums, n, sizeof(float), "sums") == 0) {
        float lowest;
        Py_BEGIN_ALLOW_THREADS
        lowest = row_sums_rows(values.buf, n, e, sums.buf);
        Py_END_ALLOW_THREADS
        result = PyFloat_FromDouble(lowest);
    }
    PyBuffer_Release(&values);
    PyBuffer_Release(&sums);
    return result;
}

PyDoc_STRVAR(
    softmax_doc,
    "softmax(logits, n_columns, temperature, max_logit, probs, lse, problems)\n\n"
    "From C-ordered float32 or float64 logits (n x n_columns), fill problems (uint8, n: 0 for a good "
    "row, 1 NaN or +inf, 2 every logit -inf, 3 a logit beyond +-max_logit) and, for good rows, "
    "probs (float32, n x n_columns: the softmax of logits / temperature) and lse (float64, "
    "n: its logsumexp); bad rows get zeros.");

static PyObject *softmax(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer logits = {0}, probs, lse, problems;
    PyObject *logits_arg;
    Py_ssize_t e;
    double temperature, max_logit;
    if (!PyArg_ParseTuple(args, "Onddw*w*w*", &logits_arg, &e, &temperature, &max_logit, &probs,
                          &lse, &problems))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = -1, width = 0;
    if (PyObject_GetBuffer(logits_arg, &logits, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) goto done;
    const char *format = logits.format ? logits.format : "B";
    if (format[0] == '<' || format[0] == '=' || format[0] == '@') format++;
    width = strcmp(format, "f") == 0 ? 4 : strcmp(format, "d") == 0 ? 8 : 0;
    if (width == 0 || logits.itemsize != width)
        PyErr_SetString(PyExc_ValueError, "logits must be float32 or float64");
    else if (e < 1 || e > INT32_MAX || logits.len % (e * width) != 0)
        PyErr_SetString(PyExc_ValueError, "logits is not a whole number of rows");
    else if (!(temperature > 0.0) || !(max_logit > 0.0))
        PyErr_SetString(PyExc_ValueError, "temperature and max_logit must be positive");
    else
        n = logits.len / (e * width);
    if (n >= 0 && check_length(&probs, n * e, sizeof(float), "probs") == 0 &&
        check_length(&lse, n, sizeof(double), "lse") == 0 &&
        check_length(&problems, n, sizeof(uint8_t), "problems") == 0) {
        Py_BEGIN_ALLOW_THREADS
        if (width == 4)
            softmax_rows_float(logits.buf, n, e, temperature, max_logit, probs.buf, lse.buf,
                               problems.buf);
        else
            softmax_rows_double(logits.buf, n, e, temperature, max_logit, probs.buf, lse.buf,
                                problems.buf);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
done:
    if (logits.obj) PyBuffer_Release(&logits);
    PyBuffer_Release(&probs);
    PyBuffer_Release(&lse);
    PyBuffer_Release(&problems);
    return result;
}

static PyMethodDef methods[] = {
    {"token_stats", token_stats, METH_VARARGS, token_stats_doc},
    {"row_sums", row_sums, METH_VARARGS, row_sums_doc},
    {"softmax", softmax, METH_VARARGS, softmax_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "routelog._native",
    .m_doc = "Per-token kernels in C (routelog/_native.c), called through routelog.kernels.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }

/* Compiled kernels for float32 data: the hot loops of the two passes, each one pass over memory.
 *
 * They give exactly the results of gclip's numpy code paths (norms.py, rounding.py), which stay
 * as the fallback where this module is not built, and tests compare the two bit for bit:
 *
 * - square_sums: per block, the sum of the float64 squares in numpy's pairwise order (eight
 *   running sums over runs of at most 128 values, halves of longer runs summed recursively), as
 *   np.add.reduce gives for the block's float64 squares, and the block's largest square.
 * - scale_bracketed: the bracketing of rounding.py's _scale_bracketed, v rounded from its
 *   float64 products with a factor just below and one just above q.
 *
 * Every operation is a plain IEEE float64 multiply, add or conversion: the module refuses to be
 * built where C evaluates float64 in wider registers, and is compiled with -ffp-contract=off so
 * that no multiply and add are fused into one rounding.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if !defined(__FLT_EVAL_METHOD__) || __FLT_EVAL_METHOD__ != 0
#error "float64 arithmetic must round every operation to float64"
#endif

/* Four lanes of a vector; the compiler maps them onto SIMD registers as wide as it has. Lane-wise
 * operations round exactly as the scalar ones do, so they do not change any result. */
typedef float f32x4 __attribute__((vector_size(16)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef int64_t i64x4 __attribute__((vector_size(32)));

/* On x86-64 with glibc, the loops are compiled twice, for AVX2 and for the baseline, and the
 * loader picks one for the machine: AVX2 converts four values per instruction instead of two. */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define FOR_EACH_CPU __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef FOR_EACH_CPU
#define FOR_EACH_CPU
#endif
/* so that each compiled copy of a loop gets its own copy of these, built for the same CPU */
#define ALWAYS_INLINE inline __attribute__((always_inline))

#define PAIRWISE_RUN 128 /* numpy's PW_BLOCKSIZE */
#define SCALE_TILE 256   /* values scaled per step: the two float32 candidates stay in L1 */

/* Values are read through byte pointers and memcpy: they may lie at any address (a stored .npz
 * member's values, mapped from the archive, often do not start at a multiple of 4). */
static ALWAYS_INLINE float float_at(const char *values, Py_ssize_t i)
{
    float value;
    memcpy(&value, values + i * (Py_ssize_t)sizeof value, sizeof value);
    return value;
}

static ALWAYS_INLINE f64x4 squares_of_four(const char *values, Py_ssize_t i)
{
    f32x4 four;
    memcpy(&four, values + i * (Py_ssize_t)sizeof(float), sizeof four);
    f64x4 wide = __builtin_convertvector(four, f64x4);
    return wide * wide;
}

static ALWAYS_INLINE f64x4 larger(f64x4 a, f64x4 b)
{
    i64x4 a_wins = a > b;
    return (f64x4)(((i64x4)a & a_wins) | ((i64x4)b & ~a_wins));
}

static ALWAYS_INLINE double square(float value)
{
    double wide = value;
    return wide * wide;
}

static double sum_of_few_squares(const char *values, Py_ssize_t n, double *peak)
{
    double sum = -0.0; /* as numpy starts: a sum of nothing but -0.0 stays -0.0 */
    for (Py_ssize_t i = 0; i < n; i++) {
        double sq = square(float_at(values, i));
        sum += sq;
        *peak = sq > *peak ? sq : *peak;
    }
    return sum;
}

/* Eight running sums (two vectors of four) over a run of 8..PAIRWISE_RUN values, then the tail
 * one by one. */
FOR_EACH_CPU
static double sum_of_run_squares(const char *values, Py_ssize_t n, double *peak)
{
    f64x4 low = squares_of_four(values, 0), high = squares_of_four(values, 4);
    f64x4 top = larger(low, high);
    Py_ssize_t i = 8;
    for (; i < n - n % 8; i += 8) {
        f64x4 next_low = squares_of_four(values, i), next_high = squares_of_four(values, i + 4);
        low += next_low;
        high += next_high;
        top = larger(top, larger(next_low, next_high));
    }
    for (int lane = 0; lane < 4; lane++)
        *peak = top[lane] > *peak ? top[lane] : *peak;
    double sum = ((low[0] + low[1]) + (low[2] + low[3])) + ((high[0] + high[1]) + (high[2] + high[3]));
    for (; i < n; i++) {
        double sq = square(float_at(values, i));
        sum += sq;
        *peak = sq > *peak ? sq : *peak;
    }
    return sum;
}

static double pairwise_sum_of_squares(const char *values, Py_ssize_t n, double *peak)
{
    if (n < 8)
        return sum_of_few_squares(values, n, peak);
    if (n <= PAIRWISE_RUN)
        return sum_of_run_squares(values, n, peak);
    Py_ssize_t half = n / 2;
    half -= half % 8;
    double left = pairwise_sum_of_squares(values, half, peak);
    return left + pairwise_sum_of_squares(values + half * sizeof(float), n - half, peak);
}

static int float32_count(Py_buffer *buffer, const char *name, Py_ssize_t *count)
{
    if (buffer->len % (Py_ssize_t)sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "%s is not a whole number of float32 values", name);
        return -1;
    }
    *count = buffer->len / (Py_ssize_t)sizeof(float);
    return 0;
}

PyDoc_STRVAR(square_sums_doc,
"square_sums(values, sums, peaks, block)\n--\n\n"
"For each block of *block* float32 *values* (the last may be shorter), store the pairwise\n"
"sum of their float64 squares in *sums* and their largest square in *peaks* (float64).");

static PyObject *square_sums(PyObject *module, PyObject *args)
{
    Py_buffer values, sums, peaks;
    Py_ssize_t block, n;
    if (!PyArg_ParseTuple(args, "y*w*w*n", &values, &sums, &peaks, &block))
        return NULL;
    PyObject *result = NULL;
    if (float32_count(&values, "values", &n) < 0)
        goto release;
    if (block <= 0) {
        PyErr_SetString(PyExc_ValueError, "block must be positive");
        goto release;
    }
    Py_ssize_t blocks = n / block + (n % block != 0);
    Py_ssize_t room = blocks * (Py_ssize_t)sizeof(double);
    if (sums.len < room || peaks.len < room) {
        PyErr_SetString(PyExc_ValueError, "sums and peaks need one float64 per block");
        goto release;
    }
    const char *v = values.buf;
    double *sum = sums.buf, *peak = peaks.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < blocks; k++) {
        Py_ssize_t start = k * block, count = n - start < block ? n - start : block;
        peak[k] = 0.0;
        sum[k] = pairwise_sum_of_squares(v + start * sizeof(float), count, &peak[k]);
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
release:
    PyBuffer_Release(&values);
    PyBuffer_Release(&sums);
    PyBuffer_Release(&peaks);
    return result;
}

/* Scale one tile; its values whose two candidates differ go to *indices* and *originals*, unless
 * there is no room for them, in which case nothing is written and -1 returned. */
FOR_EACH_CPU
static Py_ssize_t scale_tile(const char *v, char *out, Py_ssize_t n, double below, double above,
                             int64_t *indices, float *originals, Py_ssize_t room, int64_t first)
{
    float low[SCALE_TILE], high[SCALE_TILE];
    uint32_t differ = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        double wide = float_at(v, j);
        low[j] = (float)(wide * below);
        high[j] = (float)(wide * above);
    }
    for (Py_ssize_t j = 0; j < n; j++) { /* compare bits: NaN stays NaN on both sides */
        uint32_t a, b;
        memcpy(&a, &low[j], sizeof a);
        memcpy(&b, &high[j], sizeof b);
        differ |= a ^ b;
    }
    Py_ssize_t found = 0;
    if (differ) {
        for (Py_ssize_t j = 0; j < n; j++)
            found += memcmp(&low[j], &high[j], sizeof(float)) != 0;
        if (found > room)
            return -1;
        found = 0;
        for (Py_ssize_t j = 0; j < n; j++) {
            if (memcmp(&low[j], &high[j], sizeof(float))) {
                indices[found] = first + j;
                originals[found++] = float_at(v, j); /* before *out*, which may be *v* */
            }
        }
    }
    memcpy(out, low, (size_t)n * sizeof(float));
    return found;
}

PyDoc_STRVAR(scale_bracketed_doc,
"scale_bracketed(src, dst, below, above, indices, originals) -> (done, found)\n--\n\n"
"dst = float32(src * below) for float32 *src* (*dst* may be *src*), noting in *indices*\n"
"(int64) and *originals* (float32) the values where float32(src * above) differs.  Stops\n"
"early when those are full: *done* values were written, *found* of them noted.");

static PyObject *scale_bracketed(PyObject *module, PyObject *args)
{
    Py_buffer src, dst, indices, originals;
    double below, above;
    Py_ssize_t n, n_out, room, done = 0, found = 0;
    if (!PyArg_ParseTuple(args, "y*w*ddw*w*", &src, &dst, &below, &above, &indices,
                          &originals))
        return NULL;
    PyObject *result = NULL;
    if (float32_count(&src, "src", &n) < 0 || float32_count(&dst, "dst", &n_out) < 0)
        goto release;
    if (n != n_out) {
        PyErr_SetString(PyExc_ValueError, "src and dst differ in size");
        goto release;
    }
    room = indices.len / (Py_ssize_t)sizeof(int64_t);
    if (originals.len / (Py_ssize_t)sizeof(float) < room)
        room = originals.len / (Py_ssize_t)sizeof(float);
    if (room < SCALE_TILE) { /* less could stop before the first tile, for good */
        PyErr_Format(PyExc_ValueError, "indices and originals need room for %d values",
                     SCALE_TILE);
        goto release;
    }
    const char *v = src.buf;
    char *out = dst.buf;
    int64_t *index = indices.buf;
    float *original = originals.buf;
    Py_BEGIN_ALLOW_THREADS
    while (done < n) {
        Py_ssize_t count = n - done < SCALE_TILE ? n - done : SCALE_TILE;
        Py_ssize_t at = done * (Py_ssize_t)sizeof(float);
        Py_ssize_t noted = scale_tile(v + at, out + at, count, below, above, index + found,
                                      original + found, room - found, done);
        if (noted < 0)
            break;
        found += noted;
        done += count;
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("nn", done, found);
release:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&indices);
    PyBuffer_Release(&originals);
    return result;
}

static PyMethodDef kernel_methods[] = {
    {"square_sums", square_sums, METH_VARARGS, square_sums_doc},
    {"scale_bracketed", scale_bracketed, METH_VARARGS, scale_bracketed_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef kernels_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gclip_cli._kernels",
    .m_doc = "Compiled float32 kernels of gclip's two passes (see _kernels.c).",
    .m_size = 0,
    .m_methods = kernel_methods,
};

PyMODINIT_FUNC PyInit__kernels(void)
{
    return PyModuleDef_Init(&kernels_module);
}

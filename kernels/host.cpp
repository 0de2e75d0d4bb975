/* The host build of the preprocessing and postprocessing kernels: the functions of pixel_math.h
 * looped over with OpenMP, behind a plain C ABI that appliance/kernels.py loads with ctypes.
 *
 * Built by setup.py with g++ -O3 -fopenmp -ffp-contract=off: contraction of a * b + c into a fused
 * multiply-add would round differently from numpy and from the device (nvcc -fmad=false).  The
 * loops are compiled three times, for SSE2 (any x86-64), AVX2+FMA and AVX-512, and the widest
 * the processor has is chosen at run time, so one build runs everywhere at the speed of its host.
 *
 * The tap tables and descriptors are made by the caller (appliance/kernels.py, through the
 * akh_taps / akh_prepare entry points below) and are the same ones the CUDA kernels receive. */
#include "pixel_math.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

/* Bumped whenever AkImage, AkBatch or a signature below changes; the loader refuses a mismatch. */
#define AK_ABI_VERSION 1

namespace {

struct Scratch {
    std::vector<float> rows, column, values, work;
};

namespace isa_baseline {
#include "host_loops.inc"
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AK_MULTI_ISA 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,movbe,popcnt")
namespace isa_avx2 {
#include "host_loops.inc"
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,lzcnt,movbe,popcnt", \
                   "prefer-vector-width=512")
namespace isa_avx512 {
#include "host_loops.inc"
}
#pragma GCC pop_options
#endif

typedef void (*BandFn)(const AkImage &, const AkBatch &, int, int, int, const int32_t *, const float *,
                       const float *, void *, Scratch &);
typedef void (*SpanFn)(const float *, float *, int64_t, int64_t);

struct Isa {
    const char *name;
    BandFn band;
    SpanFn sigmoid;
};

/* The widest instruction set this processor runs; APPLIANCE_KERNELS_ISA=baseline|avx2|avx512 caps
 * it (to compare them, or to rule one out). */
const Isa &isa() {
    static const Isa chosen = [] {
        Isa best = {"baseline", isa_baseline::run_band, isa_baseline::sigmoid_span};
#if defined(AK_MULTI_ISA)
        const char *cap = getenv("APPLIANCE_KERNELS_ISA");
        const bool allow_avx2 = !cap || strcmp(cap, "baseline") != 0;
        const bool allow_avx512 = !cap || (strcmp(cap, "baseline") != 0 && strcmp(cap, "avx2") != 0);
        __builtin_cpu_init();
        if (allow_avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
            __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2"))
            best = {"avx2", isa_avx2::run_band, isa_avx2::sigmoid_span};
        if (allow_avx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
            best = {"avx512", isa_avx512::run_band, isa_avx512::sigmoid_span};
#endif
        return best;
    }();
    return chosen;
}

int thread_count(int threads) {
#if defined(_OPENMP)
    return threads > 0 ? threads : omp_get_max_threads();
#else
    (void)threads;
    return 1;
#endif
}

template <typename T>
void stored_range(const AkImage &im, float *lo, float *hi) {
    const T *base = (const T *)(uintptr_t)im.pixels;
    float mn = ak_stored(base[0], im.bits_stored), mx = mn;
    for (int y = 0; y < im.rows; ++y) {
        const T *row = base + (int64_t)y * im.row_stride;
        for (int x = 0; x < im.columns; ++x) {
            const float v = ak_stored(row[x], im.bits_stored);
            mn = v < mn ? v : mn;
            mx = v > mx ? v : mx;
        }
    }
    *lo = mn;
    *hi = mx;
}

/* The lowest and highest modality value of an image: the modality LUT is monotone, so they are the
 * LUT of the lowest and highest stored values (swapped by a negative slope). */
void modality_range(const AkImage &im, double *lo, double *hi) {
    float smin = 0.0f, smax = 0.0f;
    switch (im.dtype) {
    case AK_U8: stored_range<uint8_t>(im, &smin, &smax); break;
    case AK_I8: stored_range<int8_t>(im, &smin, &smax); break;
    case AK_U16: stored_range<uint16_t>(im, &smin, &smax); break;
    case AK_I16: stored_range<int16_t>(im, &smin, &smax); break;
    case AK_U32: stored_range<uint32_t>(im, &smin, &smax); break;
    case AK_I32: stored_range<int32_t>(im, &smin, &smax); break;
    default: stored_range<float>(im, &smin, &smax); break;
    }
    const float a = ak_modality(smin, im.slope, im.intercept), b = ak_modality(smax, im.slope, im.intercept);
    *lo = a < b ? a : b;
    *hi = a < b ? b : a;
}

} // namespace

extern "C" {

int akh_abi_version(void) { return AK_ABI_VERSION; }
int akh_sizeof_image(void) { return (int)sizeof(AkImage); }
int akh_sizeof_batch(void) { return (int)sizeof(AkBatch); }
const char *akh_isa(void) { return isa().name; }

int akh_max_threads(void) { return thread_count(0); }

/* Taps per output sample of an axis resized from n_in to n_out samples. */
int akh_taps_width(int n_in, int n_out, int mode) {
    int width = 1;
    for (int o = 0; o < n_out; ++o) {
        int first, last;
        ak_resize_span(n_in, n_out, mode, o, &first, &last);
        width = last - first + 1 > width ? last - first + 1 : width;
    }
    return width < n_in ? width : n_in;
}

/* The tap table of an axis: for each output sample o, the first input sample first[o] and
 * `taps` weights, stored tap-major (weight[k * n_out + o]) so that neighbouring output samples read
 * neighbouring weights, on the device (coalesced) and on the host (vector loads).  A span shorter
 * than `taps` gets zero weights; spans are shifted left at the end of the axis so that every tap
 * lies inside it; a zero weight adds an exact 0 to the sum. */
void akh_taps(int n_in, int n_out, int mode, int taps, int32_t *first, float *weight) {
    for (int o = 0; o < n_out; ++o) {
        int lo, hi;
        ak_resize_span(n_in, n_out, mode, o, &lo, &hi);
        int start = lo < n_in - taps ? lo : n_in - taps;
        start = start < 0 ? 0 : start;
        first[o] = start;
        for (int k = 0; k < taps; ++k) {
            const int i = start + k;
            weight[(int64_t)k * n_out + o] =
                (i >= lo && i <= hi) ? (float)ak_resize_weight(n_in, n_out, mode, o, i) : 0.0f;
        }
    }
}

void akh_gaussian_weights(double sigma, int radius, float *weight) { ak_gaussian_weights(sigma, radius, weight); }

/* Derive each image's VOI constants; for AK_VOI_RANGE first find its modality value range (one
 * pass over its pixels, which must be at their host addresses). */
void akh_prepare(AkImage *images, int count, int threads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(thread_count(threads))
    for (int i = 0; i < count; ++i) {
        AkImage &im = images[i];
        if (im.voi == AK_VOI_RANGE)
            modality_range(im, &im.center, &im.width);
        int voi = im.voi;
        ak_voi_constants(&voi, im.center, im.width, &im.c0, &im.c1);
        im.voi = voi;
    }
}

/* The fused preprocessing of a batch into an NCHW tensor: the host twin of ak_preprocess_kernel.
 * Work is split into bands of output rows of one image, sized so that the source rows a band
 * reads stay in the core's cache. */
void akh_preprocess(const AkImage *images, int count, const AkBatch *batch, const int32_t *tap_first,
                    const float *tap_weight, const float *filter_weight, void *out, int threads) {
    const AkBatch b = *batch;
    std::vector<int> task_image, task_row;
    for (int n = 0; n < count; ++n) {
        const AkImage &im = images[n];
        const double rows_per_output = im.rows > b.rows ? (double)im.rows / b.rows : 1.0;
        int band = (int)(32768.0 / (im.columns > 0 ? im.columns : 1) / (rows_per_output + im.ty_taps));
        band = band < 1 ? 1 : (band > b.rows ? b.rows : band);
        for (int oy = 0; oy < b.rows; oy += band) {
            task_image.push_back(n);
            task_row.push_back(oy);
            task_row.push_back(oy + band < b.rows ? oy + band : b.rows);
        }
    }
    const int tasks = (int)task_image.size();
    const BandFn run = isa().band;
#pragma omp parallel num_threads(thread_count(threads))
    {
        Scratch scratch;
#pragma omp for schedule(dynamic, 1)
        for (int t = 0; t < tasks; ++t) {
            const int n = task_image[t];
            run(images[n], b, n, task_row[2 * t], task_row[2 * t + 1], tap_first, tap_weight, filter_weight,
                out, scratch);
        }
    }
}

void akh_sigmoid(const float *x, float *y, int64_t count, int threads) {
    const SpanFn run = isa().sigmoid;
    const int64_t chunk = 1 << 16;
    const int64_t chunks = (count + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(thread_count(threads))
    for (int64_t c = 0; c < chunks; ++c)
        run(x, y, c * chunk, (c + 1) * chunk < count ? (c + 1) * chunk : count);
}

/* Softmax over the channel axis of an (outer, channels, inner) array. */
void akh_softmax(const float *x, float *y, int64_t outer, int channels, int64_t inner, int threads) {
#pragma omp parallel for schedule(static) num_threads(thread_count(threads))
    for (int64_t i = 0; i < outer * inner; ++i) {
        const int64_t start = (i / inner) * channels * inner + i % inner;
        ak_softmax(x + start, y + start, channels, inner);
    }
}

/* Argmax over the channel axis of an (outer, channels, inner) array, to int32 labels. */
void akh_argmax(const float *x, int32_t *labels, int64_t outer, int channels, int64_t inner, int threads) {
#pragma omp parallel for schedule(static) num_threads(thread_count(threads))
    for (int64_t i = 0; i < outer * inner; ++i) {
        const int64_t o = i / inner, j = i % inner;
        labels[i] = ak_argmax(x + o * channels * inner + j, channels, inner);
    }
}

/* Label maps (count, rows_in, columns_in) back to (count, rows, columns) by nearest sample. */
void akh_labels_nearest(const int32_t *labels, int32_t *out, int64_t count, int rows_in, int columns_in, int rows,
                        int columns, int threads) {
    std::vector<int> xs(columns);
    for (int x = 0; x < columns; ++x)
        xs[x] = ak_nearest_index(columns_in, columns, x);
#pragma omp parallel for schedule(static) num_threads(thread_count(threads))
    for (int64_t r = 0; r < count * rows; ++r) {
        const int64_t m = r / rows;
        const int y = ak_nearest_index(rows_in, rows, (int)(r % rows));
        const int32_t *src = labels + (m * rows_in + y) * (int64_t)columns_in;
        int32_t *dst = out + r * (int64_t)columns;
        for (int x = 0; x < columns; ++x)
            dst[x] = src[xs[x]];
    }
}

} // extern "C"

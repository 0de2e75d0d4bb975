/* CUDA kernels of preprocessing and postprocessing.  They only index: each thread finds its
 * output element and calls the per-pixel maths of pixel_math.h, the same functions the host build
 * (host.cpp) loops over.  Compile with -fmad=false so the device rounds as the host does.
 *
 * Launch shapes (appliance/kernels.py):
 *   ak_preprocess*_kernel     block (32, 8), grid (ceil(columns/32), ceil(rows/8), images)
 *   the element-wise kernels  block 256, grid ceil(count/256); integer arguments are int64 so
 *                             that pycuda packs them without alignment gaps
 */
#include "pixel_math.h"

#define AK_BLOCK 256
/* A floor on resident blocks lets ptxas budget up to 85 registers; without it ptxas aims lower
 * and spills around the calls into the IEEE division's slow path on some architectures. */
#define AK_MIN_BLOCKS 3

/* One output pixel of one image per thread: resize taps over the fused stored value -> modality
 * -> VOI -> inversion (-> noise filter) chain, then normalise, replicate and store.  One kernel per
 * filter, so that the unfiltered kernel, the one that matters for speed, carries none of the
 * median's registers. */
template <int FILTER>
__device__ __forceinline__ void ak_preprocess_pixel(const AkImage *images, const AkBatch *batch,
                                                    const unsigned char *pixels, const int32_t *tap_first,
                                                    const float *tap_weight, const float *filter_weight,
                                                    void *out) {
    /* references, not copies: fields are read through the cache as needed, and the channel
     * loop's mean[c] and std[c] index memory, not a local array */
    const AkBatch &b = *batch;
    const int ox = blockIdx.x * blockDim.x + threadIdx.x;
    const int oy = blockIdx.y * blockDim.y + threadIdx.y;
    const int n = blockIdx.z;
    if (ox >= b.columns || oy >= b.rows)
        return;
    const AkImage &im = images[n];
    const float v = ak_resampled_at(im, b, FILTER, pixels + im.pixels, tap_first, tap_weight, filter_weight, oy, ox);
    ak_store(b, out, n, oy, ox, v);
}

#define AK_PREPROCESS_KERNEL(name, filter)                                                         \
    extern "C" __global__ void __launch_bounds__(AK_BLOCK, AK_MIN_BLOCKS)                          \
        name(const AkImage *__restrict__ images, const AkBatch *__restrict__ batch,                \
             const unsigned char *__restrict__ pixels, const int32_t *__restrict__ tap_first,      \
             const float *__restrict__ tap_weight, const float *__restrict__ filter_weight,        \
             void *__restrict__ out) {                                                             \
        ak_preprocess_pixel<filter>(images, batch, pixels, tap_first, tap_weight, filter_weight, out); \
    }

AK_PREPROCESS_KERNEL(ak_preprocess_kernel, AK_FILTER_NONE)
AK_PREPROCESS_KERNEL(ak_preprocess_gaussian_kernel, AK_FILTER_GAUSSIAN)
AK_PREPROCESS_KERNEL(ak_preprocess_median_kernel, AK_FILTER_MEDIAN)

/* Element-wise logistic sigmoid of `count` float32 values. */
extern "C" __global__ void __launch_bounds__(AK_BLOCK, AK_MIN_BLOCKS)
ak_sigmoid_kernel(const float *__restrict__ x, float *__restrict__ y, int64_t count) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count)
        y[i] = ak_sigmoid(x[i]);
}

/* Softmax over the channel axis of an (outer, channels, inner) array: one thread per (outer, inner). */
extern "C" __global__ void __launch_bounds__(AK_BLOCK, AK_MIN_BLOCKS)
ak_softmax_kernel(const float *__restrict__ x, float *__restrict__ y, int64_t outer, int64_t channels,
                  int64_t inner) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= outer * inner)
        return;
    const int64_t start = (i / inner) * channels * inner + i % inner;
    ak_softmax(x + start, y + start, (int)channels, inner);
}

/* Argmax over the channel axis of an (outer, channels, inner) array, to int32 labels. */
extern "C" __global__ void __launch_bounds__(AK_BLOCK, AK_MIN_BLOCKS)
ak_argmax_kernel(const float *__restrict__ x, int32_t *__restrict__ labels, int64_t outer, int64_t channels,
                 int64_t inner) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= outer * inner)
        return;
    const int64_t o = i / inner, j = i % inner;
    labels[i] = ak_argmax(x + o * channels * inner + j, (int)channels, inner);
}

/* Label maps (count, rows_in, columns_in) int32 back to a source grid (rows, columns) by nearest
 * sample: labels are classes, never blended. */
extern "C" __global__ void __launch_bounds__(AK_BLOCK, AK_MIN_BLOCKS)
ak_labels_nearest_kernel(const int32_t *__restrict__ labels, int32_t *__restrict__ out, int64_t count,
                         int64_t rows_in, int64_t columns_in, int64_t rows, int64_t columns) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t plane = (int64_t)rows * columns;
    if (i >= count * plane)
        return;
    const int64_t m = i / plane, p = i % plane;
    const int y = ak_nearest_index((int)rows_in, (int)rows, (int)(p / columns));
    const int x = ak_nearest_index((int)columns_in, (int)columns, (int)(p % columns));
    out[i] = labels[m * rows_in * columns_in + (int64_t)y * columns_in + x];
}

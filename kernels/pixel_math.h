/* Per-pixel maths of preprocessing and postprocessing: one source for the GPU and the CPU.
 *
 * Under nvcc every function here is __host__ __device__; under a host compiler it is a plain
 * inline function.  The CUDA kernels (preprocess.cu) and the host build (host.cpp) only index:
 * they decide which pixel to visit and call these functions in the same order, so that with
 * contraction of multiply-adds switched off (nvcc -fmad=false, gcc -ffp-contract=off) the device
 * and the host produce the same bits.
 *
 * The numpy reference (appliance/preprocessing.py, appliance/kernels_reference.py) defines what
 * each step computes; this header follows its float32 rounding step by step:
 *   stored value   PS3.5 8.1.1 / PS3.3 C.7.6.3.1: Bits Stored masking, two's complement sign extension
 *   modality LUT   PS3.3 C.11.1: value * Rescale Slope + Rescale Intercept
 *   VOI LUT        PS3.3 C.11.2.1.2.1 (LINEAR, incl. width 1), C.11.2.1.3.1 (LINEAR_EXACT),
 *                  C.11.2.1.3.2 (SIGMOID), mapped to [0, 1]
 *   MONOCHROME1    PS3.3 C.7.6.3.1.2: minimum is white, so 1 - v
 *   noise filter   optional, on the [0, 1] image: separable Gaussian or a median, edges replicated
 *   resize         separable taps: area averaging when downsampling, else bilinear with half-pixel
 *                  centres; vertical taps first, then horizontal (as wh @ img @ ww.T)
 *   normalisation  (v - mean[c]) / std[c], replicated over channels, stored as float32 or float16
 */
#ifndef APPLIANCE_PIXEL_MATH_H
#define APPLIANCE_PIXEL_MATH_H

#if defined(__CUDACC__)
#define AK_FN __host__ __device__ __forceinline__
#elif defined(__GNUC__)
/* always inlined, so that the host build's AVX2 and AVX-512 loops (host.cpp) get them in their
 * own instruction set */
#define AK_FN static inline __attribute__((always_inline))
#else
#define AK_FN static inline
#endif

#include <math.h>
#include <stdint.h>

/* Loops over a compile-time count are unrolled on the device so that small arrays stay in
 * registers; the host compiler decides for itself. */
#if defined(__CUDA_ARCH__)
#define AK_UNROLL _Pragma("unroll")
#else
#define AK_UNROLL
#endif
#if !defined(__CUDA_ARCH__)
#include <string.h>
#endif

/* Pixel data types (AkImage.dtype). */
enum { AK_U8 = 0, AK_I8 = 1, AK_U16 = 2, AK_I16 = 3, AK_U32 = 4, AK_I32 = 5, AK_F32 = 6 };

/* VOI functions (AkImage.voi).  THRESHOLD is LINEAR with Window Width 1; RANGE stretches the
 * image's own value range when it has no window; ZERO is a range of a single value; IDENTITY
 * passes values through (resampling model outputs). */
enum {
    AK_VOI_LINEAR = 0, AK_VOI_LINEAR_EXACT = 1, AK_VOI_SIGMOID = 2, AK_VOI_THRESHOLD = 3,
    AK_VOI_RANGE = 4, AK_VOI_ZERO = 5, AK_VOI_IDENTITY = 6
};

enum { AK_RESIZE_AREA = 0, AK_RESIZE_BILINEAR = 1 };
enum { AK_FILTER_NONE = 0, AK_FILTER_GAUSSIAN = 1, AK_FILTER_MEDIAN = 2 };
enum { AK_OUT_F32 = 0, AK_OUT_F16 = 1 };

#define AK_MAX_CHANNELS 4
#define AK_MAX_MEDIAN_RADIUS 2

/* One image of a batch.  Images of one batch may differ in size, type and every parameter. */
typedef struct AkImage {
    uint64_t pixels;      /* host: address of pixel (0, 0); device: byte offset into the batch's buffer */
    double center;        /* VOI window centre, in modality units (PS3.3 C.11.2.1.2) */
    double width;         /* VOI window width */
    int32_t rows, columns;
    int32_t row_stride;   /* elements from one row to the next */
    int32_t dtype;        /* AK_U8 ... AK_F32; signed types are sign-extended from bits_stored */
    int32_t bits_stored;  /* 1 ... bits of dtype; ignored for AK_F32 */
    int32_t voi;          /* AK_VOI_* */
    int32_t invert;       /* MONOCHROME1: 1 - v after the VOI */
    float slope, intercept;
    float c0, c1;         /* VOI constants derived by ak_voi_constants (ak_image_prepare) */
    int32_t ty_first, ty_weight, ty_taps; /* vertical taps: offsets into the tap tables, taps per row */
    int32_t tx_first, tx_weight, tx_taps; /* horizontal taps */
    int32_t reserved;
} AkImage;

/* What the whole batch shares: the model input's shape, normalisation and optional noise filter. */
typedef struct AkBatch {
    int32_t rows, columns, channels, out_dtype;
    int32_t filter, filter_radius, reserved0, reserved1;
    float mean[AK_MAX_CHANNELS];
    float std[AK_MAX_CHANNELS];
} AkBatch;

/* Bytes per sample of a dtype. */
AK_FN int ak_dtype_size(int dtype) { return dtype <= AK_I8 ? 1 : (dtype <= AK_I16 ? 2 : 4); }

/* ---- bit casts -------------------------------------------------------------------------------- */

AK_FN float ak_float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

AK_FN uint32_t ak_bits_from_float(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
#endif
}

/* ---- stored value and modality LUT ------------------------------------------------------------ */

/* An unsigned stored value: only the low Bits Stored bits carry the pixel (PS3.5 8.1.1). */
AK_FN float ak_stored_unsigned(uint32_t raw, int bits_stored) {
    const uint32_t mask = bits_stored >= 32 ? 0xffffffffu : ((1u << bits_stored) - 1u);
    return (float)(raw & mask);
}

/* A signed stored value: two's complement in the low Bits Stored bits, sign-extended. */
AK_FN float ak_stored_signed(uint32_t raw, int bits_stored) {
    const int shift = 32 - bits_stored;
    return (float)((int32_t)(raw << shift) >> shift);
}

/* Stored value of one typed sample.  Float pixel data (Float Pixel Data) has no Bits Stored. */
AK_FN float ak_stored(uint8_t raw, int bits) { return ak_stored_unsigned(raw, bits); }
AK_FN float ak_stored(int8_t raw, int bits) { return ak_stored_signed((uint32_t)(uint8_t)raw, bits); }
AK_FN float ak_stored(uint16_t raw, int bits) { return ak_stored_unsigned(raw, bits); }
AK_FN float ak_stored(int16_t raw, int bits) { return ak_stored_signed((uint32_t)(uint16_t)raw, bits); }
AK_FN float ak_stored(uint32_t raw, int bits) { return ak_stored_unsigned(raw, bits); }
AK_FN float ak_stored(int32_t raw, int bits) { return ak_stored_signed((uint32_t)raw, bits); }
AK_FN float ak_stored(float raw, int bits) { (void)bits; return raw; }

/* Modality LUT by rescale (PS3.3 C.11.1.1.2): two float32 roundings, as numpy does. */
AK_FN float ak_modality(float stored, float slope, float intercept) {
    const float scaled = stored * slope;
    return scaled + intercept;
}

/* ---- exp, for SIGMOID and the activations ----------------------------------------------------- */

/* exp(x) in float32 from float32 operations only, so that the device and the host round alike
 * (the device's expf and the C library's differ in the last bit).  Cody-Waite reduction by ln 2,
 * a degree-7 polynomial on [-ln2/2, ln2/2], then 2^k applied in two exact halves so that
 * results near overflow and in the subnormal range round once.  Within 1-2 ulp of exp. */
AK_FN float ak_expf(float x) {
    x = x < -104.0f ? -104.0f : x;  /* exp(-104) rounds to 0 */
    x = x > 89.0f ? 89.0f : x;      /* exp(89) overflows to inf */
    /* round to nearest integer: adding 1.5 * 2^23 leaves no fraction bits */
    const float shifter = 12582912.0f;
    const float t = x * 1.44269502f;
    const float kf = (t + shifter) - shifter;
    float r = x - kf * 0.693359375f;  /* ln 2, high part: kf * hi is exact */
    r = r - kf * -2.12194440e-4f;     /* ln 2, low part */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r;
    p = p + 1.0f;
    const int k = (int)kf;
    const int k1 = k / 2, k2 = k - k1;
    const float s1 = ak_float_from_bits((uint32_t)(k1 + 127) << 23);
    const float s2 = ak_float_from_bits((uint32_t)(k2 + 127) << 23);
    return (p * s1) * s2;
}

/* ---- VOI LUT ---------------------------------------------------------------------------------- */

/* Derive the float32 constants of a VOI function from the window in double, rounding each once,
 * exactly as numpy does when a Python float meets a float32 array.  LINEAR with width 1 becomes a
 * threshold (PS3.3 C.11.2.1.2.1). */
AK_FN void ak_voi_constants(int *voi, double center, double width, float *c0, float *c1) {
    switch (*voi) {
    case AK_VOI_LINEAR:
        if (width == 1.0) {
            *voi = AK_VOI_THRESHOLD;
            *c0 = (float)(center - 0.5);
            *c1 = 1.0f;
        } else {
            *c0 = (float)(center - 0.5);
            *c1 = (float)(width - 1.0);
        }
        break;
    case AK_VOI_THRESHOLD:
        *c0 = (float)(center - 0.5);
        *c1 = 1.0f;
        break;
    case AK_VOI_LINEAR_EXACT:
    case AK_VOI_SIGMOID:
        *c0 = (float)center;
        *c1 = (float)width;
        break;
    case AK_VOI_RANGE: /* center: the lowest value, width: the highest */
        if (width > center) {
            *c0 = (float)center;
            *c1 = (float)(width - center);
        } else {
            *voi = AK_VOI_ZERO;
            *c0 = 0.0f;
            *c1 = 1.0f;
        }
        break;
    default:
        *c0 = 0.0f;
        *c1 = 1.0f;
        break;
    }
}

AK_FN float ak_clamp01(float y) { return y < 0.0f ? 0.0f : (y > 1.0f ? 1.0f : y); }

/* A modality value through the VOI function, to [0, 1].
 *   LINEAR        ((x - (c - 0.5)) / (w - 1) + 0.5) clipped            c0 = c - 0.5, c1 = w - 1
 *   LINEAR_EXACT  ((x - c) / w + 0.5) clipped                           c0 = c, c1 = w
 *   SIGMOID       1 / (1 + exp(-4 (x - c) / w))                         c0 = c, c1 = w
 *   THRESHOLD     x > c - 0.5                                           c0 = c - 0.5
 *   RANGE         (x - lo) / (hi - lo)                                  c0 = lo, c1 = hi - lo
 * The functions share one division: on the device an IEEE division is a long sequence with a
 * called slow path, and fewer of them keep the fused kernel in registers. */
AK_FN float ak_voi(float x, int voi, float c0, float c1) {
    if (voi == AK_VOI_IDENTITY)
        return x;
    if (voi == AK_VOI_ZERO)
        return 0.0f;
    if (voi == AK_VOI_THRESHOLD)
        return x > c0 ? 1.0f : 0.0f;
    float d = x - c0;
    if (voi == AK_VOI_SIGMOID)
        d = -4.0f * d;
    const float q = d / c1;
    if (voi == AK_VOI_SIGMOID)
        return 1.0f / (1.0f + ak_expf(q));
    if (voi == AK_VOI_RANGE)
        return q;
    return ak_clamp01(q + 0.5f);
}

/* MONOCHROME1: the minimum value is displayed white (PS3.3 C.7.6.3.1.2). */
AK_FN float ak_invert(float v, int invert) { return invert ? 1.0f - v : v; }

/* A stored value to its [0, 1] intensity: modality LUT, VOI, inversion.  `voi` is the image's;
 * the host passes it as a compile-time constant to specialise its loops. */
AK_FN float ak_intensity(float stored, const AkImage &im, int voi) {
    const float m = ak_modality(stored, im.slope, im.intercept);
    return ak_invert(ak_voi(m, voi, im.c0, im.c1), im.invert);
}

/* The stored value of pixel (y, x) of an image whose samples start at `base`, of any dtype: one
 * load of the sample's width, then the type's masking or sign extension. */
AK_FN float ak_stored_at(const AkImage &im, const unsigned char *base, int y, int x) {
    const int64_t i = (int64_t)y * im.row_stride + x;
    const int dtype = im.dtype;
    uint32_t raw;
    if (dtype <= AK_I8)
        raw = base[i];
    else if (dtype <= AK_I16)
        raw = ((const uint16_t *)base)[i];
    else
        raw = ((const uint32_t *)base)[i];
    if (dtype == AK_F32)
        return ak_float_from_bits(raw);
    if (dtype == AK_I8 || dtype == AK_I16 || dtype == AK_I32)
        return ak_stored_signed(raw, im.bits_stored);
    return ak_stored_unsigned(raw, im.bits_stored);
}

/* ---- noise filters ---------------------------------------------------------------------------- */

AK_FN int ak_clampi(int i, int lo, int hi) { return i < lo ? lo : (i > hi ? hi : i); }

/* Gaussian taps exp(-k^2 / (2 sigma^2)) for k = -radius..radius, normalised to sum 1 in double and
 * rounded once to float32. */
AK_FN void ak_gaussian_weights(double sigma, int radius, float *w) {
    double sum = 0.0;
    for (int k = -radius; k <= radius; ++k) {
        const double q = (double)k / sigma;
        sum += exp(-0.5 * (q * q));
    }
    for (int k = -radius; k <= radius; ++k) {
        const double q = (double)k / sigma;
        w[k + radius] = (float)(exp(-0.5 * (q * q)) / sum);
    }
}

/* Median of n values (n odd, at most (2 * AK_MAX_MEDIAN_RADIUS + 1)^2) by odd-even transposition
 * sort: a fixed sequence of compare-exchanges, unrolled into registers on the device. */
template <int N>
AK_FN float ak_median(float *v) {
    AK_UNROLL
    for (int pass = 0; pass < N; ++pass) {
        AK_UNROLL
        for (int i = pass & 1; i + 1 < N; i += 2) {
            const float a = v[i], b = v[i + 1];
            v[i] = a < b ? a : b;
            v[i + 1] = a < b ? b : a;
        }
    }
    return v[N / 2];
}

/* ---- resize ----------------------------------------------------------------------------------- */

/* Area averaging when downsampling an axis; an area resize that upsamples is bilinear, as box
 * filtering a smaller grid would only replicate pixels. */
AK_FN int ak_resize_is_area(int n_in, int n_out, int mode) {
    return mode == AK_RESIZE_AREA && n_out <= n_in;
}

/* The first and last input sample that output sample o of an axis reads. */
AK_FN void ak_resize_span(int n_in, int n_out, int mode, int o, int *first, int *last) {
    const double scale = (double)n_in / (double)n_out;
    if (ak_resize_is_area(n_in, n_out, mode)) {
        const double lo = (double)o * scale, hi = (double)(o + 1) * scale;
        const int end = (int)ceil(hi);
        *first = (int)floor(lo);
        *last = (end < n_in ? end : n_in) - 1;
    } else {
        double src = ((double)o + 0.5) * scale;
        src = src - 0.5;
        src = src < 0.0 ? 0.0 : src;
        src = src > (double)(n_in - 1) ? (double)(n_in - 1) : src;
        const int i0 = (int)floor(src);
        *first = i0;
        *last = i0 + 1 < n_in - 1 ? i0 + 1 : n_in - 1;
    }
}

/* Weight of input sample i in output sample o, in double, as the reference's weight matrix row:
 * area: the length of [i, i+1) inside [o, o+1) * scale, over scale; bilinear: half-pixel centres,
 * src = (o + 0.5) * scale - 0.5 clamped to the axis, 1 - f and f on its two neighbours. */
AK_FN double ak_resize_weight(int n_in, int n_out, int mode, int o, int i) {
    const double scale = (double)n_in / (double)n_out;
    if (ak_resize_is_area(n_in, n_out, mode)) {
        const double lo = (double)o * scale, hi = (double)(o + 1) * scale;
        const double right = hi < (double)(i + 1) ? hi : (double)(i + 1);
        const double left = lo > (double)i ? lo : (double)i;
        const double covered = right - left;
        return covered / scale;
    }
    double src = ((double)o + 0.5) * scale;
    src = src - 0.5;
    src = src < 0.0 ? 0.0 : src;
    src = src > (double)(n_in - 1) ? (double)(n_in - 1) : src;
    const int i0 = (int)floor(src);
    const int i1 = i0 + 1 < n_in - 1 ? i0 + 1 : n_in - 1;
    const double f = src - (double)i0;
    const double w0 = i == i0 ? 1.0 - f : 0.0;
    const double w1 = i == i1 ? f : 0.0;
    return w0 + w1;
}

/* Nearest input sample of output sample o (half-pixel centres): for label maps, which must not be
 * blended. */
AK_FN int ak_nearest_index(int n_in, int n_out, int o) {
    const double scale = (double)n_in / (double)n_out;
    const int i = (int)floor(((double)o + 0.5) * scale);
    return i < n_in - 1 ? i : n_in - 1;
}

/* ---- the fused source sample ------------------------------------------------------------------- */

/* The intensity of source pixel (y, x) after the batch's noise filter (edges replicated).
 * Gaussian: on intensities, horizontal taps first, then vertical, in tap order, like the host's
 * two passes.  Median: on the stored values, then through the LUTs once: the modality LUT, the
 * VOI and the inversion are monotone, so the median commutes with them, and one evaluation
 * instead of (2r+1)^2 keeps the unrolled gather in registers. */
AK_FN float ak_filtered_at(const AkImage &im, const AkBatch &b, int filter, const unsigned char *base,
                           const float *filter_weight, int y, int x) {
    const int last_y = im.rows - 1, last_x = im.columns - 1;
    if (filter == AK_FILTER_GAUSSIAN) {
        const int r = b.filter_radius;
        float acc = 0.0f;
        for (int dy = -r; dy <= r; ++dy) {
            const int yy = ak_clampi(y + dy, 0, last_y);
            float h = 0.0f;
            for (int dx = -r; dx <= r; ++dx) {
                const float s = ak_stored_at(im, base, yy, ak_clampi(x + dx, 0, last_x));
                h = h + filter_weight[dx + r] * ak_intensity(s, im, im.voi);
            }
            acc = acc + filter_weight[dy + r] * h;
        }
        return acc;
    }
    float stored;
    if (filter == AK_FILTER_MEDIAN && b.filter_radius == 1) {
        float v[9];
        int n = 0;
        AK_UNROLL
        for (int dy = -1; dy <= 1; ++dy)
            AK_UNROLL
            for (int dx = -1; dx <= 1; ++dx)
                v[n++] = ak_stored_at(im, base, ak_clampi(y + dy, 0, last_y), ak_clampi(x + dx, 0, last_x));
        stored = ak_median<9>(v);
    } else if (filter == AK_FILTER_MEDIAN) {
        float v[25];
        int n = 0;
        AK_UNROLL
        for (int dy = -2; dy <= 2; ++dy)
            AK_UNROLL
            for (int dx = -2; dx <= 2; ++dx)
                v[n++] = ak_stored_at(im, base, ak_clampi(y + dy, 0, last_y), ak_clampi(x + dx, 0, last_x));
        stored = ak_median<25>(v);
    } else {
        stored = ak_stored_at(im, base, y, x);
    }
    return ak_intensity(stored, im, im.voi);
}

/* Output pixel (oy, ox) before normalisation: vertical taps summed per column first, then the
 * columns by their horizontal taps, in tap order (the reference's wh @ img @ ww.T).  `filter` is
 * the batch's, passed apart so that a kernel can fix it at compile time. */
AK_FN float ak_resampled_at(const AkImage &im, const AkBatch &b, int filter, const unsigned char *base,
                            const int32_t *tap_first, const float *tap_weight,
                            const float *filter_weight, int oy, int ox) {
    const int fy = tap_first[im.ty_first + oy], fx = tap_first[im.tx_first + ox];
    const float *wy = tap_weight + im.ty_weight + oy; /* tap-major: tap k at k * (output size) */
    const float *wx = tap_weight + im.tx_weight + ox;
    float acc = 0.0f;
    for (int kx = 0; kx < im.tx_taps; ++kx) {
        float column = 0.0f;
        for (int ky = 0; ky < im.ty_taps; ++ky)
            column = column + wy[(int64_t)ky * b.rows] * ak_filtered_at(im, b, filter, base, filter_weight, fy + ky, fx + kx);
        acc = acc + wx[(int64_t)kx * b.columns] * column;
    }
    return acc;
}

/* ---- normalisation and output ------------------------------------------------------------------ */

AK_FN float ak_normalise(float v, float mean, float std) {
    const float d = v - mean;
    return d / std;
}

/* float32 -> IEEE binary16, round to nearest even (as numpy's astype(float16)). */
AK_FN uint16_t ak_half_from_float(float f) {
    const uint32_t x = ak_bits_from_float(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) /* inf, nan */
        return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x0200u : 0u));
    if (ax >= 0x477ff000u) /* 65520 and above round to inf */
        return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) { /* below 2^-14: a subnormal half, in units of 2^-24 */
        const int exponent = (int)(ax >> 23);
        const int shift = 126 - exponent;
        if (shift > 24)
            return (uint16_t)sign;
        const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        uint32_t q = m >> shift;
        const uint32_t rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rest > half || (rest == half && (q & 1u)))
            q += 1u;
        return (uint16_t)(sign | q);
    }
    uint32_t r = ax - 0x38000000u; /* rebias the exponent from 127 to 15 */
    r = r + 0x0fffu + ((r >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
}

/* IEEE binary16 -> float32 (exact). */
AK_FN float ak_float_from_half(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1fu)
        return ak_float_from_bits(sign | 0x7f800000u | (m << 13));
    if (e == 0)
        return (sign ? -1.0f : 1.0f) * ((float)m * 5.9604644775390625e-8f); /* m * 2^-24 */
    return ak_float_from_bits(sign | ((e + 112u) << 23) | (m << 13));
}

/* Write output pixel (n, :, oy, ox) of an NCHW tensor: normalise per channel, replicate. */
AK_FN void ak_store(const AkBatch &b, void *out, int n, int oy, int ox, float v) {
    const int64_t plane = (int64_t)b.rows * b.columns;
    int64_t i = (int64_t)n * b.channels * plane + (int64_t)oy * b.columns + ox;
    for (int c = 0; c < b.channels; ++c, i += plane) {
        const float y = ak_normalise(v, b.mean[c], b.std[c]);
        if (b.out_dtype == AK_OUT_F16)
            ((uint16_t *)out)[i] = ak_half_from_float(y);
        else
            ((float *)out)[i] = y;
    }
}

/* ---- postprocessing ---------------------------------------------------------------------------- */

AK_FN float ak_sigmoid(float x) { return 1.0f / (1.0f + ak_expf(-x)); }

/* Softmax over C values spaced `stride` apart, max-subtracted for range. */
AK_FN void ak_softmax(const float *x, float *y, int channels, int64_t stride) {
    float m = x[0];
    for (int c = 1; c < channels; ++c)
        m = x[c * stride] > m ? x[c * stride] : m;
    float sum = 0.0f;
    for (int c = 0; c < channels; ++c) {
        const float e = ak_expf(x[c * stride] - m);
        y[c * stride] = e;
        sum = sum + e;
    }
    for (int c = 0; c < channels; ++c)
        y[c * stride] = y[c * stride] / sum;
}

/* Index of the largest of C values spaced `stride` apart; the first one on ties, as numpy. */
AK_FN int32_t ak_argmax(const float *x, int channels, int64_t stride) {
    int32_t best = 0;
    float m = x[0];
    for (int c = 1; c < channels; ++c) {
        if (x[c * stride] > m) {
            m = x[c * stride];
            best = c;
        }
    }
    return best;
}

#endif /* APPLIANCE_PIXEL_MATH_H */

"""The host build of the preprocessing kernels agrees with the numpy reference.

float32 results within a few ulp, float16 within 1 ulp, both measured at the magnitude of the
data (``max(|reference|, 1 / std)``: the resize sums [0, 1] intensities, so its rounding error is
absolute at that scale whatever the sign of a normalised output near 0).  The kernels sum the taps
in order, BLAS in its own order: the difference grows with the number of taps summed, so a
shrink by k in each direction is allowed 4 + k/2 ulp (4 for the usual 2 or 3 taps).  Where no sum
is involved (windows, stored values, ranges, medians) the two agree exactly.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from appliance import kernels, kernels_reference as ref
from appliance.kernels import Gaussian, Median, ModelInput, SourceImage
from appliance.manifest import BUNDLED_DIR, Window, load_package
from appliance.preprocessing import InputRejected, prepare_instance

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(kernels.host_library() is None,
                                reason="host build of the kernels not installed (pip install -e .)")

F32_ULPS = 4


def summed_taps(images, target: ModelInput) -> int:
    """The most taps one output sums along an axis, over a batch."""
    return max(max(-(-im.pixels.shape[0] // target.height), -(-im.pixels.shape[1] // target.width)) + 1
               for im in images)


def assert_ulp_close(actual: np.ndarray, desired: np.ndarray, target: ModelInput, ulps: float | None = None) -> None:
    assert actual.shape == desired.shape and actual.dtype == desired.dtype
    scale = float(1.0 / min(target.channel_std()))
    if desired.dtype == np.float16:
        ulps = 1 if ulps is None else ulps
        magnitude = np.maximum(np.abs(desired.astype(np.float32)), scale).astype(np.float16)
        spacing = np.spacing(magnitude).astype(np.float32)
    else:
        ulps = F32_ULPS if ulps is None else ulps
        spacing = np.spacing(np.maximum(np.abs(desired), np.float32(scale)))
    error = np.abs(actual.astype(np.float32) - desired.astype(np.float32))
    worst = np.unravel_index(np.argmax(error / spacing), error.shape) if error.size else ()
    assert np.all(error <= ulps * spacing), (
        f"{error[worst] / spacing[worst]:.1f} ulp apart at {worst}: kernel {actual[worst]!r}, "
        f"reference {desired[worst]!r}")


def both(images, target):
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        expected = ref.preprocess(images, target)
    return kernels.preprocess(images, target, using="host"), expected


def f32_ulps(images, target) -> float:
    return F32_ULPS + summed_taps(images, target) / 2 if summed_taps(images, target) > 3 else F32_ULPS


def ct_slice(rng, shape=(64, 48), dtype=np.int16, bits=12):
    lo = -(1 << (bits - 1)) if np.dtype(dtype).kind == "i" else 0
    return rng.integers(lo, lo + (1 << bits), shape).astype(dtype)


TARGET = ModelInput(32, 24, 1, (0.5,), (0.25,))


# ---- each step, exactly ---------------------------------------------------------------------------

@pytest.mark.parametrize("function,window", [
    ("LINEAR", (40.0, 400.0)), ("LINEAR", (40.0, 1.0)), ("LINEAR", (1000.5, 1.0)), ("LINEAR", (-600.0, 1500.0)),
    ("LINEAR_EXACT", (40.0, 400.0)), ("LINEAR_EXACT", (40.0, 0.25)), ("SIGMOID", (40.0, 400.0)),
    ("SIGMOID", (0.0, 0.001)),
])
def test_every_voi_function_matches_the_reference_window(function, window):
    rng = np.random.default_rng(1)
    image = SourceImage(ct_slice(rng), 12, 1.0, -1024.0, window, function)
    same_grid = ModelInput(64, 48)  # no resize: the window alone
    got, expected = both([image], same_grid)
    if function == "SIGMOID":
        assert_ulp_close(got, expected, same_grid)  # exp differs from numpy's by an ulp or two
    else:
        np.testing.assert_array_equal(got, expected)


def test_window_width_1_is_a_threshold_at_centre_minus_half():
    pixels = np.arange(-5, 6, dtype=np.int16).reshape(1, 11)
    got = kernels.preprocess([SourceImage(pixels, window=(0.0, 1.0))], ModelInput(1, 11), using="host")
    np.testing.assert_array_equal(got[0, 0, 0], (pixels[0] > -0.5).astype(np.float32))


def test_linear_window_below_width_1_is_rejected_as_the_numpy_pipeline_does():
    with pytest.raises(InputRejected, match="below 1"):
        kernels.preprocess([SourceImage(np.zeros((4, 4), np.uint16), window=(0.0, 0.5))], TARGET, using="host")


def test_without_a_window_the_value_range_is_stretched_and_a_flat_image_is_zero():
    rng = np.random.default_rng(2)
    images = [SourceImage(ct_slice(rng), 12, -2.5, 100.0),          # negative slope swaps the ends
              SourceImage(np.full((9, 7), 1234, np.uint16)),        # a single value
              SourceImage(rng.normal(size=(20, 20)).astype(np.float32))]
    target = ModelInput(20, 20)
    got, expected = both(images, target)
    np.testing.assert_array_equal(got[1:2], expected[1:2])
    assert_ulp_close(got, expected, target)
    assert got[1].max() == 0.0


@pytest.mark.parametrize("dtype,bits", [(np.uint8, 8), (np.int8, 7), (np.uint16, 12), (np.int16, 12),
                                        (np.int16, 16), (np.uint32, 20), (np.int32, 24), (np.float32, None)])
def test_stored_values_are_masked_to_bits_stored_and_sign_extended(dtype, bits):
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype) if np.dtype(dtype).kind != "f" else None
    if info is None:
        pixels = rng.normal(0, 300, (16, 16)).astype(np.float32)
    else:  # junk in the unused high bits must not reach the image
        pixels = rng.integers(info.min, info.max, (16, 16), endpoint=True, dtype=dtype)
    image = SourceImage(pixels, bits, 1.0, 0.0, (0.0, 300.0), "LINEAR_EXACT")
    got, expected = both([image], ModelInput(16, 16))
    np.testing.assert_array_equal(got, expected)
    stored = ref.stored_values(pixels, bits)
    if info is not None and bits < np.dtype(dtype).itemsize * 8:
        limit = 1 << (bits - 1) if info.min < 0 else 1 << bits
        assert stored.max() < limit and stored.min() >= (-limit if info.min < 0 else 0)


def test_monochrome1_is_inverted_after_the_window():
    rng = np.random.default_rng(4)
    pixels = ct_slice(rng, dtype=np.uint16)
    plain, inverted = (kernels.preprocess([SourceImage(pixels, window=(2048.0, 4096.0), invert=flag)],
                                          ModelInput(64, 48), using="host") for flag in (False, True))
    np.testing.assert_array_equal(inverted, np.float32(1.0) - plain)


@pytest.mark.parametrize("resize", ["area", "bilinear"])
@pytest.mark.parametrize("shape", [(512, 512), (17, 300), (3, 5), (1, 1), (256, 256)])
def test_resize_matches_the_reference_weight_matrices(resize, shape):
    rng = np.random.default_rng(5)
    image = SourceImage(ct_slice(rng, shape, np.uint16), 12, 1.0, -1024.0, (40.0, 400.0))
    target = ModelInput(256, 256, 1, (0.5,), (0.25,), resize)
    got, expected = both([image], target)
    assert_ulp_close(got, expected, target)


def test_a_batch_mixes_sizes_dtypes_and_windows():
    rng = np.random.default_rng(6)
    images = [SourceImage(ct_slice(rng, (40, 30)), 12, 1.0, -1024.0, (40.0, 80.0)),
              SourceImage(ct_slice(rng, (1, 1), np.uint16), 16, 2.0, 0.0, None),
              SourceImage(ct_slice(rng, (300, 20), np.uint16), 12, 0.5, -3.0, (500.0, 1000.0), "SIGMOID", True),
              SourceImage(rng.integers(0, 256, (7, 9), dtype=np.uint8), 8, 1.0, 0.0, (127.5, 1.0)),
              SourceImage(ct_slice(rng, (33, 65)), 12, 1.0, -1024.0, (-600.0, 1500.0), "LINEAR_EXACT")]
    target = ModelInput(24, 24, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "area")
    got, expected = both(images, target)
    assert_ulp_close(got, expected, target)
    for n, image in enumerate(images):  # each image alone gives the same as inside the batch
        np.testing.assert_array_equal(kernels.preprocess([image], target, using="host")[0], got[n])


def test_float16_output_is_within_one_ulp_of_the_rounded_reference():
    rng = np.random.default_rng(7)
    images = [SourceImage(ct_slice(rng, (100, 90)), 12, 1.0, -1024.0, (40.0, 400.0))]
    target = ModelInput(64, 64, 3, (0.5, 0.0, -0.25), (0.25, 1.0, 0.1), "bilinear", np.float16)
    got, expected = both(images, target)
    assert got.dtype == np.float16
    assert_ulp_close(got, expected, target)


def test_half_conversion_rounds_to_nearest_even_like_numpy():
    # every float16 value, the midpoints between neighbours, and overflow: through a pass-through batch
    halves = np.arange(0, 0x7C01, dtype=np.uint16).view(np.float16).astype(np.float32)
    mids = (halves[:-1].astype(np.float64) + halves[1:]) / 2
    values = np.concatenate([halves, mids.astype(np.float32), [65519.0, 65520.0, 1e9, 2.0 ** -26, 2.0 ** -25]])
    values = np.concatenate([values, -values[1:]]).astype(np.float32)  # not -0: the modality LUT adds +0
    maps = values.reshape(1, -1)
    # the pass-through plan of resample: no VOI, no resize, mean 0 and std 1
    plan = kernels.plan([SourceImage(maps)], ModelInput(1, maps.shape[1], dtype=np.float16), kernels.host_library(),
                        identity=True)
    got = kernels._host_preprocess(plan, kernels.host_library())
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    np.testing.assert_array_equal(got[0, 0, 0].view(np.uint16), expected.view(np.uint16))


@pytest.mark.parametrize("noise", [Gaussian(0.8), Gaussian(2.0, 3), Median(1), Median(2)])
def test_noise_filters_match_the_reference(noise):
    rng = np.random.default_rng(8)
    images = [SourceImage(ct_slice(rng, (37, 29)), 12, 1.0, -1024.0, (40.0, 400.0)),
              SourceImage(ct_slice(rng, (2, 3), np.uint16), 12, 1.0, 0.0, None, "LINEAR", True)]
    target = ModelInput(16, 20, 1, (0.5,), (0.25,), "area", noise=noise)
    got, expected = both(images, target)
    assert_ulp_close(got, expected, target)


def test_median_removes_salt_and_pepper():
    pixels = np.full((9, 9), 100, np.uint16)
    pixels[4, 4] = 4095
    got = kernels.preprocess([SourceImage(pixels, window=(2048.0, 4096.0))], ModelInput(9, 9, noise=Median(1)),
                             using="host")
    assert np.all(got == got[0, 0, 0, 0])


# ---- postprocessing --------------------------------------------------------------------------------

def test_sigmoid_and_softmax_match_the_postprocessing_activations():
    rng = np.random.default_rng(9)
    logits = (rng.normal(0, 6, (3, 5, 17, 13))).astype(np.float32)
    logits[0, 0, 0, :3] = [-120.0, 0.0, 120.0]
    np.testing.assert_allclose(kernels.sigmoid(logits, using="host"), ref.sigmoid(logits), rtol=4e-7, atol=1e-30)
    # probabilities: within 4 ulp of 1 (exp's argument x - max is rounded to float32 first)
    one_ulp = np.spacing(np.float32(1))
    np.testing.assert_allclose(kernels.softmax(logits, 1, using="host"), ref.softmax(logits, 1), rtol=0,
                               atol=4 * one_ulp)
    classes = logits[:, :, 0, 0]  # (images, classes), as a classifier returns them
    np.testing.assert_allclose(kernels.softmax(classes, -1, using="host"), ref.softmax(classes, -1), rtol=0,
                               atol=4 * one_ulp)


def test_argmax_takes_the_first_of_equal_scores():
    rng = np.random.default_rng(10)
    scores = rng.integers(0, 3, (2, 4, 9, 11)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(kernels.argmax(scores, 1, using="host"), ref.argmax(scores, 1))


def test_heatmaps_and_label_maps_go_back_onto_the_source_grid():
    rng = np.random.default_rng(11)
    heat = rng.random((2, 3, 56, 40)).astype(np.float32)
    got = kernels.resample(heat, 512, 300, using="host")
    assert got.shape == (2, 3, 512, 300)
    np.testing.assert_allclose(got, ref.resample(heat, 512, 300), rtol=0, atol=4 * np.spacing(np.float32(1)))
    labels = rng.integers(0, 5, (2, 56, 40)).astype(np.int32)
    back = kernels.labels_to_source(labels, 512, 301, using="host")
    np.testing.assert_array_equal(back, ref.labels_to_source(labels, 512, 301))
    assert set(np.unique(back)) <= set(np.unique(labels))  # classes are never blended


# ---- properties ------------------------------------------------------------------------------------

dtypes = st.sampled_from([np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.float32])


@st.composite
def source_images(draw):
    dtype = np.dtype(draw(dtypes))
    shape = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    if dtype.kind == "f":
        pixels = (rng.normal(0, 1, shape) * draw(st.sampled_from([1.0, 1e3, 1e6]))).astype(np.float32)
        bits = None
    else:
        info = np.iinfo(dtype)
        pixels = rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)
        bits = draw(st.integers(1, dtype.itemsize * 8))
    slope = draw(st.sampled_from([1.0, -1.0, 0.5, 2.5, 1e-3, 37.25]))
    intercept = draw(st.sampled_from([0.0, -1024.0, 3.5, 1e5]))
    function = draw(st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID"]))
    window = draw(st.one_of(
        st.none(),
        st.tuples(st.floats(-1e7, 1e7, allow_nan=False),
                  st.one_of(st.just(1.0), st.floats(1.0, 1e8), st.floats(1e-3, 1.0)))))
    if window is not None and function == "LINEAR":
        assume(window[1] >= 1.0)
    return SourceImage(pixels, bits, slope, intercept, window, function, draw(st.booleans()))


@st.composite
def model_inputs(draw):
    channels = draw(st.integers(1, 3))
    return ModelInput(draw(st.integers(1, 48)), draw(st.integers(1, 48)), channels,
                      tuple(draw(st.floats(-2, 2)) for _ in range(channels)),
                      tuple(draw(st.floats(0.05, 4)) for _ in range(channels)),
                      draw(st.sampled_from(["area", "bilinear"])), draw(st.sampled_from([np.float32, np.float16])),
                      draw(st.sampled_from([None, None, Gaussian(1.0), Median(1), Median(2)])))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(source_images(), min_size=1, max_size=4), model_inputs())
def test_any_batch_agrees_with_the_reference(images, target):
    got, expected = both(images, target)
    assert_ulp_close(got, expected, target, None if target.dtype == np.float16 else f32_ulps(images, target))


# ---- the node's own use ------------------------------------------------------------------------------

def _instance(rows=300, columns=260, photometric="MONOCHROME2", window=(2048, 4096), slope=None, function=None,
              seed=0):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if function:
        ds.VOILUTFunction = function
    if slope:
        ds.RescaleSlope, ds.RescaleIntercept = slope, -1024
    ds.PixelData = np.random.default_rng(seed).integers(0, 4096, (rows, columns), dtype=np.uint16).tobytes()
    return ds


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The bundled demo package's manifest; its model file is not needed to preprocess."""
    folder = tmp_path_factory.mktemp("cxr-triage")
    shutil.copyfile(BUNDLED_DIR / "cxr-triage" / "manifest.toml", folder / "manifest.toml")
    (folder / "model.onnx").write_bytes(b"")
    return load_package(folder)


@pytest.mark.parametrize("variant", [
    {}, {"photometric": "MONOCHROME1"}, {"window": None}, {"slope": 1.5}, {"function": "SIGMOID"},
    {"window": (100, 1)}, {"rows": 1, "columns": 1},
])
def test_the_pipeline_input_equals_the_numpy_pipeline(package, variant):
    for pkg in (package, dataclasses.replace(package, preprocessing=dataclasses.replace(
            package.preprocessing, window=Window(1800.0, 3000.0), resize="bilinear"))):
        ds = _instance(**variant)
        try:
            expected = prepare_instance(ds, pkg)[None]
        except InputRejected:
            continue
        got, accepted, rejection = kernels.prepare([ds], pkg)
        assert rejection is None and accepted == [ds]
        assert_ulp_close(got, expected, kernels.model_input(pkg))


def test_a_series_keeps_the_instances_the_model_takes(package):
    good, odd = _instance(seed=1), _instance(seed=2)
    odd.PhotometricInterpretation = "RGB"
    got, accepted, rejection = kernels.prepare([good, odd], package)
    assert accepted == [good] and rejection.reason == "photometric" and got.shape[0] == 1


# ---- choosing and loading a build ---------------------------------------------------------------------

def test_the_build_is_chosen_by_environment(monkeypatch):
    monkeypatch.setenv("APPLIANCE_KERNELS", "numpy")
    assert kernels.backend() == "numpy"
    monkeypatch.setenv("APPLIANCE_KERNELS", "host")
    assert kernels.backend() == "host"
    monkeypatch.setenv("APPLIANCE_KERNELS", "tpu")
    with pytest.raises(ValueError, match="APPLIANCE_KERNELS='tpu'"):
        kernels.backend()


def test_every_instruction_set_build_gives_the_same_bits():
    # the library picks its widest build once per process: run the others in child processes
    script = ("import numpy as np, sys; from appliance import kernels as K; "
              "r = np.random.default_rng(0); "
              "im = [K.SourceImage(r.integers(0, 4096, (97, 61), dtype=np.uint16), 12, 1.0, -1024.0, (40.0, 400.0)),"
              " K.SourceImage(r.integers(-2048, 2048, (40, 300), dtype=np.int16), 12, 1.5, 0.0, (0.0, 900.0), 'SIGMOID')];"
              "t = K.ModelInput(50, 70, 2, (0.4, 0.1), (0.3, 0.2), 'bilinear', noise=K.Gaussian(1.0));"
              "sys.stdout.buffer.write(K.host_library().isa.encode() + b'|' + K.preprocess(im, t, using='host').tobytes())")
    results = {}
    for isa in ("baseline", "avx2", "avx512"):
        env = {**os.environ, "APPLIANCE_KERNELS_ISA": isa}
        out = subprocess.run([os.sys.executable, "-c", script], env=env, capture_output=True, check=True).stdout
        name, _, data = out.partition(b"|")
        results[name.decode()] = data
    assert len(set(results.values())) == 1, f"builds differ: {sorted(results)}"


def test_descriptor_layout_matches_the_header():
    lib = kernels.host_library()
    assert lib.lib.akh_sizeof_image() == kernels.IMAGE_DTYPE.itemsize
    assert lib.lib.akh_sizeof_batch() == kernels.BATCH_DTYPE.itemsize


def test_the_gpu_loader_compiles_with_the_arithmetic_of_the_fatbin():
    import sys

    sys.path.insert(0, str(ROOT / "kernels"))
    try:
        from nvcc_flags import ARITHMETIC
    finally:
        sys.path.remove(str(ROOT / "kernels"))
    assert tuple(kernels.NVCC_OPTIONS) == tuple(ARITHMETIC)


def test_without_pycuda_or_a_gpu_the_host_build_serves():
    if kernels.gpu_kernels() is None:
        assert kernels.backend("auto") == "host"
        with pytest.raises(kernels.KernelError, match="APPLIANCE_KERNELS=gpu"):
            kernels.backend("gpu")


def test_host_build_compiles_without_warnings():
    done = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-fopenmp", "-Wall", "-Wextra", "-Werror",
                           "-I", str(ROOT / "kernels"), str(ROOT / "kernels" / "host.cpp")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_pydicom_instance_round_trip_is_read_as_the_node_reads_it(tmp_path, package):
    ds = _instance(seed=3)
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    read = pydicom.dcmread(path)
    got, _, _ = kernels.prepare([read], package)
    assert_ulp_close(got, prepare_instance(read, package)[None], kernels.model_input(package))


def test_a_batch_can_be_written_into_an_existing_tensor():
    rng = np.random.default_rng(12)
    images = [SourceImage(ct_slice(rng), 12, 1.0, -1024.0, (40.0, 400.0))]
    tensor = np.full((1, 1, 32, 24), np.nan, np.float32)
    assert kernels.preprocess(images, TARGET, using="host", out=tensor) is tensor
    np.testing.assert_array_equal(tensor, kernels.preprocess(images, TARGET, using="host"))
    with pytest.raises(ValueError, match="shape"):
        kernels.preprocess(images, TARGET, using="host", out=np.empty((1, 1, 24, 32), np.float32))

"""Quantisation and runtime on the CPU: FP32 vs INT8 vs FP16 in ONNX Runtime, torch eager vs ONNX Runtime.

For the demo classifier (cxr-triage, 1x256x256, two findings), in one process, on the same inputs
(phantoms at 1024 px through the node's decode and preprocessing):

* ONNX Runtime through the node's runtime (appliance.runtime.OnnxRuntime, 2 threads) on the FP32
  package, its INT8 versions (``--target onnxruntime``: uint8 activations; ``--target tensorrt``:
  symmetric int8, the form a TensorRT build takes) and its FP16 version, all made by
  export.quantize as ``appliance quantize`` makes them, calibrated on other phantoms;
* the FP32 and INT8 models again in ONNX Runtime sessions that do not spin (session option
  ``session.intra_op.allow_spinning = 0``): ONNX Runtime's worker threads busy-wait for the next
  task after each call, which costs time on a 2-core machine other work also runs on;
* torch eager: CxrTriageNet with the package's weights.pt, eval(), no_grad(), 2 threads;
* with ``--densenet`` (default on): MONAI's DenseNet-121 (2-D, 1 channel, 224 px, random weights)
  in torch eager and exported to ONNX (opset 17), the architecture a site is likely to bring.

Latency at batch 1 and 8: warm-up, then rounds in which every contender takes its turn (so a change
of load on the machine falls on all of them alike; each turn starts with two untimed calls), median
and 95th percentile of single calls.
Accuracy: AUC of each variant on a generated labelled set through export.studies.predict.

Run:  .venv/bin/python benchmarks/quantize.py [--studies 80] [--rounds 15] [--append benchmarks/RESULTS.md]
Absolute times drift by 2x between runs on these machines; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

THREADS = 2
# torch reads these at import: set before anything imports it (MONAI, export.train_cxr_triage).
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import numpy as np  # noqa: E402

from appliance.manifest import BUNDLED_DIR, load_package  # noqa: E402
from appliance.runtime import OnnxRuntime  # noqa: E402
from export.evaluate import auc_roc  # noqa: E402
from export.phantoms import write_labelled_set  # noqa: E402
from export.quantize import convert_fp16, quantize_int8  # noqa: E402
from export.studies import binary_labels, calibration_batches, make_runtime, predict, read_labels  # noqa: E402

SECTION = "## Issue 5: quantisation and runtime"
SECTION_INTRO = (
    "benchmarks/quantize.py: the demo classifier (cxr-triage) in ONNX Runtime as FP32, INT8 (Q/DQ, made and "
    "calibrated as `appliance quantize` makes them) and FP16, and in torch eager, on the same preprocessed phantoms, "
    "in one process, 2 threads each; latencies are single calls after a warm-up, the contenders taking turns in "
    "every round. Also MONAI's DenseNet-121 (224 px, random weights) in torch eager against ONNX Runtime. AUCs are "
    "on a generated labelled set through the node's own pipeline (export.studies.predict). Compare ratios within "
    "a run only; the machine is shared with other work, whose load is given per run.")
DEMO = BUNDLED_DIR / "cxr-triage"


def timed_rounds(contenders: dict[str, callable], rounds: int, calls: int, warmup: int = 5,
                 settle: int = 2) -> dict[str, np.ndarray]:
    """Seconds per call of each contender: ``rounds`` rounds of ``calls`` calls each, in turn.

    Each turn starts with ``settle`` untimed calls: the previous contender's worker threads
    (ONNX Runtime's pool, torch's OpenMP team) busy-wait for a while after their last call and
    would otherwise be timed as part of this one's first calls.
    """
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            for _ in range(settle):
                fn()
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: np.array(t) for name, t in times.items()}


def cxr_variants(work: Path, calibration: Path) -> tuple[dict[str, object], int]:
    """The FP32 package and its quantised versions as packages in ``work`` (no validation: that is
    what this script measures)."""
    fp32 = load_package(DEMO)
    batches = list(calibration_batches(fp32, calibration, 128))
    variants = {"FP32": fp32}
    for label, target in (("INT8 (uint8 act., --target onnxruntime)", "onnxruntime"),
                          ("INT8 (symmetric, --target tensorrt)", "tensorrt")):
        name = f"model.int8-{target}.onnx"
        quantize_int8(fp32, work / name, batches, target, "minmax")
        variants[label] = replace(fp32, path=work, model_file=name, precision="int8", hashes={})
    convert_fp16(fp32.onnx_path, work / "model.fp16.onnx")
    variants["FP16"] = replace(fp32, path=work, model_file="model.fp16.onnx", precision="fp16", hashes={})
    return variants, len(batches)


class NonSpinning:
    """The node's session settings (appliance.runtime.OnnxRuntime) with worker spinning off."""

    def __init__(self, pkg):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(pkg.onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = pkg.input_name

    def run(self, batch: np.ndarray):
        return self.session.run(None, {self.input_name: batch})


def stats(seconds: np.ndarray) -> tuple[float, float]:
    return float(np.median(seconds)) * 1e3, float(np.percentile(seconds, 95)) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=80, help="labelled phantoms for the AUCs (default 80)")
    parser.add_argument("--calibration", type=int, default=32, help="calibration phantoms (default 32)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of turns (default 15)")
    parser.add_argument("--no-densenet", dest="densenet", action="store_false", help="skip MONAI's DenseNet-121")
    parser.add_argument("--append", type=Path, help="add the results as markdown under the issue-5 section")
    args = parser.parse_args()
    load_start = os.getloadavg()
    print(f"load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", file=sys.stderr)

    import torch

    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(1)
    from export.train_cxr_triage import CxrTriageNet

    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        labels = write_labelled_set(work / "validation", args.studies, size=1024, seed=8_500_000)
        write_labelled_set(work / "calibration", args.calibration, size=1024, seed=8_600_000)
        print(f"{args.studies + args.calibration} phantoms written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        variants, calibration_images = cxr_variants(work, work / "calibration")

        # Accuracy: every variant through the node's decode, preprocessing, runtime, postprocessing.
        fp32 = variants["FP32"]
        studies = read_labels(labels, work / "validation")
        truth = binary_labels(studies, fp32)
        probabilities = {}
        for label, pkg in variants.items():
            probabilities[label] = np.stack([p.probabilities for p in predict(make_runtime(pkg, THREADS), studies)])
        accuracy = []
        for label, p in probabilities.items():
            aucs = [auc_roc(p[:, j], truth[:, j]) for j in range(len(fp32.outputs))]
            ref = [auc_roc(probabilities["FP32"][:, j], truth[:, j]) for j in range(len(fp32.outputs))]
            agree = [float(np.mean((p[:, j] >= o.threshold_positive) ==
                                   (probabilities["FP32"][:, j] >= o.threshold_positive)))
                     for j, o in enumerate(fp32.outputs)]
            accuracy.append((label, aucs, [a - r for a, r in zip(aucs, ref)], agree,
                             float(np.abs(p - probabilities["FP32"]).max())))

        # The same real inputs for every contender: the first 8 validation images, preprocessed.
        inputs = np.concatenate(list(calibration_batches(fp32, work / "validation", 8)))
        runtimes = {label: OnnxRuntime(pkg, THREADS) for label, pkg in variants.items()}
        int8 = next(k for k in variants if "onnxruntime" in k)
        for label in ("FP32", int8):
            runtimes[f"{label}, spinning off"] = NonSpinning(variants[label])
        net = CxrTriageNet()
        net.load_state_dict(torch.load(DEMO / "weights.pt", map_location="cpu", weights_only=True))
        net.eval()
        with torch.no_grad():
            torch_logits = net(torch.from_numpy(inputs))[0].numpy()
        parity = float(np.abs(torch_logits - runtimes["FP32"].run(inputs)["logits"]).max())

        def torch_call(x: torch.Tensor):
            with torch.no_grad():
                return net(x)

        latency = {}
        for batch, calls in ((1, 20), (8, 6)):
            x = inputs[:batch]
            xt = torch.from_numpy(np.ascontiguousarray(x))
            contenders = {label: (lambda rt=rt, x=x: rt.run(x)) for label, rt in runtimes.items()}
            contenders["torch eager (FP32)"] = lambda xt=xt: torch_call(xt)
            latency[batch] = {k: stats(v) for k, v in timed_rounds(contenders, args.rounds, calls).items()}

        densenet = densenet_latency(work, args.rounds) if args.densenet else None
    load_end = os.getloadavg()

    lines = render(args, load_start, load_end, calibration_images, accuracy, latency, parity, densenet,
                   [o.name for o in fp32.outputs])
    print("\n".join(lines))
    if args.append:
        append_section(args.append, lines)
    return 0


def densenet_latency(work: Path, rounds: int) -> dict[int, dict[str, tuple[float, float]]]:
    """MONAI DenseNet-121, 2-D, 1 channel in, 2 out, 224 px, random weights: torch eager against
    the same model exported to ONNX and run in ONNX Runtime, same inputs, 2 threads each."""
    import onnxruntime as ort
    import torch
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2).eval()
    path = work / "densenet121.onnx"
    example = torch.randn(1, 1, 224, 224)
    with torch.no_grad():
        torch.onnx.export(net, (example,), str(path), input_names=["image"], output_names=["logits"],
                          opset_version=17, dynamo=False, dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    quiet = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x8 = np.random.default_rng(0).standard_normal((8, 1, 224, 224), dtype=np.float32)
    with torch.no_grad():
        difference = float(np.abs(net(torch.from_numpy(x8)).numpy() - session.run(None, {"image": x8})[0]).max())
    result = {"parity": difference}
    for batch, calls in ((1, 4), (8, 1)):
        x = np.ascontiguousarray(x8[:batch])
        xt = torch.from_numpy(x)

        def eager(xt=xt):
            with torch.no_grad():
                return net(xt)

        times = timed_rounds({"ONNX Runtime (FP32)": lambda x=x: session.run(None, {"image": x}),
                              "ONNX Runtime (FP32), spinning off": lambda x=x: quiet.run(None, {"image": x}),
                              "torch eager (FP32)": eager}, max(3, rounds // 2), calls, warmup=2)
        result[batch] = {k: stats(v) for k, v in times.items()}
    return result


def render(args, load_start, load_end, calibration_images, accuracy, latency, parity, densenet, outputs) -> list[str]:
    import onnxruntime
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    lines = [f"{cpu}, {os.cpu_count()} cores, {THREADS} threads per contender; onnxruntime {onnxruntime.__version__}, "
             f"torch {torch.__version__}; load average {load_start[0]:.2f} (1 min) / {load_start[1]:.2f} (5 min) "
             f"at start, {load_end[0]:.2f} / {load_end[1]:.2f} at the end",
             "",
             f"**cxr-triage, accuracy** on {args.studies} labelled phantoms at 1024 px (seeds 8500000+), through the "
             f"node's pipeline; INT8 calibrated on {calibration_images} other phantoms (min-max):",
             "",
             "| variant | " + " | ".join(f"AUC {o} (change)" for o in outputs) +
             " | decisions agreeing with FP32 | max abs probability difference |",
             "| --- | " + " | ".join("---:" for _ in outputs) + " | ---: | ---: |"]
    for label, aucs, changes, agree, maxdiff in accuracy:
        lines.append(f"| {label} | " + " | ".join(f"{a:.4f} ({c:+.4f})" for a, c in zip(aucs, changes)) +
                     f" | {' / '.join(f'{g:.3f}' for g in agree)} | {maxdiff:.4f} |")
    lines += ["", f"**cxr-triage, latency** of one call (ms), {args.rounds} rounds; the same 8 preprocessed "
              f"phantoms; torch eager vs ONNX Runtime FP32 logits differ by at most {parity:.1e}:", "",
              "| contender | batch 1 median | batch 1 p95 | batch 8 median | batch 8 p95 | "
              "FP32 ORT / this, batch 1 | FP32 ORT / this, batch 8 |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ref1, ref8 = latency[1]["FP32"][0], latency[8]["FP32"][0]
    for label in latency[1]:
        (m1, p1), (m8, p8) = latency[1][label], latency[8][label]
        lines.append(f"| {label} | {m1:.2f} | {p1:.2f} | {m8:.2f} | {p8:.2f} | {ref1 / m1:.2f}x | {ref8 / m8:.2f}x |")
    int8 = next(k for k in latency[1] if "onnxruntime" in k and "spinning" not in k)
    int8_trt = next(k for k in latency[1] if "tensorrt" in k)
    torch_label = "torch eager (FP32)"

    def ratio(a: str, b: str) -> str:
        return f"{latency[1][a][0] / latency[1][b][0]:.2f}x at batch 1, {latency[8][a][0] / latency[8][b][0]:.2f}x at batch 8"

    summary = [f"FP32 / INT8 (ONNX Runtime form): {ratio('FP32', int8)}; "
               f"with spinning off: {ratio('FP32, spinning off', int8 + ', spinning off')}",
               f"FP32 / INT8 (TensorRT form, symmetric) on the CPU: {ref1 / latency[1][int8_trt][0]:.2f}x at batch 1, "
               f"{ref8 / latency[8][int8_trt][0]:.2f}x at batch 8",
               f"FP32 / FP16 on the CPU: {ref1 / latency[1]['FP16'][0]:.2f}x at batch 1, "
               f"{ref8 / latency[8]['FP16'][0]:.2f}x at batch 8",
               f"torch eager / ONNX Runtime FP32: {ratio(torch_label, 'FP32')}; "
               f"against ONNX Runtime with spinning off: {ratio(torch_label, 'FP32, spinning off')}",
               f"ONNX Runtime FP32, spinning on / off: {ratio('FP32', 'FP32, spinning off')}"]
    if densenet:
        lines += ["", f"**MONAI DenseNet-121** (2-D, 1x224x224, random weights, ONNX opset 17), one call (ms); outputs "
                  f"differ by at most {densenet['parity']:.1e}:", "",
                  "| contender | batch 1 median | batch 1 p95 | batch 8 median | batch 8 p95 |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for label in densenet[1]:
            (m1, p1), (m8, p8) = densenet[1][label], densenet[8][label]
            lines.append(f"| {label} | {m1:.1f} | {p1:.1f} | {m8:.1f} | {p8:.1f} |")
        ort1, ort8 = densenet[1]["ONNX Runtime (FP32)"][0], densenet[8]["ONNX Runtime (FP32)"][0]
        q1, q8 = densenet[1]["ONNX Runtime (FP32), spinning off"][0], densenet[8]["ONNX Runtime (FP32), spinning off"][0]
        t1, t8 = densenet[1]["torch eager (FP32)"][0], densenet[8]["torch eager (FP32)"][0]
        summary.append(f"DenseNet-121 torch eager / ONNX Runtime: {t1 / ort1:.2f}x at batch 1, {t8 / ort8:.2f}x at "
                       f"batch 8; against ONNX Runtime with spinning off: {t1 / q1:.2f}x, {t8 / q8:.2f}x")
    return lines + [""] + [f"- {s}" for s in summary]


def append_section(path: Path, lines: list[str]) -> None:
    """Add this run at the end of the issue-5 section (created at the end of the file if absent)."""
    command = ".venv/bin/python " + " ".join(shlex.quote(a) for a in ["benchmarks/quantize.py", *sys.argv[1:]])
    run = (f"\n### Run of {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n`{command}`\n\n"
           + "\n".join(lines) + "\n")
    text = path.read_text() if path.exists() else ""
    if SECTION not in text:
        text = text.rstrip("\n") + ("\n\n" if text else "") + SECTION + "\n\n" + SECTION_INTRO + "\n"
    start = text.index(SECTION) + len(SECTION)
    following = text.find("\n## ", start)
    end = len(text) if following < 0 else following + 1
    body = text[:end].rstrip("\n") + "\n" + run
    path.write_text(body + ("\n" + text[end:] if end < len(text) else ""))


if __name__ == "__main__":
    sys.exit(main())

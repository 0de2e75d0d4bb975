"""Train the cxr-triage demonstration model on synthetic phantoms and write its model package.

    python -m export.train_cxr_triage                  # full run into appliance/model_packages/cxr-triage
    python -m export.train_cxr_triage --quick --out D  # a tiny run in seconds (tests)

The model is a small CNN over a 1x256x256 input with two sigmoid outputs, ``logits`` (N, 2):
index 0 nodule, 1 pneumothorax, as the package manifest says.  Its head is a 1x1 convolution
over the last feature maps, so ``cam`` (N, 2, 16, 16) is the class activation map and
``logits`` is its spatial mean (global average pooling followed by the same linear head).

Training data are phantoms from :mod:`export.phantoms` fed through
:func:`appliance.preprocessing.preprocess_pixels` with the package's own preprocessing, the way
the node feeds the model; the held-out evaluation goes further and takes each phantom through a
DICOM dataset and :func:`appliance.preprocessing.prepare_instance`, at 1024 pixels like real input.
Besides the image-level loss, a training-only "locator" head learns from the phantoms' finding
masks where each finding is; that teaches the features to find a nodule a few pixels wide, which
the image-level label alone did not within this budget.  It is not exported.
Everything is deterministic: fixed seeds, deterministic torch algorithms, a fixed thread count;
two runs with the same arguments write byte-identical ``weights.pt``.

After training, ``weights.pt`` is written and the package is exported by the toolchain
(:func:`export.onnx_export.export_package`, i.e. ``appliance export`` with the manifest's
``[export]`` table: this class as the factory, opset 17), which checks ONNX Runtime against torch
and writes ``model.onnx``, a new ``device_uid`` and ``[hashes]``; then ``MODEL_CARD.md`` with the
held-out metrics.  ``appliance export appliance/model_packages/cxr-triage`` re-exports the
shipped weights without training.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from appliance.manifest import BUNDLED_DIR, ModelPackage
from appliance.manifest import Window
from appliance.preprocessing import prepare_instance, preprocess_pixels, resize
from export.evaluate import auc_roc
from export.onnx_export import ExportResult, Source, export_package
from export.package import copy_package, load_manifest
from export.phantoms import NODULE_BIT, PNEUMOTHORAX_BIT, make_phantom, write_dicom

PACKAGE_DIR = BUNDLED_DIR / "cxr-triage"
FINDING_NAMES = ("nodule", "pneumothorax")   # output index 0 and 1
THREADS = 2
CAM_GRID = 16           # the class activation map is 16 x 16 cells of 16 x 16 input pixels

#: Findings cycle in this order over the phantom index: half normal, 30 % with each finding.
_FINDING_CYCLE = (None, "nodule", None, "pneumothorax", None, "nodule+pneumothorax",
                  "nodule", None, "pneumothorax", None)
_TRAIN_SEED_BASE = 1_000_000
_EVAL_SEED_BASE = 9_000_000


@dataclass(frozen=True)
class TrainConfig:
    train_count: int = 3000
    train_size: int = 512
    eval_count: int = 400
    eval_size: int = 1024
    epochs: int = 12
    batch: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    #: Weight of a positive image in the image-level loss: a missed finding costs a triage node
    #: more than a false alarm, and the manifest's threshold_positive is fixed at 0.5.
    positive_weight: float = 2.0
    cell_weight: float = 1.0
    cell_pos_weight: float = 20.0
    seed: int = 0
    workers: int = 2


QUICK = TrainConfig(train_count=24, train_size=256, eval_count=16, eval_size=256, epochs=1, batch=8, workers=1)


# ----------------------------------------------------------------------------------------------
# The model

def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2 if kernel % 2 else 0, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CxrTriageNet(nn.Module):
    """A small CNN: 4x4 patch stem to 64x64, four 3x3 blocks down to 16x16x64, 1x1 head.

    ``forward`` returns ``(logits, cam)``: the head applied at every position of the last
    feature maps is the class activation map, and its mean over positions equals the head
    applied after global average pooling.  ``locator`` is used in training only: a second 1x1
    head that learns where each finding is from the phantoms' finding masks, which teaches the
    features to find a nodule a few pixels wide far sooner than the image-level label alone.
    It is not exported.
    """

    def __init__(self, outputs: int = 2, width: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            _conv(1, 16, kernel=4, stride=4),      # 256 -> 64
            _conv(16, 32),
            _conv(32, 32, stride=2),               # 64 -> 32
            _conv(32, width),
            _conv(width, width, stride=2),         # 32 -> 16
            _conv(width, width),
        )
        self.head = nn.Conv2d(width, outputs, kernel_size=1)
        self.locator = nn.Conv2d(width, outputs, kernel_size=1)
        # The class is the package's export factory, which must give a model ready for inference
        # (batch norm on its running statistics); train() switches to training mode itself.
        self.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cam = self.head(self.features(image))
        return cam.mean(dim=(2, 3)), cam

    def training_outputs(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-level logits and the locator's per-cell logits (N, outputs, 16, 16)."""
        f = self.features(image)
        return self.head(f).mean(dim=(2, 3)), self.locator(f)


# ----------------------------------------------------------------------------------------------
# Data

def finding_for(index: int) -> str | None:
    return _FINDING_CYCLE[index % len(_FINDING_CYCLE)]


def monochrome1_for(index: int) -> bool:
    """One phantom in seven is stored as MONOCHROME1; seven is prime to the finding cycle's ten,
    so every finding gets its share."""
    return index % 7 == 3


def preprocessing_package(package_dir: Path = PACKAGE_DIR) -> ModelPackage:
    """The package's manifest, loaded for its preprocessing even before a model.onnx exists."""
    return load_manifest(package_dir)


_worker_package: ModelPackage | None = None
_BLAS_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _init_worker(package_dir: Path) -> None:
    global _worker_package
    _worker_package = preprocessing_package(package_dir)


def finding_cells(phantom, grid: int = CAM_GRID) -> np.ndarray:
    """(2, grid, grid): the share of each CAM cell covered by the nodule and by the pneumothorax."""
    cells = np.zeros((2, grid, grid), dtype=np.float32)
    if phantom.finding_mask is not None:
        for k, bit in enumerate((NODULE_BIT, PNEUMOTHORAX_BIT)):
            hit = ((phantom.finding_mask & bit) > 0).astype(np.float32)
            cells[k] = resize(hit, grid, grid, "area")
    return cells


def _example(job: tuple[int, int, int, str]) -> tuple[np.ndarray, tuple[bool, bool], np.ndarray]:
    """One phantom as model input (float16, to halve the memory), its labels and finding cells."""
    seed, index, size, route = job
    assert _worker_package is not None
    phantom = make_phantom(seed, size, finding_for(index), monochrome1=monochrome1_for(index))
    if route == "dicom":
        # The node's own path: a DX dataset, its Window Center/Width and photometric interpretation.
        x = prepare_instance(write_dicom(phantom), _worker_package)
    else:
        x = preprocess_pixels(phantom.pixels, Window(phantom.window_center, phantom.window_width),
                              phantom.photometric, _worker_package)
    return x.astype(np.float16), phantom.labels, finding_cells(phantom).astype(np.float16)


def make_dataset(seed_base: int, count: int, size: int, route: str, package_dir: Path, workers: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs (count, 1, 256, 256) float16, labels (count, 2) float32, finding cells (count, 2, 16, 16)."""
    jobs = [(seed_base + i, i, size, route) for i in range(count)]
    if workers > 1:
        import multiprocessing
        # Fresh processes with single-threaded BLAS: forked ones would inherit this process's
        # BLAS thread pool, and two processes of two threads each on two cores run slower than one.
        saved = {k: os.environ.get(k) for k in _BLAS_THREADS}
        os.environ.update({k: "1" for k in _BLAS_THREADS})
        try:
            with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (package_dir,)) as pool:
                results = pool.map(_example, jobs, chunksize=4)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    else:
        _init_worker(package_dir)
        results = [_example(j) for j in jobs]
    x = np.stack([r[0] for r in results])
    y = np.array([r[1] for r in results], dtype=np.float32)
    return x, y, np.stack([r[2] for r in results])


# ----------------------------------------------------------------------------------------------
# Training, export, evaluation

def set_deterministic(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)


def train(x: np.ndarray, y: np.ndarray, cells: np.ndarray, config: TrainConfig, log=print,
          after_epoch=None) -> CxrTriageNet:
    """Binary cross-entropy on the image-level logits, plus the locator's per-cell loss."""
    set_deterministic(config.seed)
    model = CxrTriageNet()
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(x) / config.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr, epochs=config.epochs,
                                                   steps_per_epoch=steps_per_epoch, pct_start=0.15)
    order = torch.Generator().manual_seed(config.seed)
    targets = torch.from_numpy(y)
    # A cell is a positive target in proportion to how much of it the finding covers, saturating
    # at a tenth; positives are a few cells in 256, hence their weight.
    cell_targets = torch.from_numpy(np.minimum(cells.astype(np.float32) / 0.1, 1.0))
    image_loss = nn.BCEWithLogitsLoss(pos_weight=torch.full((2,), config.positive_weight))
    cell_loss = nn.BCEWithLogitsLoss(pos_weight=torch.full((2, 1, 1), config.cell_pos_weight))
    for epoch in range(config.epochs):
        model.train()
        started, total = time.perf_counter(), 0.0
        perm = torch.randperm(len(x), generator=order)
        for step in range(steps_per_epoch):
            idx = perm[step * config.batch:(step + 1) * config.batch]
            batch = torch.from_numpy(x[idx.numpy()].astype(np.float32))
            logits, where = model.training_outputs(batch)
            loss = image_loss(logits, targets[idx]) + config.cell_weight * cell_loss(where, cell_targets[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        log(f"epoch {epoch + 1}/{config.epochs}: loss {total / len(x):.4f} ({time.perf_counter() - started:.0f} s)")
        if after_epoch is not None:
            after_epoch(epoch, model)
    return model.eval()


def _session(path: Path):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predict(onnx_path: Path, x: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid probabilities (N, 2) and class activation maps (N, 2, h, w) from ONNX Runtime."""
    session = _session(onnx_path)
    logits, cams = [], []
    for i in range(0, len(x), batch):
        out = session.run(["logits", "cam"], {"image": x[i:i + batch].astype(np.float32)})
        logits.append(out[0])
        cams.append(out[1])
    return 1.0 / (1.0 + np.exp(-np.concatenate(logits).astype(np.float64))), np.concatenate(cams)


@dataclass(frozen=True)
class Metrics:
    finding: str
    threshold: float
    positives: int
    negatives: int
    accuracy: float
    sensitivity: float
    specificity: float
    auc: float
    pointing: float   # share of true positives whose CAM peak lies on the finding


def evaluate(pkg: ModelPackage, probs: np.ndarray, cams: np.ndarray, y: np.ndarray, cells: np.ndarray
             ) -> list[Metrics]:
    """Metrics per output at its threshold_positive; ``cells`` (N, 2, 16, 16) locate the findings."""
    result = []
    for out in pkg.outputs:
        p, truth = probs[:, out.index], y[:, out.index].astype(bool)
        called = p >= out.threshold_positive
        tp, tn = int((called & truth).sum()), int((~called & ~truth).sum())
        hits = []
        for i in np.nonzero(called & truth)[0]:
            r, c = np.unravel_index(int(np.argmax(cams[i, out.index])), cams.shape[-2:])
            # On the finding: the peak cell or one of its neighbours holds part of it.
            hits.append(bool(cells[i, out.index, max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].max() > 0))
        result.append(Metrics(
            finding=out.name, threshold=out.threshold_positive, positives=int(truth.sum()),
            negatives=int((~truth).sum()), accuracy=(tp + tn) / len(truth),
            sensitivity=tp / max(int(truth.sum()), 1), specificity=tn / max(int((~truth).sum()), 1),
            auc=auc_roc(p, truth), pointing=float(np.mean(hits)) if hits else float("nan")))
    return result


# ----------------------------------------------------------------------------------------------
# The package

def write_model_card(path: Path, command: str, config: TrainConfig, metrics: list[Metrics], exported: ExportResult,
                     timings: dict[str, float], params: int) -> None:
    pkg = exported.package
    spec = pkg.export
    batches = sorted({p.batch for p in exported.parity})
    rows = "\n".join(
        f"| {m.finding} | {m.threshold:g} | {m.positives} / {m.negatives} | {m.accuracy:.3f} | "
        f"{m.sensitivity:.3f} | {m.specificity:.3f} | {m.auc:.3f} | {m.pointing:.2f} |" for m in metrics)
    path.write_text(f"""# cxr-triage: model card

**A demonstration model trained on synthetic phantoms, not for clinical use.** It has never seen
an image of a patient. It exists so that the appliance has a real, trained model to run end to
end; its numbers describe synthetic phantoms only and say nothing about performance on patients.

## What it does

Input: one chest radiograph (CR or DX, MONOCHROME1 or MONOCHROME2), windowed with the instance's
own Window Center/Width, resized to 256 x 256 (area), normalised (mean 0.5, std 0.25), as
`manifest.toml` says. Outputs: `logits` (N, 2), sigmoid, index 0 nodule, 1 pneumothorax; `cam`
(N, 2, 16, 16), the class activation map of each output (its mean over positions is the logit).

Model: a CNN of {params:,} parameters (4x4 patch stem, five 3x3 convolution blocks with batch
normalisation, 1x1 head), ONNX opset {exported.opset}, dynamic batch.
Device UID `{pkg.device_uid}`; model.onnx SHA-256 `{pkg.hashes[pkg.model_file].removeprefix("sha256:")}`.

## Training data

{config.train_count} phantoms from `export/phantoms.py` (seeds {_TRAIN_SEED_BASE + config.seed * config.train_count}
onwards) at {config.train_size} x {config.train_size} pixels, half without a finding and 30 % with each
finding (10 % with both), one in seven stored as MONOCHROME1; each fed through
`appliance.preprocessing.preprocess_pixels` with this package's preprocessing. {config.epochs} epochs,
batch {config.batch}, AdamW (one-cycle learning rate, peak {config.lr:g}), binary cross-entropy per
finding on the logits, plus a per-cell loss of a training-only 1x1 "locator" head that learns from
the phantoms' finding masks where each finding is (without it the image-level label alone did not
teach the network to find a nodule a few pixels wide in the steps this budget allows; the locator
is not exported). Deterministic: fixed seeds, `torch.use_deterministic_algorithms(True)`,
{THREADS} threads.

## Held-out evaluation

{config.eval_count} phantoms with other seeds ({_EVAL_SEED_BASE} onwards), made at
{config.eval_size} x {config.eval_size} pixels like real input, each written as a DX dataset and
prepared by `appliance.preprocessing.prepare_instance` (the node's own path), scored by ONNX
Runtime on `model.onnx`, at the manifest's `threshold_positive`:

| finding | threshold | positives / negatives | accuracy | sensitivity | specificity | AUC-ROC | CAM pointing |
| --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

CAM pointing: the share of true positives whose class activation map peaks on the finding
(the peak cell of the 16 x 16 map, or a neighbour, holds part of it).

ONNX Runtime against torch (`appliance export`), batch {", ".join(map(str, batches))}, on
{exported.inputs}: max |difference| {exported.max_abs_diff:.1e}, where |torch| reaches
{max(p.max_abs_reference for p in exported.parity):.3g} (allowed per element: {spec.atol:g} + {spec.rtol:g} x |torch|).
`appliance export appliance/model_packages/cxr-triage` rebuilds this model.onnx from weights.pt
byte for byte.

## How it was made

```
{command}
```

Took {timings["total"] / 60:.1f} minutes on {THREADS} CPU threads: {timings["phantoms"]:.0f} s making
phantoms, {timings["training"]:.0f} s training, the rest exporting and evaluating (load average
{timings["load"]:.1f} at the end; other work on the machine stretches these times). A rerun gives a
byte-identical `weights.pt` and `model.onnx`, hence the same `device_uid`; any change to the
phantoms, the model or the training gives a new one.

## Limits

- Synthetic phantoms only: simplified anatomy (no scapulae, breasts, devices, lines, tubes),
  one view (PA), no real disease appearance. Anything outside that is out of distribution.
- Not a medical device. Not for diagnosis, triage or any clinical decision.
""")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.train_cxr_triage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR,
                        help=f"package folder to write (default {PACKAGE_DIR})")
    parser.add_argument("--quick", action="store_true", help="a tiny run in seconds, for tests")
    parser.add_argument("--epochs", type=int, help="override the number of epochs")
    parser.add_argument("--train-count", type=int, help="override the number of training phantoms")
    parser.add_argument("--eval-count", type=int, help="override the number of held-out phantoms")
    parser.add_argument("--workers", type=int, help="processes that make phantoms (default 2; 1 for --quick)")
    args = parser.parse_args(argv)
    if args.quick and args.out == PACKAGE_DIR:
        parser.error("--quick needs --out: a quick run must not replace the shipped model")

    config = QUICK if args.quick else TrainConfig()
    for key in ("epochs", "train_count", "eval_count", "workers"):
        if getattr(args, key) is not None:
            config = replace(config, **{key: getattr(args, key)})
    started = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", flush=True)

    log(f"making {config.train_count} training phantoms at {config.train_size} px "
        f"and {config.eval_count} held-out at {config.eval_size} px")
    x, y, cells = make_dataset(_TRAIN_SEED_BASE + config.seed * config.train_count, config.train_count,
                           config.train_size, "pixels", PACKAGE_DIR, config.workers)
    x_eval, y_eval, cells_eval = make_dataset(_EVAL_SEED_BASE, config.eval_count, config.eval_size, "dicom",
                                         PACKAGE_DIR, config.workers)
    made = time.perf_counter()
    log("training")
    model = train(x, y, cells, config, log)
    trained = time.perf_counter()

    if out.resolve() != PACKAGE_DIR.resolve():
        copy_package(PACKAGE_DIR, out)   # the manifest, with its [export] table
    with tempfile.TemporaryDirectory() as tmp:
        # The toolchain's export, as `appliance export --weights` runs it: the weights enter the
        # package only with a model.onnx that passed its checks, and what ships is what it produced.
        torch.save(model.state_dict(), Path(tmp) / "weights.pt")
        exported = export_package(out, Source(weights=Path(tmp) / "weights.pt"), log=log)
    pkg = exported.package

    probs, cams = predict(out / "model.onnx", x_eval)
    metrics = evaluate(pkg, probs, cams, y_eval, cells_eval)
    for m in metrics:
        log(f"{m.finding}: accuracy {m.accuracy:.3f} sensitivity {m.sensitivity:.3f} "
            f"specificity {m.specificity:.3f} AUC {m.auc:.3f} CAM pointing {m.pointing:.2f}")
    command = " ".join(["python -m export.train_cxr_triage", *(sys.argv[1:] if argv is None else argv)])
    timings = {"total": time.perf_counter() - started, "phantoms": made - started, "training": trained - made,
               "load": os.getloadavg()[0]}
    params = sum(p.numel() for part in (model.features, model.head) for p in part.parameters())
    write_model_card(out / "MODEL_CARD.md", command.strip(), config, metrics, exported, timings, params)
    log(f"wrote {out}: model.onnx ({(out / 'model.onnx').stat().st_size / 1024:.0f} KiB), weights.pt, "
        f"manifest.toml (device_uid {pkg.device_uid}), MODEL_CARD.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

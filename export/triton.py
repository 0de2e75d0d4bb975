"""A model package as a Triton Inference Server model repository entry.

    REPO/<name>/config.pbtxt
    REPO/<name>/1/model.onnx      (platform onnxruntime_onnx)
    REPO/<name>/1/model.plan      (platform tensorrt_plan, from an engine built for the serving GPU)

Tensor names, data types and shapes come from the ONNX graph itself (the engine is built from the
same graph, so a plan has the same tensors); the batch range from the manifest.  The config is
protobuf text of Triton's ``ModelConfig`` (model_config.proto), and Triton reads it as such.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from appliance.manifest import ModelPackage

PLATFORMS = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
#: Triton's model version folder; the package's own version (semantic, "0.1.0") lives in the
#: manifest and in every report, so the repository keeps one version, replaced on re-export.
VERSION = "1"
#: How long Triton may hold a request to fill a batch.  Triage is latency-bound: a tenth of a
#: millisecond lets requests arriving together share a batch without delaying a lone one.
MAX_QUEUE_DELAY_US = 100

#: ONNX TensorProto element types -> Triton data types (model_config.proto DataType).
_TRITON_TYPES = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
    13: "TYPE_UINT64", 16: "TYPE_BF16",
}


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as Triton declares it: dims without the batch dimension, -1 where
    the graph leaves a dimension free."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def tensor_specs(onnx_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of an ONNX file whose first dimension is the batch."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        if t.elem_type not in _TRITON_TYPES:
            raise ValueError(f"{onnx_path}: tensor {value.name!r} has ONNX element type {t.elem_type}, "
                             "which Triton has no data type for")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if not dims or dims[0] != -1:
            raise ValueError(f"{onnx_path}: tensor {value.name!r} has shape {dims}, without a free batch "
                             "dimension first; export it with `appliance export` (dynamic batch)")
        return TensorSpec(value.name, _TRITON_TYPES[t.elem_type], tuple(dims[1:]))

    inputs = [spec(i) for i in model.graph.input if i.name not in initializers]
    return inputs, [spec(o) for o in model.graph.output]


def config_text(pkg: ModelPackage, inputs: list[TensorSpec], outputs: list[TensorSpec],
                platform: str = "onnxruntime_onnx", instances: int = 1) -> str:
    """``config.pbtxt`` for ``pkg`` (Triton model configuration, protobuf text format)."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform {platform!r}: expected one of {', '.join(PLATFORMS)}")

    def tensors(specs: list[TensorSpec]) -> str:
        return ",\n".join(f"  {{\n    name: {json.dumps(s.name)}\n    data_type: {s.data_type}\n"
                          f"    dims: [ {', '.join(map(str, s.dims))} ]\n  }}" for s in specs)

    preferred = sorted({b for b in (pkg.opt_batch, pkg.max_batch) if b > 1})
    # A plan runs on the GPU it was built for; ONNX Runtime takes a GPU where Triton has one
    # and the CPU otherwise (KIND_AUTO), so one repository serves either kind of node.
    kind = "KIND_GPU" if platform == "tensorrt_plan" else "KIND_AUTO"
    lines = [
        f"# Written by appliance export from {pkg.name} {pkg.version} (device UID {pkg.device_uid}).",
        f"name: {json.dumps(pkg.name)}",
        f"platform: {json.dumps(platform)}",
        f"default_model_filename: {json.dumps(PLATFORMS[platform])}",
        f"max_batch_size: {pkg.max_batch}",
        f"input [\n{tensors(inputs)}\n]",
        f"output [\n{tensors(outputs)}\n]",
        "dynamic_batching {" + (f"\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]" if preferred else "")
        + f"\n  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}\n}}",
        f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]",
        "version_policy: { latest: { num_versions: 1 } }",
    ]
    return "\n".join(lines) + "\n"


def write_repository(repo: Path, pkg: ModelPackage, onnx_path: Path, engine: Path | None = None,
                     instances: int = 1) -> Path:
    """Write ``repo/<pkg.name>/`` (config and version folder) and return it.

    With ``engine`` (a TensorRT plan built from ``onnx_path`` for the serving GPU), the entry
    serves that plan (``tensorrt_plan``); otherwise the ONNX file (``onnxruntime_onnx``).  The
    entry is built beside the old one and swapped in, so a Triton polling the repository never
    sees half of it.
    """
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    inputs, outputs = tensor_specs(onnx_path)
    platform = "tensorrt_plan" if engine is not None else "onnxruntime_onnx"
    if engine is not None and not Path(engine).is_file():
        raise FileNotFoundError(f"{engine}: no such engine file")
    target = repo / pkg.name
    staging = Path(tempfile.mkdtemp(dir=repo, prefix=f".{pkg.name}-"))
    # mkdtemp makes a private folder; the Triton server often runs as another user.
    staging.chmod(0o755)
    try:
        (staging / VERSION).mkdir()
        shutil.copy2(engine if engine is not None else onnx_path, staging / VERSION / PLATFORMS[platform])
        (staging / "config.pbtxt").write_text(config_text(pkg, inputs, outputs, platform, instances))
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=repo, prefix=f".{pkg.name}-old-"))
            os.replace(target, old / pkg.name)
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target

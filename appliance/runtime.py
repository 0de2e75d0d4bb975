"""Runtimes: one call, ``run(batch) -> {output name: array}``, whatever executes the model.

The embedded default is ONNX Runtime on the CPU.  TensorRT (GPU) comes behind the same interface
with the ``gpu`` extra.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from .manifest import ModelPackage


class Runtime(Protocol):
    package: ModelPackage

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


class OnnxRuntime:
    """A model package's ``model.onnx`` in an ONNX Runtime CPU session."""

    def __init__(self, package: ModelPackage, threads: int = 0):
        # ONNX Runtime keeps a usage-telemetry database under $HOME unless told not to; a medical
        # device records nothing it was not asked to.
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        import onnxruntime as ort

        self.package = package
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(package.onnx_path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        if package.input_name not in inputs:
            raise ValueError(f"{package.onnx_path}: no input named {package.input_name!r} "
                             f"(the manifest's input.name); the model has {sorted(inputs)}")
        self.output_names = [o.name for o in self.session.get_outputs()]
        for out in package.outputs:
            if out.tensor not in self.output_names:
                raise ValueError(f"{package.onnx_path}: no output named {out.tensor!r} "
                                 f"(outputs.tensor of {out.name}); the model has {self.output_names}")
        # An FP16 package (``appliance quantize --mode fp16``) takes and gives float16 tensors.
        self.input_dtype = np.float16 if inputs[package.input_name].type == "tensor(float16)" else np.float32

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """``batch`` is NCHW float32, as the preprocessing kernels produce it."""
        if self.package.input_layout == "NHWC":
            batch = batch.transpose(0, 2, 3, 1)
        feed = np.ascontiguousarray(batch, dtype=self.input_dtype)
        results = self.session.run(None, {self.package.input_name: feed})
        return {name: value.astype(np.float32) if value.dtype == np.float16 else value
                for name, value in zip(self.output_names, results)}

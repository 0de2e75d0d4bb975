"""Model outputs -> findings: activation, thresholds, and the class activation map."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .manifest import ModelPackage, Output


@dataclass(frozen=True)
class Finding:
    """One output of a model for one series: the probability and what the thresholds make of it."""

    output: Output
    probability: float

    @property
    def present(self) -> bool:
        return self.probability >= self.output.threshold_positive

    @property
    def critical(self) -> bool:
        return self.probability >= self.output.threshold_critical


def activate(values: np.ndarray, activation: str) -> np.ndarray:
    values = values.astype(np.float64)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-values))
    if activation == "softmax":
        e = np.exp(values - values.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return values


def findings(pkg: ModelPackage, outputs: dict[str, np.ndarray]) -> list[Finding]:
    """Findings for one series from the batch of its images' raw outputs.

    ``outputs[tensor]`` has shape (images, classes).  A series' probability for a finding is the
    highest over its images: a finding on any image is a finding of the series.
    """
    result = []
    for out in pkg.outputs:
        probs = activate(outputs[out.tensor], out.activation)[:, out.index]
        result.append(Finding(out, float(probs.max())))
    return result

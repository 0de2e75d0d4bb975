"""Models and packages a site might bring to ``appliance export``, for the tests.

Factories are called by the export with no arguments, as ``export_models:<function>``; their
weights are random but seeded, so a test's state dict and a factory's module agree.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

SIZE = 64          # inputs stay small: the test machine has 2 shared cores
MAX_BATCH = 4


def densenet() -> nn.Module:
    """MONAI's DenseNet-121, the classifier architecture sites most often bring for radiographs."""
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    return DenseNet121(spatial_dims=2, in_channels=1, out_channels=2).eval()


def unet() -> nn.Module:
    """A small MONAI U-Net with residual units: a segmenter with two channels (background, lung)."""
    from monai.networks.nets import UNet

    torch.manual_seed(1)
    return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
                num_res_units=1).eval()


class SmallClassifier(nn.Module):
    """Conv, batch norm, dropout, a linear head: the layers that behave differently in training."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(8, 2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(image)))


def small_classifier() -> nn.Module:
    return SmallClassifier().eval()


def left_in_training() -> nn.Module:
    """The mistake the parity check must catch: the factory forgot ``.eval()``."""
    return SmallClassifier()


class BatchBranching(SmallClassifier):
    """Python control flow on the batch size, which a tracer records for one size only."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = super().forward(image)
        if image.shape[0] > 1:
            logits = logits - logits.mean(dim=0, keepdim=True)
        return logits


def batch_branching() -> nn.Module:
    return BatchBranching().eval()


class ChannelsLast(SmallClassifier):
    """Takes NHWC, as models ported from TensorFlow often do."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return super().forward(image.permute(0, 3, 1, 2))


def channels_last() -> nn.Module:
    return ChannelsLast().eval()


class WithHeatmap(SmallClassifier):
    """Returns its outputs as a dict, in an order other than the manifest's."""

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features[:3](image)
        return {"cam": f[:, :2], "logits": self.head(self.features[3:](f))}


def with_heatmap() -> nn.Module:
    return WithHeatmap().eval()


CLASSIFIER_OUTPUTS = """
[[outputs]]
name = "nodule"
tensor = "logits"
index = 0
activation = "sigmoid"
finding = { value = "27925004", scheme = "SCT", meaning = "Nodule" }
threshold_positive = 0.5

[[outputs]]
name = "pneumothorax"
tensor = "logits"
index = 1
activation = "sigmoid"
finding = { value = "36118008", scheme = "SCT", meaning = "Pneumothorax" }
threshold_positive = 0.5
"""

SEGMENTER_OUTPUTS = """
[[outputs]]
name = "lung"
tensor = "mask"
index = 1
activation = "softmax"
finding = { value = "39607008", scheme = "SCT", meaning = "Lung structure" }
category = { value = "91723000", scheme = "SCT", meaning = "Anatomical structure" }
threshold_positive = 0.5
"""


def manifest(name: str, task: str = "classification", outputs: str = CLASSIFIER_OUTPUTS, *,
             heatmap: str | None = None, modalities: str = '["DX", "CR"]', max_batch: int = MAX_BATCH,
             size: int = SIZE, layout: str = "NCHW") -> str:
    heatmap_line = f'heatmap_tensor = "{heatmap}"\n' if heatmap else ""
    return f"""# {name}: a test package for appliance export.

[model]
name = "{name}"
version = "1.0.0"
device_uid = "2.25.1"   # replaced by the export
manufacturer = "Test site"
task = "{task}"
intended_use = "Tests only."
file = "model.onnx"
{heatmap_line}
[input]
name = "image"
height = {size}
width = {size}
channels = 1
max_batch = {max_batch}
layout = "{layout}"

[preprocessing]
resize = "area"
mean = [0.5]
std = [0.25]

[applicability]
modalities = {modalities}
{outputs}"""


def make_package(folder: Path, factory: str | None, **kwargs) -> Path:
    """A package folder with a manifest and, for ``factory``, its ``weights.pt``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.toml").write_text(manifest(folder.name, **kwargs))
    if factory is not None:
        model = globals()[factory]()
        torch.save(model.state_dict(), folder / "weights.pt")
    return folder

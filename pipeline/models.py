"""Network architectures: one registered class per `model.arch`.

Every architecture maps an image batch to a `ModelOutput`: one prediction per task head, and the
named feature taps that distillation matches (`bottleneck` and `decoder` for SegNet). The same
class is a single-task teacher (one head) and a multi-task student (one head per task).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pipeline.registry import Registry

FEATURES = ("bottleneck", "decoder")


@dataclass
class ModelOutput:
    predictions: dict[str, torch.Tensor]  # task -> raw head output [B, C, H, W]
    features: dict[str, torch.Tensor]  # tap name -> feature map [B, C, h, w]


class Architecture(nn.Module, ABC):
    """A network with task heads (kept in `self.task_heads`) and named feature taps."""

    name: ClassVar[str]

    def __init__(self, filters: list[int], heads: dict[str, int]) -> None:
        super().__init__()
        self.filters = list(filters)
        self.heads = dict(heads)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of every task: all but the heads."""
        return [p for name, p in self.named_parameters() if not name.startswith("task_heads.")]

    @abstractmethod
    def feature_channels(self) -> dict[str, int]:
        """Channels of each feature tap."""

    @abstractmethod
    def forward(self, images: torch.Tensor) -> ModelOutput:
        """Predictions of every head and the feature taps."""


ARCHITECTURES: Registry[Architecture] = Registry("architecture")


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def extra_convs(level: int) -> int:
    """SegNet's convolutions after the first of a level: one in the two shallow levels, else two."""
    return 1 if level < 2 else 2


def init_weights(module: nn.Module) -> None:
    """Xavier-normal convolutions with zero bias, unit BatchNorm, as the official code does."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def task_head(channels: int, out_channels: int) -> nn.Sequential:
    """The official head: a 3x3 then a 1x1 convolution, nothing between them."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        nn.Conv2d(channels, out_channels, kernel_size=1),
    )


@ARCHITECTURES.register
class SegNet(Architecture):
    """VGG-style encoder with max-pool indices and a mirrored decoder with max-unpool.

    Level i of the encoder has `filters[i]` channels: one 3x3 conv-BN-ReLU that changes the width,
    then `extra_convs(i)` more, then a 2x2 max pool. The decoder unpools with the stored indices and
    mirrors it. Taps: `bottleneck`, the encoder output after the last pool, and `decoder`, the last
    shared decoder feature (filters[0] channels at full resolution), just before the heads.
    """

    name: ClassVar[str] = "segnet"

    def __init__(self, filters: list[int], heads: dict[str, int]) -> None:
        super().__init__(filters, heads)
        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level, width in enumerate(filters):
            wider = 3 if level == 0 else filters[level - 1]
            convs = [conv_bn_relu(wider, width)]
            convs += [conv_bn_relu(width, width) for _ in range(extra_convs(level))]
            self.encoder.append(nn.Sequential(*convs))
            narrower = filters[max(level - 1, 0)]
            convs = [conv_bn_relu(width, narrower)]
            convs += [conv_bn_relu(narrower, narrower) for _ in range(extra_convs(level))]
            self.decoder.append(nn.Sequential(*convs))
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(kernel_size=2, stride=2)
        self.task_heads = nn.ModuleDict(
            {task: task_head(filters[0], channels) for task, channels in heads.items()}
        )
        init_weights(self)

    def feature_channels(self) -> dict[str, int]:
        return {"bottleneck": self.filters[-1], "decoder": self.filters[0]}

    def forward(self, images: torch.Tensor) -> ModelOutput:
        x = images
        indices, sizes = [], []
        for block in self.encoder:
            x = block(x)
            sizes.append(x.shape[-2:])
            x, index = self.pool(x)
            indices.append(index)
        bottleneck = x
        for level in reversed(range(len(self.encoder))):
            x = self.unpool(x, indices[level], output_size=sizes[level])
            x = self.decoder[level](x)
        predictions = {task: head(x) for task, head in self.task_heads.items()}
        return ModelOutput(predictions, {"bottleneck": bottleneck, "decoder": x})


def build_model(arch: str, filters: list[int], heads: dict[str, int]) -> Architecture:
    return ARCHITECTURES[arch](filters, heads)

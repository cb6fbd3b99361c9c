"""Network architectures: one registered class per `model.arch`.

Every architecture maps an image batch to a `ModelOutput`: one prediction per task head, and the
named feature taps that distillation matches (`bottleneck` and `decoder` for SegNet). The same
class is a single-task teacher (one head) and a multi-task student (one head per task).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.registry import Registry

FEATURES = ("bottleneck", "decoder")
# A teacher's raw head output, cached with its features for output distillation.
PREDICTION = "prediction"


@dataclass
class ModelOutput:
    predictions: dict[str, torch.Tensor]  # task -> raw head output [B, C, H, W]
    features: dict[str, torch.Tensor]  # shared tap name -> feature map [B, C, h, w]
    task_features: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def features_of(self, task: str) -> dict[str, torch.Tensor]:
        """The taps that serve `task`: its own (attended) features where the architecture has
        them, else the shared ones."""
        return self.task_features.get(task, self.features)


class Architecture(nn.Module, ABC):
    """A network with task heads (kept in `self.task_heads`) and named feature taps."""

    name: ClassVar[str]

    def __init__(self, filters: list[int], heads: dict[str, int]) -> None:
        super().__init__()
        self.filters = list(filters)
        self.heads = dict(heads)

    def distilled_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a single-task network (a teacher) gives distillation: its feature taps for its
        task and its raw head output (`prediction`)."""
        (task,) = self.heads
        output = self(images)
        return output.features_of(task) | {PREDICTION: output.predictions[task]}

    @abstractmethod
    def last_shared_layer(self) -> list[nn.Parameter]:
        """Weights of the last layer all tasks share (GradNorm balances gradient norms there)."""

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
    """Xavier-normal convolutions with zero bias, unit BatchNorm, as the official code does.
    Not on the meta device: it holds no values, and a random fill there imports torch's compiler
    (seconds, at every command that checks a checkpoint)."""
    if any(parameter.is_meta for parameter in module.parameters()):
        return
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

    def last_shared_layer(self) -> list[nn.Parameter]:
        return [self.decoder[0][-1][0].weight]

    def shared_pass(self, images: torch.Tensor) -> "SharedPass":
        """The encoder and decoder, keeping each level's intermediate features."""
        p = SharedPass([], [], [], [], images)
        x, indices = images, []
        for block in self.encoder:
            p.encoder_first.append(block[0](x))
            x = block[1:](p.encoder_first[-1])
            p.encoder_out.append(x)
            x, index = self.pool(x)
            indices.append(index)
        p.bottleneck = x
        unpooled, decoded = {}, {}
        for level in reversed(range(len(self.encoder))):
            x = self.unpool(x, indices[level], output_size=p.encoder_out[level].shape[-2:])
            unpooled[level] = x
            x = self.decoder[level](x)
            decoded[level] = x
        p.unpooled = [unpooled[level] for level in range(len(self.encoder))]
        p.decoder_out = [decoded[level] for level in range(len(self.encoder))]
        return p

    def forward(self, images: torch.Tensor) -> ModelOutput:
        p = self.shared_pass(images)
        x = p.decoder_out[0]
        predictions = {task: head(x) for task, head in self.task_heads.items()}
        return ModelOutput(predictions, {"bottleneck": p.bottleneck, "decoder": x})


@dataclass
class SharedPass:
    """Per level (index 0 is the full resolution): the output of the encoder's first convolution
    and of the whole encoder block, the decoder's unpooled input and its output."""

    encoder_first: list[torch.Tensor]
    encoder_out: list[torch.Tensor]
    unpooled: list[torch.Tensor]
    decoder_out: list[torch.Tensor]
    bottleneck: torch.Tensor


def attention(in_channels: int, out_channels: int) -> nn.Sequential:
    """MTAN's attention module: two 1x1 conv-BN, ReLU between, a sigmoid mask at the end."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, kernel_size=1),
        nn.BatchNorm2d(out_channels),
        nn.Sigmoid(),
    )


@ARCHITECTURES.register
class MTAN(SegNet):
    """Multi-Task Attention Network (Liu et al., 2019): the shared SegNet, and per task a branch of
    attention masks over the shared features at every encoder and decoder level.

    At encoder level j, task t's mask is computed from the level's first shared feature (and the
    branch's feature from the level above), multiplies the level's shared output, and a shared
    conv and a pool carry it down; the decoder mirrors it with bilinear upsampling. Each head reads
    its task's attended decoder feature. Taps per task: `bottleneck` (the branch's encoder output)
    and `decoder` (the attended feature before the head), which `kd` distils; the shared SegNet
    taps stay in `features`.
    """

    name: ClassVar[str] = "mtan"

    def __init__(self, filters: list[int], heads: dict[str, int]) -> None:
        super().__init__(filters, heads)
        f, levels = filters, len(filters)
        self.encoder_attention = nn.ModuleDict(
            {
                task: nn.ModuleList(
                    [attention(f[j] * (1 if j == 0 else 2), f[j]) for j in range(levels)]
                )
                for task in heads
            }
        )
        self.decoder_attention = nn.ModuleDict(
            {
                task: nn.ModuleList([attention(2 * f[j], f[max(j - 1, 0)]) for j in range(levels)])
                for task in heads
            }
        )
        self.encoder_branch = nn.ModuleList(
            [conv_bn_relu(f[j], f[min(j + 1, levels - 1)]) for j in range(levels)]
        )
        self.decoder_branch = nn.ModuleList([conv_bn_relu(f[j], f[j]) for j in range(levels)])
        init_weights(self)

    def forward(self, images: torch.Tensor) -> ModelOutput:
        p = self.shared_pass(images)
        predictions, task_features = {}, {}
        for task in self.task_heads:
            t = None
            for j in range(len(self.filters)):
                inputs = p.encoder_first[j] if t is None else torch.cat([p.encoder_first[j], t], 1)
                attended = self.encoder_attention[task][j](inputs) * p.encoder_out[j]
                t = F.max_pool2d(self.encoder_branch[j](attended), kernel_size=2, stride=2)
            bottleneck = t
            for j in reversed(range(len(self.filters))):
                t = F.interpolate(t, p.unpooled[j].shape[-2:], mode="bilinear", align_corners=True)
                t = self.decoder_branch[j](t)
                mask = self.decoder_attention[task][j](torch.cat([p.unpooled[j], t], 1))
                t = mask * p.decoder_out[j]
            task_features[task] = {"bottleneck": bottleneck, "decoder": t}
            predictions[task] = self.task_heads[task](t)
        shared = {"bottleneck": p.bottleneck, "decoder": p.decoder_out[0]}
        return ModelOutput(predictions, shared, task_features)


def build_model(arch: str, filters: list[int], heads: dict[str, int]) -> Architecture:
    return ARCHITECTURES[arch](filters, heads)

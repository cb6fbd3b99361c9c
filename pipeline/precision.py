"""Mixed precision: the forward passes under autocast, losses and metrics in float32.

`fp32` computes everything in float32; `bf16` and `fp16` run the networks' matrix products and
convolutions in that type under torch.autocast (on a GPU, or on the CPU, which supports both),
while every loss, distance and metric is computed from float32 copies of the outputs. `fp16`
scales the loss against underflowing gradients (torch.amp.GradScaler); bf16 has float32's range
and needs no scaling. `auto` is bf16 on a GPU that supports it, else fp32.
"""

from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from pipeline.errors import KdmtlError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Bits of the significand after the point: the unit round-off of a value computed in that type
# is 2^-(bits + 1).
MANTISSA_BITS = {"fp32": 23, "bf16": 7, "fp16": 10}


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` as this device makes it (bf16 on a GPU that supports it, else fp32); a precision
    the device cannot run is an error."""
    cuda = device.type == "cuda"
    if name == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise KdmtlError(
            f"precision bf16 is not supported by {torch.cuda.get_device_name(device)}: "
            "use fp16 (scaled) or fp32"
        )
    if name not in DTYPES:
        raise KdmtlError(f"{name!r} is not a precision; allowed: auto, {', '.join(DTYPES)}")
    return name


def recomputation_tolerance(name: str) -> float:
    """How far (relatively) two runs of one network in precision `name` may differ, on other
    kernels or another device: eight units of round-off of its type, 0 for fp32 (there the
    stored encoding's rounding is the larger)."""
    return 0.0 if name == "fp32" else 2.0 ** -(MANTISSA_BITS[name] - 2)


@dataclass
class Precision:
    """How one network is run: `name` resolved (fp32, bf16 or fp16) on `device`."""

    name: str
    device: torch.device
    scaler: torch.amp.GradScaler | None = field(init=False)

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None

    @classmethod
    def for_device(cls, name: str, device: torch.device) -> "Precision":
        return cls(resolve_precision(name, device), device)

    def autocast(self) -> AbstractContextManager:
        """The context of a forward pass: autocast to bf16 or fp16, nothing for fp32."""
        return torch.autocast(
            self.device.type, dtype=DTYPES[self.name], enabled=self.name != "fp32"
        )

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The value to call backward() on (the loss times the scaler's factor with fp16)."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def step(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Step every optimizer; with fp16, unscale first and skip steps whose gradients
        overflowed, then adapt the factor."""
        if self.scaler is None:
            for optimizer in optimizers:
                optimizer.step()
            return
        for optimizer in optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()

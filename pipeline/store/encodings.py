"""Feature encodings: how a teacher's float32 features are stored in a feature store, and read back.

One registered class per `features.encoding`. Extraction encodes on the teacher's device, so a
GPU hands the writer the stored bytes only; readers keep the stored values as they are (resident
int8 features take half the memory of float16) and the student decodes each batch on its device.
"""

from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.distill import normalize_pixels
from pipeline.models import PREDICTION
from pipeline.registry import Registry


class FeatureEncoding:
    """Stored values of features [..., C, h, w] (channels third from last) and the way back."""

    name: ClassVar[str]
    dtype: ClassVar[str]  # of the stored arrays
    mantissa_bits: ClassVar[int]  # the most BitRound may keep; 0 for integers
    # The stored vectors are each pixel's feature L2-normalised over channels: a loss that needs
    # the teacher's magnitudes cannot use them.
    normalized: ClassVar[bool] = False
    scale: ClassVar[float] = 1.0  # feature = stored value x scale
    error_kind: ClassVar[str] = "relative"

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(getattr(torch, self.dtype))

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        """float32 features from stored values, on their device."""
        return stored.float() * self.scale if self.scale != 1.0 else stored.float()

    def decode_array(self, stored: Any) -> Any:
        """float32 features from a numpy or dask array of stored values."""
        values = stored.astype(np.float32)
        return values * np.float32(self.scale) if self.scale != 1.0 else values

    def expected(self, features: np.ndarray) -> np.ndarray:
        """What the decoded store should hold for these float32 teacher features."""
        return features

    def errors(self, decoded: np.ndarray, expected: np.ndarray) -> np.ndarray:
        """Per value, how far a decoded store value is from the expected one, in the unit of
        `tolerance`: relative to the value (1e-3 keeps near-zero values from dominating)."""
        return np.abs(decoded - expected) / (np.abs(expected) + 1e-3)

    def tolerance(self, keep_bits: int | None) -> float:
        """The largest error `errors` may give for a store written from the same teacher:
        twice the unit round-off of the stored precision (BitRound keeps `keep_bits` bits)."""
        return 2.0 ** -(keep_bits if keep_bits is not None else self.mantissa_bits)


ENCODINGS: Registry[FeatureEncoding] = Registry("feature encoding")


@ENCODINGS.register
class Float32(FeatureEncoding):
    name = "float32"
    dtype = "float32"
    mantissa_bits = 23


@ENCODINGS.register
class Float16(FeatureEncoding):
    name = "float16"
    dtype = "float16"
    mantissa_bits = 10


@ENCODINGS.register
class NormalizedInt8(FeatureEncoding):
    """Each pixel's feature vector divided by its L2 norm over channels, as the paper's loss
    normalises it, then quantised with the fixed scale 127: components lie in [-1, 1], so the
    step is 1/127 everywhere, and no scale has to be stored per chunk."""

    name = "normalized-int8"
    dtype = "int8"
    mantissa_bits = 0
    normalized = True
    scale = 1 / 127
    error_kind = "absolute"

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        unit = normalize_pixels(features.float(), dim=-3)
        return torch.round(unit * 127).clamp_(-127, 127).to(torch.int8)

    def expected(self, features: np.ndarray) -> np.ndarray:
        return normalize_pixels(torch.from_numpy(features), dim=-3).numpy()

    def errors(self, decoded: np.ndarray, expected: np.ndarray) -> np.ndarray:
        """Absolute: every component lies in [-1, 1]."""
        return np.abs(decoded - expected)

    def tolerance(self, keep_bits: int | None) -> float:
        """One quantisation step: rounding moves a value by at most half a step; the other half
        leaves room for the recomputation's own float error (another device, other kernels)."""
        return self.scale


def encoding_named(name: str) -> FeatureEncoding:
    return ENCODINGS[name]()


def array_encoding(encoding: FeatureEncoding, name: str) -> FeatureEncoding:
    """How a store in `encoding` keeps its array `name`: the teacher's prediction in float16
    where the encoding would drop its magnitudes (output distillation compares them), every
    other array in the encoding itself."""
    return Float16() if name == PREDICTION and encoding.normalized else encoding

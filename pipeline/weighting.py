"""Task-loss weighting methods: one registered class each.

A method turns the batch's task losses, plus an unweighted extra term (the distillation loss),
into gradients. Methods that look at gradients get the shared representation and the shared
parameters through `StepContext`.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pipeline.registry import Registry


@dataclass
class StepContext:
    """What gradient-based methods may need about the batch's forward pass."""

    representation: torch.Tensor  # the last shared feature, part of the graph
    shared_parameters: list[nn.Parameter]


class Weighting(ABC):
    name: ClassVar[str]

    def __init__(self, tasks: list[str]) -> None:
        self.tasks = list(tasks)

    def parameters(self) -> list[nn.Parameter]:
        """Learnt parameters of the method itself, optimised with the network."""
        return []

    @abstractmethod
    def backward(
        self, losses: dict[str, torch.Tensor], extra: torch.Tensor | None, context: StepContext
    ) -> dict[str, float]:
        """Compute the gradients of the weighted losses plus `extra`; return each task's weight."""

    def end_epoch(self, mean_losses: dict[str, float]) -> None:  # noqa: B027 (optional hook)
        """Called after each epoch with the mean of each task's loss; most methods ignore it."""


WEIGHTINGS: Registry[Weighting] = Registry("weighting method")


@WEIGHTINGS.register
class EqualWeights(Weighting):
    """EW: the plain sum of the task losses."""

    name: ClassVar[str] = "ew"

    def backward(self, losses, extra, context):
        total = sum(losses.values())
        if extra is not None:
            total = total + extra
        total.backward()
        return dict.fromkeys(losses, 1.0)

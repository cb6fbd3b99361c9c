"""Task-loss weighting methods: one registered class each.

A method turns the batch's task losses, plus an unweighted extra term (the distillation loss),
into gradients. Methods that look at gradients get the shared representation and the shared
parameters through `StepContext`.
"""

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from pipeline.registry import Registry
from schemas.params import StudentParams


@dataclass
class StepContext:
    """What gradient-based methods may need about the batch's forward pass."""

    representation: torch.Tensor  # the last shared feature, part of the graph
    last_shared: list[nn.Parameter]  # the parameters of the last shared layer
    # What backward() is called on instead of a loss: the loss times fp16's loss scale (as every
    # gradient the optimizers see must be), or the loss itself.
    scale: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda loss: loss)


class Weighting(ABC):
    name: ClassVar[str]

    def __init__(self, tasks: list[str], config: StudentParams) -> None:
        self.tasks = list(tasks)

    def parameters(self) -> list[nn.Parameter]:
        """Learnt parameters of the method itself, optimised with the network."""
        return []

    @abstractmethod
    def backward(
        self, losses: dict[str, torch.Tensor], extra: torch.Tensor | None, context: StepContext
    ) -> dict[str, float]:
        """Compute the gradients of the weighted losses plus `extra`; return each task's weight."""

    @staticmethod
    def _backward(total: torch.Tensor, extra: torch.Tensor | None, context: StepContext) -> None:
        """Gradients of the weighted total plus the unweighted extra term."""
        context.scale(total if extra is None else total + extra).backward()

    def end_epoch(self, mean_losses: dict[str, float]) -> None:  # noqa: B027 (optional hook)
        """Called after each epoch with the mean of each task's loss; most methods ignore it."""


WEIGHTINGS: Registry[Weighting] = Registry("weighting method")


@WEIGHTINGS.register
class EqualWeights(Weighting):
    """EW: the plain sum of the task losses."""

    name: ClassVar[str] = "ew"

    def backward(self, losses, extra, context):
        self._backward(sum(losses.values()), extra, context)
        return dict.fromkeys(losses, 1.0)


@WEIGHTINGS.register
class DynamicWeightAverage(Weighting):
    """DWA (Liu et al., 2019): w_k = K softmax_k(r_k / T), where r_k is task k's mean loss in the
    last epoch over the one before; equal weights for the first two epochs."""

    name: ClassVar[str] = "dwa"
    temperature: ClassVar[float] = 2.0

    def __init__(self, tasks: list[str], config: StudentParams) -> None:
        super().__init__(tasks, config)
        self.history: list[dict[str, float]] = []

    def weights(self) -> dict[str, float]:
        if len(self.history) < 2:
            return dict.fromkeys(self.tasks, 1.0)
        last, before = self.history[-1], self.history[-2]
        ratios = torch.tensor([last[t] / before[t] for t in self.tasks], dtype=torch.float64)
        weights = len(self.tasks) * torch.softmax(ratios / self.temperature, dim=0)
        return dict(zip(self.tasks, weights.tolist(), strict=True))

    def backward(self, losses, extra, context):
        weights = self.weights()
        total = sum(weights[t] * losses[t] for t in self.tasks)
        self._backward(total, extra, context)
        return weights

    def end_epoch(self, mean_losses):
        self.history.append(dict(mean_losses))


@WEIGHTINGS.register
class UncertaintyWeighting(Weighting):
    """UW (Kendall et al., 2018) in LibMTL's form: sum_k L_k / (2 exp(s_k)) + s_k / 2, with
    learnt log-variances s_k starting at -0.5."""

    name: ClassVar[str] = "uw"

    def __init__(self, tasks: list[str], config: StudentParams) -> None:
        super().__init__(tasks, config)
        self.log_variance = nn.Parameter(torch.full((len(tasks),), -0.5))

    def parameters(self):
        return [self.log_variance]

    def backward(self, losses, extra, context):
        s = self.log_variance
        stacked = torch.stack([losses[t] for t in self.tasks])
        total = (stacked / (2 * s.exp()) + s / 2).sum()
        self._backward(total, extra, context)
        weights = (1 / (2 * s.detach().exp())).tolist()
        return dict(zip(self.tasks, weights, strict=True))


@WEIGHTINGS.register
class GradNorm(Weighting):
    """GradNorm (Chen et al., 2018): task weights w = K softmax(theta), learnt so that each task's
    gradient norm at the last shared layer, G_k = |grad_W w_k L_k|, moves towards
    mean(G) r_k^alpha, where r_k is task k's loss relative to its first, over the mean of those:
    a task that trains slower gets a larger weight. The network is trained on sum_k w_k L_k.
    Each task's gradient is reduced to its norm before the next is computed."""

    name: ClassVar[str] = "gradnorm"

    def __init__(self, tasks: list[str], config: StudentParams) -> None:
        super().__init__(tasks, config)
        self.alpha = config.gradnorm_alpha
        self.theta = nn.Parameter(torch.zeros(len(tasks)))
        self.initial: torch.Tensor | None = None

    def parameters(self):
        return [self.theta]

    def current_weights(self) -> torch.Tensor:
        return len(self.tasks) * torch.softmax(self.theta, dim=0)

    def backward(self, losses, extra, context):
        stacked = torch.stack([losses[t] for t in self.tasks])
        if self.initial is None:
            self.initial = stacked.detach().clone()
        norms = torch.stack([_gradient_norm(losses[t], context.last_shared) for t in self.tasks])
        weights = self.current_weights()
        weighted_norms = weights * norms
        relative = stacked.detach() / self.initial
        target = (weighted_norms.mean() * (relative / relative.mean()) ** self.alpha).detach()
        balance = (weighted_norms - target).abs().sum()
        (grad,) = torch.autograd.grad(balance, self.theta)
        self.theta.grad = context.scale(grad)  # unscaled again with every other gradient
        total = (weights.detach() * stacked).sum()
        self._backward(total, extra, context)
        return dict(zip(self.tasks, weights.detach().tolist(), strict=True))


def _gradient_norm(loss: torch.Tensor, parameters: list[nn.Parameter]) -> torch.Tensor:
    """|d loss / d parameters|, keeping the graph for the backward pass that follows."""
    grads = torch.autograd.grad(loss, parameters, retain_graph=True)
    return torch.sqrt(sum(g.pow(2).sum() for g in grads))


def min_norm_weights(gram: torch.Tensor) -> torch.Tensor:
    """The exact weights alpha on the simplex minimising |sum_k alpha_k g_k|^2, from the Gram
    matrix G_ij = g_i . g_j (the MGDA min-norm problem).

    The minimum of a convex quadratic on the simplex lies inside one of its faces; on the face of
    tasks S it solves G_SS alpha_S = lambda 1, sum alpha_S = 1 (lstsq, for singular G). Every face
    is tried (2^n - 1 of them for n tasks, a handful), and the feasible point of lowest norm kept.
    An iterative solver (Frank-Wolfe) stops short of this point on ill-conditioned gradients."""
    count = gram.shape[0]
    best, best_value = None, None
    for size in range(1, count + 1):
        for face in itertools.combinations(range(count), size):
            index = torch.tensor(face)
            kkt = torch.zeros(size + 1, size + 1, dtype=gram.dtype)
            kkt[:size, :size] = gram[index][:, index]
            kkt[:size, size] = -1.0
            kkt[size, :size] = 1.0
            rhs = torch.zeros(size + 1, dtype=gram.dtype)
            rhs[size] = 1.0
            solution = torch.linalg.lstsq(kkt, rhs[:, None]).solution[:size, 0]
            if (solution < -1e-12).any() or not torch.isclose(solution.sum(), rhs[size]):
                continue
            alpha = torch.zeros(count, dtype=gram.dtype)
            alpha[index] = solution.clamp(min=0)
            alpha /= alpha.sum()
            value = alpha @ gram @ alpha
            if best_value is None or value < best_value:
                best, best_value = alpha, value
    return best


@WEIGHTINGS.register
class MGDA(Weighting):
    """MGDA-UB (Sener and Koltun, 2018): the weights of the min-norm point in the convex hull of the
    task gradients with respect to the shared representation (an upper bound of the shared
    parameters' problem, one backward pass per task through the heads only)."""

    name: ClassVar[str] = "mgda"

    def backward(self, losses, extra, context):
        representation = context.representation
        grads = [
            torch.autograd.grad(losses[t], representation, retain_graph=True)[0].flatten()
            for t in self.tasks
        ]
        stacked = torch.stack(grads).double()
        alpha = min_norm_weights(stacked @ stacked.T).float()
        del grads, stacked
        total = sum(alpha[k] * losses[t] for k, t in enumerate(self.tasks))
        self._backward(total, extra, context)
        return dict(zip(self.tasks, alpha.tolist(), strict=True))

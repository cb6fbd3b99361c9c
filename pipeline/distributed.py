"""Data-parallel training under `torchrun`: one process per device, DistributedDataParallel.

`torchrun --nproc-per-node N kdmtl train-student` starts N processes; each joins the process
group (NCCL between GPUs, gloo between CPUs), trains on its own share of the chunks with batches
of `batch_size / N`, and DistributedDataParallel averages the gradients, so that a step sees the
global batch. BatchNorm's statistics are taken over the global batch too (`SyncedBatchNorm`), so
a run of N processes computes what one process computes on the same global batches, to float
tolerance (`Replicas(N, None)` reproduces it in one process).
"""

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.errors import KdmtlError


@dataclass(frozen=True)
class Replicas:
    """How training is split over processes: `count` replicas, this process being `index`.

    `index` None runs every replica's share in this one process, step k training on the
    concatenation of every replica's batch k: a run of `count` processes reproduced on one
    device (with the stream read in the training process, `loader.num_workers` 0)."""

    count: int = 1
    index: int | None = 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes the outputs, the logs and the progress bars."""
        return self.index in (0, None)

    @property
    def distributed(self) -> bool:
        """Whether this process is one of several that communicate."""
        return self.count > 1 and self.index is not None

    def batch_size(self, global_batch: int, key: str) -> int:
        """Each replica's share of a global batch of `global_batch` (`key` names its param)."""
        if global_batch % self.count:
            raise KdmtlError(
                f"{key} is {global_batch}, which {self.count} processes cannot share equally: "
                f"set it to a multiple of {self.count} (each process trains on "
                f"{key} / {self.count} samples per step)"
            )
        return global_batch // self.count

    @property
    def evaluating(self) -> "Replicas":
        """How evaluation is split: each process its own share under data-parallel training,
        the whole split in one process otherwise (reproducing several included)."""
        return self if self.distributed else SINGLE


SINGLE = Replicas()  # a run of one process


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def process_device(device: torch.device) -> torch.device:
    """One GPU per process under torchrun: `cuda` becomes `cuda:LOCAL_RANK`."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@contextmanager
def process_group(device: torch.device) -> Iterator[Replicas]:
    """The replicas of this run: under torchrun, joins the process group for the command's
    length (NCCL on GPUs, gloo on CPUs); else a single replica."""
    if not launched_by_torchrun():
        yield SINGLE
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Replicas(dist.get_world_size(), dist.get_rank())
    finally:
        dist.destroy_process_group()


class _SumOverProcesses(torch.autograd.Function):
    """The sum of a tensor over the processes, differentiable: each process's input gets the sum
    of every process's output gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


class SyncedBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch: every process's
    per-channel sums are all-reduced, differentiably, so the gradients are the global batch's
    too. torch's own SyncBatchNorm runs only on GPUs; this one runs wherever torch.distributed
    does, so the CPU tests cover the path that GPUs take. Two passes (mean, then the squared
    deviations) keep the variance as exact as BatchNorm's own. In eval mode it is BatchNorm2d;
    its state dict is BatchNorm2d's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = getattr(self, "group", None)
        if not (self.training and group is not None):
            return super().forward(input)
        x = input.float()
        axes = (0, 2, 3)
        count = x.new_tensor([x.numel() / x.shape[1]])
        totals = _SumOverProcesses.apply(torch.cat([x.sum(axes), count]), group)
        count = totals[-1]
        mean = totals[:-1] / count
        centred = x - mean[None, :, None, None]
        variance = _SumOverProcesses.apply(centred.square().sum(axes), group) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum
                if momentum is None:  # a cumulative average (read back only then: it syncs)
                    momentum = 1.0 / self.num_batches_tracked.item()
                unbiased = variance * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(unbiased, momentum)
        out = centred * torch.rsqrt(variance + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out.to(input.dtype)


def synced_batch_norm(module: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """`module` with every BatchNorm2d made a SyncedBatchNorm over `group`, in place (the same
    parameters and buffers)."""
    for child in module.modules():
        if type(child) is nn.BatchNorm2d:
            child.__class__ = SyncedBatchNorm
            child.group = group
    return module


def data_parallel(module: nn.Module, replicas: Replicas, device: torch.device) -> nn.Module:
    """The module that training calls: itself, or wrapped in DistributedDataParallel (which
    makes every replica start from rank 0's parameters and averages the gradients)."""
    if not replicas.distributed:
        return module
    # BatchNorm's sums travel in a process group of their own: collectives of one group must be
    # issued in the same order by every process, and DistributedDataParallel issues its gradient
    # reductions whenever a bucket of gradients is ready, amid the backward pass.
    synced_batch_norm(module, dist.new_group())
    return DistributedDataParallel(
        module,
        device_ids=[device] if device.type == "cuda" else None,
        broadcast_buffers=False,  # the synced statistics are the same on every replica
    )


def batch_means(
    terms: dict[str, tuple[torch.Tensor, torch.Tensor]], replicas: Replicas
) -> dict[str, torch.Tensor]:
    """Each loss's mean over the valid pixels of the global batch, from this process's (sum,
    count) per loss: DistributedDataParallel averages the gradients of `count` processes, so each
    divides its sum by the global count over `count`. Then a step is the same as one process's on
    the whole batch, however the valid pixels fall. One all-reduce carries every loss's count."""
    if not replicas.distributed:
        return {name: total / count.clamp(min=1) for name, (total, count) in terms.items()}
    everywhere = torch.stack([count.detach() for _, count in terms.values()]).clone()
    dist.all_reduce(everywhere)
    scale = replicas.count / everywhere.clamp(min=1)
    return {name: total * scale[i] for i, (name, (total, _)) in enumerate(terms.items())}


def average(values: dict[str, float], replicas: Replicas) -> dict[str, float]:
    """Each value's mean over the replicas (a logged epoch mean, say)."""
    if not replicas.distributed or not values:
        return values
    names = sorted(values)
    stacked = torch.tensor([values[name] for name in names], dtype=torch.float64)
    dist.all_reduce(stacked)
    return dict(zip(names, (stacked / replicas.count).tolist(), strict=True))


def gather(value: object, replicas: Replicas) -> list[object]:
    """Every replica's `value`, in rank order (pickled: small objects such as metric meters)."""
    if not replicas.distributed:
        return [value]
    values: list[object] = [None] * replicas.count
    dist.all_gather_object(values, value)
    return values


def merged(meters: dict, replicas: Replicas) -> dict:
    """Metric meters of every replica's share of a split, merged into the meters of the split."""
    if not replicas.distributed:
        return meters
    shares = gather(meters, replicas)
    return {
        name: functools.reduce(lambda a, b: a.merge(b), [share[name] for share in shares])
        for name in meters
    }

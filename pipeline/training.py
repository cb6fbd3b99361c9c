"""Training and evaluation loops shared by teachers and the student."""

import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from pipeline.distributed import SINGLE, Replicas, average, merged
from pipeline.errors import KdmtlError
from pipeline.models import Architecture
from pipeline.precision import Precision
from pipeline.progress import progress_bar
from pipeline.tasks import Task
from schemas.params import TrainParams

Batch = dict[str, torch.Tensor]
Metrics = dict[str, dict[str, float]]  # task -> metric -> value


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdmtlError(f"device is {name!r} but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


def make_optimizer(
    parameters: Iterable[nn.Parameter], config: TrainParams
) -> torch.optim.Optimizer:
    return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainParams
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch."""
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


@torch.no_grad()
def evaluate(
    model: Architecture,
    tasks: dict[str, Task],
    batches: Iterable[Batch],
    device: torch.device,
    precision: Precision | None = None,
    replicas: Replicas = SINGLE,
) -> Metrics:
    """Every task's metrics over all batches, with the model in eval mode: the forward pass in
    `precision`, the metrics from float32 outputs. With several replicas, each evaluates its own
    batches and the metrics are those of all of them together."""
    precision = precision or Precision("fp32", device)
    was_training = model.training
    model.eval()
    meters = {name: task.meter() for name, task in tasks.items()}
    for batch in batches:
        batch = to_device(batch, device)
        with precision.autocast():
            predictions = model(batch["image"]).predictions
        for name, task in tasks.items():
            meters[name].update(task.predict(predictions[name].float()), batch[name])
    model.train(was_training)
    meters = merged(meters, replicas)
    return {name: meter.compute() for name, meter in meters.items()}


@torch.no_grad()
def evaluate_constant(
    tasks: dict[str, Task],
    outputs: dict[str, torch.Tensor],
    batches: Iterable[Batch],
    replicas: Replicas = SINGLE,
) -> Metrics:
    """Metrics of a prediction that is the same raw output [C, 1, 1] at every pixel."""
    meters = {name: task.meter() for name, task in tasks.items()}
    for batch in batches:
        batch_size, _, height, width = batch["image"].shape
        for name, task in tasks.items():
            output = outputs[name].expand(batch_size, -1, height, width)
            meters[name].update(task.predict(output), batch[name])
    meters = merged(meters, replicas)
    return {name: meter.compute() for name, meter in meters.items()}


@dataclass
class History:
    """One row of logged values per epoch."""

    rows: list[dict[str, float]] = field(default_factory=list)


def fit(
    step: Callable[[Batch], dict[str, float]],
    batches: Iterable[Batch],
    epochs: int,
    optimizers: list[torch.optim.Optimizer],
    schedulers: list[torch.optim.lr_scheduler.LRScheduler],
    device: torch.device,
    end_of_epoch: Callable[[dict[str, float]], dict[str, float]],
    description: str,
    progress: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    precision: Precision | None = None,
    replicas: Replicas = SINGLE,
    steps: Callable[[int], int | None] = lambda _epoch: None,
) -> History:
    """Run `epochs` passes over `batches`.

    `step(batch)` computes the losses of one batch and their gradients (of the losses scaled by
    `precision.scale`) and returns the values to log; `fit` zeroes the gradients before and steps
    the optimizers after it. `steps(epoch)` (0-based) may cap an epoch's batches: replicas of a
    data-parallel run all stop there, so that each runs the same number of steps.
    `end_of_epoch(row)` gets the epoch's row of mean logged values (the means over every
    replica) and returns further values for it (a test metric, say). Each epoch shows a progress
    bar with the running means and ends with a one-line summary: the sum of the task losses and
    the values `end_of_epoch` added; then `on_epoch(row)` gets the whole row (to log it while
    training runs). Only the main replica shows anything.
    """
    precision = precision or Precision("fp32", device)
    shown = progress and replicas.is_main
    history = History()
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        sums: dict[str, float] = {}
        count = 0
        cap = steps(epoch - 1)
        if cap == 0:
            raise KdmtlError(
                f"{description}: with {replicas.count} processes, a process's share of the "
                "chunks holds less than one batch (batch_size / processes samples) in epoch "
                f"{epoch}: lower the batch size, data.chunk_size, or the number of processes"
            )
        epoch_batches = batches if cap is None else itertools.islice(batches, cap)
        with progress_bar(
            epoch_batches,
            shown,
            desc=f"{description} {epoch}/{epochs}",
            leave=False,
            total=cap,
        ) as bar:
            for batch in bar:
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                values = step(to_device(batch, device))
                if not all(math.isfinite(v) for v in values.values()):
                    raise KdmtlError(
                        f"{description}: the loss became {values} in epoch {epoch}; "
                        "lower the learning rate"
                        + (" or use precision bf16 or fp32" if precision.name == "fp16" else "")
                    )
                precision.step(optimizers)
                count += 1
                for name, value in values.items():
                    sums[name] = sums.get(name, 0.0) + value
                bar.set_postfix(
                    {name: f"{total / count:.4f}" for name, total in sums.items()}, refresh=False
                )
        for scheduler in schedulers:
            scheduler.step()
        means = average({name: total / max(count, 1) for name, total in sums.items()}, replicas)
        row = {"epoch": epoch} | means
        added = end_of_epoch(row)
        row |= added
        history.rows.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if not replicas.is_main:
            continue
        # One short line: the task losses' sum and what end_of_epoch adds; every logged value is
        # in the history (the curves), not on this line.
        loss = sum(v for k, v in row.items() if k == "loss" or k.startswith("loss_"))
        summary = ", ".join([f"loss {loss:.4f}", *(f"{k} {v:.4f}" for k, v in added.items())])
        seconds = time.perf_counter() - started
        tqdm.write(f"{description} epoch {epoch}/{epochs}: {summary} ({seconds:.1f} s)")
    return history

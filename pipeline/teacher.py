"""Training of one single-task teacher."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.distributed import SINGLE, Replicas, batch_means, data_parallel
from pipeline.models import Architecture, build_model
from pipeline.precision import Precision
from pipeline.store.prepared import PreparedSplit, PreparedStore
from pipeline.store.stream import ChunkStream, make_loader
from pipeline.tasks import make_tasks
from pipeline.training import (
    Batch,
    Metrics,
    evaluate,
    evaluate_constant,
    fit,
    make_optimizer,
    make_scheduler,
)
from schemas.params import LoaderParams, ModelParams, TrainParams


@dataclass
class TeacherResult:
    model: Architecture
    history: list[dict[str, float]]
    test_metrics: dict[str, float]
    baseline_metrics: dict[str, float]


def train_teacher(
    store: PreparedStore,
    task_name: str,
    model_params: ModelParams,
    train: TrainParams,
    loader: LoaderParams,
    seed: int,
    device: torch.device,
    progress: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    replicas: Replicas = SINGLE,
) -> TeacherResult:
    """Train a one-head network on `task_name` and evaluate it, and the trivial baseline, on test.

    The returned model is the last epoch's: nothing is chosen by looking at the test split.
    With several `replicas` (data-parallel processes), this process trains on its share of each
    global batch of `train.batch_size` and evaluates its share of the test split.
    """
    replicas.batch_size(train.batch_size, "teacher.batch_size")  # refused unless it splits
    task = make_tasks([task_name], store.manifest.num_classes)[task_name]
    precision = Precision.for_device(train.precision, device)
    torch.manual_seed(seed)
    model = build_model(model_params.arch, model_params.filters, {task_name: task.channels})
    model.to(device).train()
    trained = data_parallel(model, replicas, device)
    pin = device.type == "cuda"
    train_stream = ChunkStream(
        PreparedSplit(store, "train", [task_name]),
        train.batch_size,
        shuffle=True,
        seed=seed,
        buffer_chunks=loader.buffer_chunks,
        drop_last=replicas.count > 1,  # every replica runs the same number of full steps
        pin_memory=pin,
        replicas=replicas,
    )
    test_stream = ChunkStream(
        PreparedSplit(store, "test", [task_name]),
        train.batch_size,
        shuffle=False,
        pin_memory=pin,
        replicas=replicas.evaluating,
    )
    test_batches = make_loader(test_stream, num_workers=0)
    optimizer = make_optimizer(model.parameters(), train)

    def step(batch: Batch) -> dict[str, float]:
        with precision.autocast():
            output = trained(batch["image"]).predictions[task_name]
        terms = {task_name: task.loss_terms(output.float(), batch[task_name])}
        loss = batch_means(terms, replicas)[task_name]
        precision.scale(loss).backward()
        return {"loss": loss.item()}

    last: Metrics = {}

    def end_of_epoch(_row: dict[str, float]) -> dict[str, float]:
        last.update(evaluate(model, {task_name: task}, test_batches, device, precision, replicas))
        return {f"test_{task.main_metric}": last[task_name][task.main_metric]}

    history = fit(
        step,
        make_loader(train_stream, loader.num_workers),
        train.epochs,
        [optimizer],
        [make_scheduler(optimizer, train)],
        device,
        end_of_epoch,
        description=f"teacher {task_name}",
        progress=progress,
        on_epoch=on_epoch,
        precision=precision,
        replicas=replicas,
        steps=lambda epoch: train_stream.steps(epoch, loader.num_workers),
    )
    baseline = task.baseline_output(store.dask("train", task_name))
    baseline_metrics = evaluate_constant(
        {task_name: task}, {task_name: baseline}, test_batches, replicas
    )
    return TeacherResult(model, history.rows, last[task_name], baseline_metrics[task_name])

"""Data-parallel training under torchrun (gloo on the CPU): the chunk shares of the replicas, and
2-process extraction and training against one process on the same global batches."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import BIN, TINY_PARAMS, curve, kdmtl, write_params

from pipeline.checkpoints import load_student, load_teacher
from pipeline.distill import PaperKD
from pipeline.distributed import Replicas, batch_means, data_parallel
from pipeline.errors import KdmtlError
from pipeline.models import build_model
from pipeline.store.features import FeatureStore
from pipeline.store.prepared import PreparedSplit, open_prepared
from pipeline.store.stream import ChunkStream, make_loader
from pipeline.student import TrainedModules, refuse_local_gradient_weighting, train_student
from pipeline.tasks import make_tasks
from pipeline.teacher import train_teacher
from pipeline.training import evaluate
from pipeline.weighting import WEIGHTINGS, StepContext
from schemas.params import LoaderParams, ModelParams, StudentParams, TrainParams

CPU = torch.device("cpu")
TASKS = ["semseg", "depth", "normal"]


@pytest.fixture
def prepared_tiny(project: Path):
    """12 training samples in chunks of 4."""
    assert kdmtl("prepare").exit_code == 0
    return open_prepared(project / "data/prepared.zarr")


class Numbered:
    """A ChunkSource of `size` samples whose values are their indices."""

    def __init__(self, size: int, chunk_size: int) -> None:
        self.size, self.chunk_size = size, chunk_size

    def __len__(self) -> int:
        return self.size

    def read_chunk(self, chunk: int, epoch: int = 0) -> dict[str, np.ndarray]:
        start = chunk * self.chunk_size
        return {"index": np.arange(start, min(start + self.chunk_size, self.size))}


def replica_batches(source: Numbered, replicas: Replicas, epoch: int) -> list[list[int]]:
    stream = ChunkStream(source, 8, True, 3, buffer_chunks=2, drop_last=True, replicas=replicas)
    stream.epoch = epoch
    return [batch["index"].tolist() for batch in stream]


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_replicas_take_every_other_chunk_and_run_the_same_steps(epoch: int):
    source = Numbered(43, 4)  # 11 chunks, the last of 3 samples
    stream = ChunkStream(source, 8, True, seed=3, drop_last=True, replicas=Replicas(2, 0))
    order = stream.chunk_order(epoch)
    steps = stream.steps(epoch)
    shares = []
    for index in (0, 1):
        batches = replica_batches(source, Replicas(2, index), epoch)
        assert all(len(batch) == 4 for batch in batches)  # batch_size / 2 each
        assert len(batches) >= steps
        taken = {i for batch in batches for i in batch}
        share = {i for c in order[index::2] for i in range(c * 4, min(c * 4 + 4, 43))}
        assert taken <= share and len(share) - len(taken) < 4
        shares.append(taken)
    assert not shares[0] & shares[1]
    counts = [len(shares[0]) // 4, len(shares[1]) // 4]
    assert steps == min(counts)
    # One process reproducing both: batch k is replica 0's batch k, then replica 1's.
    together = replica_batches(source, Replicas(2, None), epoch)
    alone = [replica_batches(source, Replicas(2, i), epoch) for i in (0, 1)]
    assert together == [a + b for a, b in zip(*alone, strict=False)]
    assert len(together) == steps


def test_steps_count_what_each_reader_process_yields():
    source = Numbered(40, 4)  # 10 chunks: 5 per replica, split 3 + 2 between 2 workers
    stream = ChunkStream(source, 8, True, drop_last=True, replicas=Replicas(2, 0))
    assert stream.steps(0, num_workers=0) == 20 // 4
    assert stream.steps(0, num_workers=2) == 12 // 4 + 8 // 4
    assert ChunkStream(source, 8, True).steps(0) is None  # one process: no cap


def test_a_share_smaller_than_a_batch_is_refused(prepared_tiny):
    loader = LoaderParams(resident="off")
    with pytest.raises(KdmtlError, match="a process's share of the chunks holds less than one"):
        train_teacher(prepared_tiny, "depth", ModelParams(filters=[4, 8]),
                      TrainParams(epochs=1, batch_size=16), loader, 0, CPU, progress=False,
                      replicas=Replicas(2, None))  # fmt: skip


def test_a_global_batch_must_split_evenly():
    with pytest.raises(KdmtlError, match=r"student\.batch_size is 5, which 2 processes cannot"):
        Replicas(2, 1).batch_size(5, "student.batch_size")
    assert Replicas(4, 0).batch_size(8, "student.batch_size") == 2


@pytest.mark.parametrize("name", ["gradnorm", "mgda"])
def test_weightings_of_local_gradients_are_refused_with_several_processes(name: str):
    with pytest.raises(KdmtlError, match="use ew, dwa or uw"):
        refuse_local_gradient_weighting(name, Replicas(2, 0))
    refuse_local_gradient_weighting(name, Replicas())  # one process: fine
    refuse_local_gradient_weighting("uw", Replicas(2, 0))


def student_gradients(replicas: Replicas) -> dict[str, torch.Tensor]:
    """The gradients of one kd step (UW weighting) on this replica's share of a fixed batch of 4,
    whose depth targets have invalid pixels in one half only; the whole batch without replicas."""
    generator = torch.Generator().manual_seed(7)
    images = torch.rand(4, 3, 16, 24, generator=generator)
    targets = {
        "semseg": torch.randint(-1, 5, (4, 16, 24), generator=generator),
        "depth": torch.rand(4, 1, 16, 24, generator=generator) + 0.5,
        "normal": torch.nn.functional.normalize(torch.randn(4, 3, 16, 24, generator=generator)),
    }
    targets["depth"][:2, :, :10] = 0  # invalid: the two replicas have unequal valid counts
    tasks = make_tasks(TASKS, 5)
    teacher = {"bottleneck": torch.randn(4, 6, 4, 6, generator=generator)}
    teacher["decoder"] = torch.randn(4, 3, 16, 24, generator=generator)
    rows = (
        slice(None) if replicas.index is None else slice(2 * replicas.index, 2 * replicas.index + 2)
    )
    torch.manual_seed(0)
    model = build_model("segnet", [4, 8], {name: task.channels for name, task in tasks.items()})
    distiller = PaperKD(
        model.feature_channels(),
        {t: {"bottleneck": 6, "decoder": 3} for t in TASKS},
        {t: 1.0 for t in TASKS},
    )
    weighting = WEIGHTINGS["uw"](TASKS, StudentParams())
    trained = TrainedModules(model, distiller, weighting)
    wrapped = data_parallel(trained, replicas, CPU)  # alive until after backward: it reduces
    output = wrapped(images[rows])
    terms = {
        name: task.loss_terms(output.predictions[name], targets[name][rows])
        for name, task in tasks.items()
    }
    losses = batch_means(terms, replicas)

    student = {task: output.features_of(task) for task in TASKS}
    extra, _ = distiller(student, {t: {n: f[rows] for n, f in teacher.items()} for t in TASKS})
    context = StepContext(output.features["decoder"], model.last_shared_layer())
    weighting.backward(losses, extra, context)
    return {name: parameter.grad.clone() for name, parameter in trained.named_parameters()}


def replica_step(rank: int, world: int, folder: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=world
    )
    try:
        torch.save(student_gradients(Replicas(world, rank)), folder / f"gradients{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_step_of_two_processes_has_the_gradients_of_one_on_the_whole_batch(tmp_path: Path):
    """The exact check: SyncedBatchNorm, the losses over the global batch's valid pixels and
    DistributedDataParallel give one process's gradients (before any optimiser step, where
    rounding differences have not yet been amplified)."""
    torch.multiprocessing.spawn(replica_step, args=(2, tmp_path), nprocs=2)
    whole = student_gradients(Replicas(2, None))
    for rank in (0, 1):
        shared = torch.load(tmp_path / f"gradients{rank}.pt", weights_only=True)
        assert shared.keys() == whole.keys()
        for name, gradient in whole.items():
            # Relative to the largest of the tensor: BatchNorm's backward subtracts nearly equal
            # sums, so single elements carry float32 rounding of the whole tensor's scale.
            error = (shared[name] - gradient).abs().max() / gradient.abs().max().clamp(min=1e-2)
            assert error < 1e-3, (name, error)


PARAMS = TINY_PARAMS | {
    "data": TINY_PARAMS["data"] | {"num_train": 16, "num_test": 8},
    "teacher": {"epochs": 2, "batch_size": 4},
    "features": {"shard_chunks": 1},
    "student": {"epochs": 1, "batch_size": 4, "weighting": "uw"},
}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 kdmtl ARGS` on the CPU, in the current folder."""
    environment = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python"]
    run = subprocess.run(
        [*command, str(BIN / "kdmtl"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def whole_split_metrics(model: torch.nn.Module, prepared, tasks: list[str]) -> dict:
    """The test metrics of `model` evaluated in this one process."""
    stream = ChunkStream(PreparedSplit(prepared, "test", tasks), 4, False)
    named = make_tasks(tasks, prepared.manifest.num_classes)
    return evaluate(model, named, make_loader(stream, 0), CPU)


# Two runs that add in another order (other processes, other threads) round differently, and
# training amplifies it: the convolution biases before BatchNorm have no gradient in exact
# arithmetic, only rounding noise, which Adam scales to whole steps, and kd's adaptors train with
# Adam at a learning rate of 0.1. Over these runs a teacher's losses agree to 1e-7, a kd
# student's to 1e-4 (one step's gradients are compared exactly above); the metrics of these
# barely trained networks, which count pixels that flip class or threshold, are not compared
# across runs but with the same checkpoint evaluated in one process.
LOSSES = 1e-3


def test_two_processes_extract_and_train_as_one_process_on_the_same_batches(project: Path):
    write_params(project, PARAMS)
    assert kdmtl("prepare").exit_code == 0
    for task in ("depth", "normal"):
        assert kdmtl("train-teacher", "--teacher", task).exit_code == 0
        assert kdmtl("extract-features", "--teacher", task).exit_code == 0
    torchrun("train-teacher", "--teacher", "semseg")
    run = torchrun("extract-features", "--teacher", "semseg")
    assert "the store is complete" in run.stdout
    assert kdmtl("verify", "features/semseg.zarr").exit_code == 0
    torchrun("train-student")

    prepared = open_prepared(project / "data/prepared.zarr")
    # Evaluation over both processes' shares of the test split is that of the whole split.
    teacher_model, teacher_metadata = load_teacher(project / "models/teachers/semseg.pt")
    alone = whole_split_metrics(teacher_model, prepared, ["semseg"])["semseg"]
    assert teacher_metadata.test_metrics == pytest.approx(alone, rel=1e-6)
    student_model, student_metadata = load_student(project / "models/student.pt")
    alone = whole_split_metrics(student_model, prepared, TASKS)
    for task in TASKS:
        assert student_metadata.test_metrics[task] == pytest.approx(alone[task], rel=1e-6)
    assert (
        json.loads((project / "metrics/student/metrics.json").read_text())["test"]["depth"]
        == (student_metadata.test_metrics["depth"])
    )

    # The losses are one process's on the concatenation of both processes' batches.
    loader = LoaderParams(resident="off")
    together = Replicas(2, None)
    teacher = train_teacher(
        prepared,
        "semseg",
        ModelParams(filters=[4, 8]),
        TrainParams(epochs=2, batch_size=4),
        loader,
        0,
        CPU,
        progress=False,
        replicas=together,
    )
    logged_curve = curve(project / "metrics/teachers/semseg", "train/loss")
    assert logged_curve == pytest.approx(
        {r["epoch"]: r["loss"] for r in teacher.history}, rel=LOSSES
    )
    stores = {t: FeatureStore.open(project / f"features/{t}.zarr") for t in TASKS}
    student = train_student(
        prepared,
        TASKS,
        ModelParams(filters=[4, 8]),
        StudentParams(epochs=1, batch_size=4, weighting="uw"),
        loader,
        CPU,
        stores=stores,
        progress=False,
        replicas=together,
    )
    for name in ("loss_semseg", "loss_depth", "loss_normal", "dist_normal.decoder", "weight_depth"):
        logged_curve = curve(project / "metrics/student", f"train/{name}")
        expected = {row["epoch"]: row[name] for row in student.history}
        assert logged_curve == pytest.approx(expected, rel=LOSSES), name

"""Mixed precision on the CPU (torch's autocast runs bf16 and fp16 there): the forward passes in the
reduced type, losses and metrics in float32, fp16's loss scaling, and extraction's precision in
the store's manifest."""

from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TINY_PARAMS, kdmtl, write_params

from pipeline.checkpoints import load_teacher
from pipeline.errors import KdmtlError
from pipeline.precision import Precision, recomputation_tolerance, resolve_precision
from pipeline.store.features import FeatureStore
from pipeline.store.prepared import PreparedSplit, open_prepared
from pipeline.store.stream import ChunkStream, make_loader
from pipeline.student import train_student
from pipeline.tasks import make_tasks
from pipeline.teacher import train_teacher
from pipeline.training import evaluate
from pipeline.weighting import WEIGHTINGS, StepContext
from schemas.params import LoaderParams, ModelParams, StudentParams, TrainParams

CPU = torch.device("cpu")


@pytest.fixture
def convolution_types():
    """The dtypes of every Conv2d output while the test runs."""
    seen: Counter = Counter()

    def record(module, _inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            seen[output.dtype] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    yield seen
    handle.remove()


@pytest.fixture
def prepared(project: Path):
    assert kdmtl("prepare").exit_code == 0
    return open_prepared(project / "data/prepared.zarr")


def test_auto_is_fp32_on_a_cpu_and_names_are_checked():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(KdmtlError, match="'fp8' is not a precision; allowed: auto, fp32"):
        resolve_precision("fp8", CPU)
    assert recomputation_tolerance("fp32") == 0
    assert recomputation_tolerance("bf16") == 2.0**-5


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_a_teacher_trains_in_reduced_precision_with_float32_losses(
    prepared, convolution_types, name: str
):
    train = TrainParams(epochs=2, batch_size=4, precision=name)
    result = train_teacher(prepared, "depth", ModelParams(filters=[4, 8]), train,
                           LoaderParams(), 0, CPU, progress=False)  # fmt: skip
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
    assert convolution_types[dtype] > 0 and convolution_types[torch.float32] == 0
    losses = [row["loss"] for row in result.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0]
    # The weights stay float32: autocast changes the computation, not the parameters.
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    fp32 = train_teacher(prepared, "depth", ModelParams(filters=[4, 8]),
                         train.model_copy(update={"precision": "fp32"}), LoaderParams(), 0, CPU,
                         progress=False)  # fmt: skip
    assert result.history[0]["loss"] == pytest.approx(fp32.history[0]["loss"], rel=0.05)
    assert result.history[0]["loss"] != fp32.history[0]["loss"]


def test_metrics_are_float32_whatever_the_forward_pass(prepared):
    train = TrainParams(epochs=2, batch_size=4)
    model = train_teacher(prepared, "depth", ModelParams(filters=[4, 8]), train,
                          LoaderParams(), 0, CPU, progress=False).model  # fmt: skip
    tasks = make_tasks(["depth"], prepared.manifest.num_classes)
    stream = ChunkStream(PreparedSplit(prepared, "test", ["depth"]), 4, False)
    metrics = {
        name: evaluate(model, tasks, make_loader(stream, 0), CPU, Precision(name, CPU))["depth"]
        for name in ("fp32", "bf16")
    }
    assert metrics["bf16"] == pytest.approx(metrics["fp32"], rel=0.02)
    assert metrics["bf16"] != metrics["fp32"]


def test_fp16_scales_the_loss_and_trains_the_student_with_gradnorm(
    prepared, convolution_types, monkeypatch
):
    updates = []
    update = torch.amp.GradScaler.update
    monkeypatch.setattr(
        torch.amp.GradScaler, "update", lambda self, *a: updates.append(1) or update(self, *a)
    )
    config = StudentParams(epochs=2, batch_size=4, method="gradnorm", precision="fp16")
    tasks = ["semseg", "depth", "normal"]
    result = train_student(prepared, tasks, ModelParams(filters=[4, 8]), config, LoaderParams(),
                           CPU, progress=False)  # fmt: skip
    assert convolution_types[torch.float16] > 0
    assert len(updates) == 2 * 3  # one per step: 12 samples in batches of 4, 2 epochs
    for row in result.history:
        assert all(torch.isfinite(torch.tensor(list(row.values()))))
    assert sum(result.history[-1][f"weight_{t}"] for t in tasks) == pytest.approx(3.0)


def test_gradnorm_scales_its_own_gradient_as_the_network_s():
    """GradNorm sets its weights' gradient by hand: with fp16 it must carry the loss scale too,
    since the optimiser step divides every gradient by it."""
    tasks = ["semseg", "depth"]
    grads = {}
    for factor in (1.0, 1024.0):
        weighting = WEIGHTINGS["gradnorm"](tasks, StudentParams())
        shared = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        losses = {"semseg": (shared**2).sum(), "depth": (3 * shared).sum()}
        context = StepContext(shared, [shared], lambda loss, f=factor: loss * f)
        weighting.backward(losses, None, context)
        grads[factor] = (weighting.theta.grad.clone(), shared.grad.clone())
    assert torch.allclose(grads[1024.0][0], 1024 * grads[1.0][0])
    assert torch.allclose(grads[1024.0][1], 1024 * grads[1.0][1])


def test_extraction_records_its_precision_and_verify_recomputes_in_it(project: Path):
    params = TINY_PARAMS | {"features": {"precision": "bf16"}}
    write_params(project, params)
    assert kdmtl("prepare").exit_code == 0
    assert kdmtl("train-teacher", "--teacher", "depth").exit_code == 0
    assert kdmtl("extract-features", "--teacher", "depth").exit_code == 0
    store = FeatureStore.open(project / "features/depth.zarr")
    assert store.manifest.precision == "bf16"
    result = kdmtl("verify", "features/depth.zarr")
    assert result.exit_code == 0, result.output
    assert "(float16, bf16)" in result.output and "(tolerance 3.1e-02)" in result.output
    bf16_values = store.array("decoder")[:2]
    # Another precision is other content: the next extraction replaces the store.
    write_params(project, TINY_PARAMS | {"features": {"precision": "fp32"}})
    assert kdmtl("extract-features", "--teacher", "depth").exit_code == 0
    store = FeatureStore.open(project / "features/depth.zarr")
    assert store.manifest.precision == "fp32"
    fp32_values = store.array("decoder")[:2]
    assert (bf16_values != fp32_values).any()
    # Near, not close: where bf16 rounding makes a max-pool pick another pixel of a near tie,
    # SegNet's unpooling puts the value elsewhere (many near ties in a barely trained teacher:
    # 16 % of the mean magnitude here, against 2^-8 for bf16's own rounding).
    difference = abs(bf16_values.astype("f4") - fp32_values.astype("f4")).mean()
    assert difference < 0.25 * abs(fp32_values.astype("f4")).mean()
    teacher, _ = load_teacher(project / "models/teachers/depth.pt")
    assert next(teacher.parameters()).dtype == torch.float32

"""The distillation methods beside the paper's: `url` and the distillation of the teachers'
predictions (`student.kd_outputs`), their losses against hand-computed values, what the stores
must hold for them, and training with them."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import OUTPUT_PARAMS, curve, kdmtl, write_params

from pipeline.checkpoints import load_teacher
from pipeline.distill import DISTILLERS, OutputDistiller, PaperKD, UniversalRepresentations
from pipeline.errors import DataError, KdmtlError
from pipeline.models import build_model
from pipeline.store.features import FeatureStore
from pipeline.store.prepared import open_prepared
from pipeline.student import (
    adaptor_optimizer,
    build_distiller,
    distilled_arrays,
    train_student,
)
from pipeline.tasks import make_tasks
from schemas.features import ImportedTeacherRecord
from schemas.params import LoaderParams, ModelParams, StudentParams

TASKS = ["semseg", "depth", "normal"]
CPU = torch.device("cpu")
ALL_OUTPUTS = {"weights": {"semseg": 1.0, "depth": 0.5, "normal": 2.0}, "temperature": 2.0}


def pixel(*values: float) -> torch.Tensor:
    """One image of one pixel with these channels: [1, C, 1, 1]."""
    return torch.tensor(values, dtype=torch.float32)[None, :, None, None]


# The prediction distances, per task.


def test_segmentation_output_distance_is_the_kl_divergence_at_a_temperature():
    semseg = make_tasks(["semseg"], 2)["semseg"]
    student, teacher = pixel(0.0, 0.0), pixel(math.log(3), 0.0)
    # T = 1: the teacher's probabilities are (3/4, 1/4), the student's (1/2, 1/2).
    by_hand = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert semseg.output_distance(student, teacher, 1.0).item() == pytest.approx(by_hand, rel=1e-5)
    # T = 2 softens the teacher to sqrt(3) : 1, and the divergence is scaled by T^2.
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    by_hand = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    assert semseg.output_distance(student, teacher, 2.0).item() == pytest.approx(by_hand, rel=1e-5)
    # Averaged over pixels; logits that differ by a constant are the same distribution.
    two = torch.cat([student, teacher], dim=3), torch.cat([teacher + 5, teacher], dim=3)
    assert semseg.output_distance(*two, 1.0).item() == pytest.approx(
        0.5 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5)), rel=1e-5
    )


def test_depth_output_distance_is_l1_over_every_pixel():
    depth = make_tasks(["depth"], 2)["depth"]
    student = torch.tensor([[1.0, 2.0], [0.0, 4.0]])[None, None]
    teacher = torch.tensor([[1.5, 0.0], [0.0, 1.0]])[None, None]
    assert depth.output_distance(student, teacher, 3.0).item() == pytest.approx((0.5 + 2 + 3) / 4)


def test_normal_output_distance_is_one_minus_the_cosine_of_the_unit_vectors():
    normal = make_tasks(["normal"], 2)["normal"]
    assert normal.output_distance(pixel(5, 0, 0), pixel(0, 1, 0), 1.0).item() == pytest.approx(1)
    assert normal.output_distance(pixel(3, 4, 0), pixel(6, 8, 0), 1.0).item() == pytest.approx(0)
    assert normal.output_distance(pixel(1, 0, 0), pixel(-2, 0, 0), 1.0).item() == pytest.approx(2)
    student = torch.cat([pixel(1, 1, 0), pixel(0, 0, 1)], dim=2)
    teacher = torch.cat([pixel(1, 0, 0), pixel(0, 0, 1)], dim=2)
    assert normal.output_distance(student, teacher, 1.0).item() == pytest.approx(
        (1 - 1 / math.sqrt(2)) / 2, rel=1e-6
    )


def test_output_distiller_weights_each_task_and_leaves_out_weight_zero():
    tasks = make_tasks(TASKS, 3)
    distiller = OutputDistiller(tasks, {"semseg": 2.0, "depth": 0.5, "normal": 0.0}, 1.0)
    assert list(distiller.tasks) == ["semseg", "depth"]
    torch.manual_seed(0)
    student = {
        "semseg": torch.randn(2, 3, 4, 5, requires_grad=True),
        "depth": torch.randn(2, 1, 4, 5),
    }
    teacher = {
        "semseg": torch.randn(2, 3, 4, 5, requires_grad=True),
        "depth": torch.randn(2, 1, 4, 5),
    }
    total, distances = distiller(student, teacher)
    assert set(distances) == {"semseg.prediction", "depth.prediction"}
    kl = F.kl_div(
        F.log_softmax(student["semseg"], 1), F.softmax(teacher["semseg"], 1), reduction="none"
    )
    by_hand = 2.0 * kl.sum(1).mean() + 0.5 * (student["depth"] - teacher["depth"]).abs().mean()
    assert total.item() == pytest.approx(by_hand.item(), rel=1e-5)
    total.backward()
    assert student["semseg"].grad is not None
    assert teacher["semseg"].grad is None  # the teacher is a constant


# url: both student taps matched to the teacher's last decoder feature.


def test_url_matches_both_taps_to_the_teacher_decoder_through_adaptors():
    url = UniversalRepresentations(
        {"bottleneck": 8, "decoder": 4}, {"depth": {"bottleneck": 16, "decoder": 6}}, {"depth": 2}
    )
    assert url.teacher_features() == ["decoder"] and PaperKD.teacher_features() == [
        "bottleneck",
        "decoder",
    ]
    adaptors = url.adaptors["depth"]
    assert tuple(adaptors["bottleneck"].weight.shape) == (6, 8, 1, 1)
    assert tuple(adaptors["decoder"].weight.shape) == (6, 4, 1, 1)
    assert adaptors["bottleneck"].bias is None and adaptors["decoder"].bias is None
    torch.manual_seed(0)
    student = {"bottleneck": torch.randn(2, 8, 2, 3), "decoder": torch.randn(2, 4, 8, 12)}
    teacher = torch.randn(2, 6, 8, 12)
    total, distances = url({"depth": student}, {"depth": {"decoder": teacher}})

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / (x.pow(2).sum(1, keepdim=True) + 1e-6).sqrt()

    def by_hand(adapted: torch.Tensor) -> float:
        return (unit(adapted) - unit(teacher)).pow(2).sum(1).mean().item()

    with torch.no_grad():
        upsampled = F.interpolate(
            adaptors["bottleneck"](student["bottleneck"]), (8, 12), mode="bilinear"
        )
        decoder = adaptors["decoder"](student["decoder"])
    assert distances["depth.bottleneck"].item() == pytest.approx(by_hand(upsampled), rel=1e-5)
    assert distances["depth.decoder"].item() == pytest.approx(by_hand(decoder), rel=1e-5)
    expected = 2 * (by_hand(upsampled) + by_hand(decoder))
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_each_method_has_its_adaptor_optimiser():
    params = StudentParams(epochs=4)
    student, teacher = {"bottleneck": 4, "decoder": 2}, {"depth": {"bottleneck": 4, "decoder": 2}}
    kd = PaperKD(student, teacher, {"depth": 1.0})
    url = UniversalRepresentations(student, teacher, {"depth": 1.0})
    optimizer, schedule = adaptor_optimizer(kd, params)
    assert optimizer.param_groups[0]["lr"] == 0.1 and schedule is None
    assert optimizer.param_groups[0]["weight_decay"] == 5e-4
    optimizer, schedule = adaptor_optimizer(url, params)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    # The cosine over the student's 4 epochs from url's 0.01.
    assert rates == pytest.approx([0.01 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])
    optimizer, _ = adaptor_optimizer(url, StudentParams(adaptor_lr=0.5))
    assert optimizer.param_groups[0]["lr"] == 0.5
    assert DISTILLERS["kd"] is PaperKD and DISTILLERS["url"] is UniversalRepresentations


# What the stores hold for them.


def test_stores_hold_the_teachers_predictions(outputs: Path):
    prepared = open_prepared(outputs / "data/prepared.zarr")
    for task, channels in (("semseg", 7), ("depth", 1), ("normal", 3)):
        store = FeatureStore.open(outputs / f"features/{task}.zarr")
        info = store.manifest.features["prediction"]
        assert info.shape == [12, 1, channels, 16, 24] and info.dtype == "float16"
        teacher, _ = load_teacher(outputs / f"models/teachers/{task}.pt")
        # Without augmentation the cached view is the image itself.
        images = torch.from_numpy(prepared.array("train", "image")[:4].astype(np.float32) / 255)
        with torch.no_grad():
            expected = teacher.eval()(images).predictions[task]
        stored = torch.from_numpy(store.array("prediction")[:4, 0].astype(np.float32))
        torch.testing.assert_close(stored, expected, rtol=2e-3, atol=2e-3)


def test_a_store_without_predictions_is_refused_when_they_are_distilled(outputs: Path):
    stores = {t: FeatureStore.open(outputs / f"features/{t}.zarr") for t in TASKS}
    manifest = stores["depth"].manifest
    features = {k: v for k, v in manifest.features.items() if k != "prediction"}
    old = manifest.model_copy(update={"features": features})  # as an older kdmtl made it
    stores["depth"] = FeatureStore(stores["depth"].path, old)
    model = build_model("segnet", [4, 8], {t: 1 for t in TASKS})
    build_distiller(model, StudentParams(), stores, None, CPU)  # kd reads features only
    with_outputs = StudentParams(method="url", kd_outputs=ALL_OUTPUTS)
    assert distilled_arrays(UniversalRepresentations, with_outputs, TASKS)["depth"] == [
        "decoder",
        "prediction",
    ]
    with pytest.raises(DataError) as refused:
        build_distiller(model, with_outputs, stores, None, CPU)
    refusal = (
        f"feature store {stores['depth'].path} holds no depth teacher predictions, which "
        "student.kd_outputs.weights.depth asks to distil; "
    )
    assert str(refused.value) == refusal + (
        "it was made before kdmtl cached predictions: run `kdmtl extract-features --teacher "
        "depth`, or set that weight to 0"
    )
    # An imported teacher without `output`: extracting again would not help.
    imported = ImportedTeacherRecord(
        file="teacher.py",
        factory="build",
        weights="teacher.safetensors",
        taps={"bottleneck": "encoder", "decoder": "decoder"},
        output=None,
        file_sha256="0" * 64,
        weights_sha256="1" * 64,
    )
    stores["depth"] = FeatureStore(
        stores["depth"].path, old.model_copy(update={"imported": imported})
    )
    with pytest.raises(DataError) as refused:
        build_distiller(model, with_outputs, stores, None, CPU)
    assert str(refused.value) == refusal + (
        "its imported teacher has no output: set one in teacher.imported.depth, then run "
        "`kdmtl extract-features --teacher depth`, or set that weight to 0"
    )
    weights = {"semseg": 1.0, "depth": 0.0, "normal": 1.0}  # not depth's: its store will do
    build_distiller(model, StudentParams(kd_outputs={"weights": weights}), stores, None, CPU)


# Training with them.


def test_url_with_output_distillation_trains_from_the_stores(outputs: Path):
    student = OUTPUT_PARAMS.get("student", {}) | {"method": "url", "kd_outputs": ALL_OUTPUTS}
    write_params(outputs, OUTPUT_PARAMS | {"student": student})
    result = kdmtl("train-student")
    assert result.exit_code == 0, result.output
    assert "wrote models/student.pt (url)" in result.output
    logged = outputs / "metrics/student"
    for name in ("semseg.bottleneck", "normal.decoder", "semseg.prediction", "depth.prediction"):
        assert curve(logged, f"train/dist_{name}")[1] > 0


def test_output_distillation_needs_a_distillation_method(outputs: Path):
    student = {"method": "ew", "kd_outputs": ALL_OUTPUTS}
    write_params(outputs, OUTPUT_PARAMS | {"student": student})
    result = kdmtl("train-student")
    assert result.exit_code == 2
    assert (
        "student.kd_outputs distils the teachers' predictions beside their features: it needs "
        "student.method kd or url, not ew (or set its weights to 0)"
    ) in result.output
    # The library refuses it the same way, for callers that pass params of their own.
    prepared = open_prepared(outputs / "data/prepared.zarr")
    student = StudentParams(method="ew", kd_outputs=ALL_OUTPUTS)
    with pytest.raises(KdmtlError, match=r"needs student\.method kd or url, not ew"):
        train_student(prepared, ["semseg", "depth"], ModelParams(), student, LoaderParams(), CPU)
    write_params(outputs, OUTPUT_PARAMS | {"student": {"kd_outputs": {"weights": {"sky": 1}}}})
    result = kdmtl("train-student")
    assert result.exit_code == 2 and "'sky' is not a task" in result.output


@pytest.mark.parametrize(
    "student, message",
    [
        (
            {"method": "url", "kd_weights": {"semseg": 1, "depth": 1}},
            "student.kd_weights has no weight for task 'normal'",
        ),
        (
            {"kd_outputs": {"weights": {"normal": 1.0}}},
            "student.kd_outputs.weights: 'normal' is not one of tasks (semseg, depth); set its "
            "weight to 0, or add it to tasks",
        ),
        ({"kd_outputs": {"temperature": 0}}, "student.kd_outputs.temperature"),
        ({"kd_outputs": {"weights": {"depth": -1.0}}}, "student.kd_outputs.weights.depth"),
    ],
)
def test_distillation_params_are_checked(outputs: Path, student: dict, message: str):
    tasks = ["semseg", "depth"] if "kd_outputs" in student else ["semseg", "depth", "normal"]
    teacher = OUTPUT_PARAMS["teacher"] | {"trained": tasks}
    write_params(outputs, OUTPUT_PARAMS | {"tasks": tasks, "teacher": teacher, "student": student})
    result = kdmtl("train-student")
    assert result.exit_code == 2, result.output
    assert message in result.output

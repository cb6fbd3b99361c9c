"""The student: the distillation loss, the joined feature stream, stale-store refusal, training
without teachers, online/cached equivalence, and evaluation."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PARAMS, curve, curve_names, kdmtl, write_params
from PIL import Image

import pipeline.store.resident
import pipeline.student
from pipeline.augment import apply_view
from pipeline.checkpoints import load_teacher, save_checkpoint
from pipeline.distill import PaperKD, feature_distance, normalize_pixels
from pipeline.errors import DataError, KdmtlError
from pipeline.files import sha256_file
from pipeline.metrics import delta_mtl
from pipeline.models import build_model
from pipeline.store.features import FeatureStore
from pipeline.store.prepared import open_prepared
from pipeline.store.resident import ResidentChunks, available_memory
from pipeline.store.stream import ChunkStream
from pipeline.student import (
    StudentSource,
    build_distiller,
    choose_residency,
    refuse_unusable_stores,
)
from pipeline.tasks import TASKS, higher_is_better, make_tasks
from schemas.checkpoint import EvaluationHeadline, EvaluationReport, StudentMetadata
from schemas.params import LoaderParams, StudentParams

TASK_NAMES = ["semseg", "depth", "normal"]
CPU = torch.device("cpu")
PARAMS = TINY_PARAMS | {
    "features": {"shard_chunks": 1},
    "student": {"epochs": 1, "batch_size": 4},
}


def build(folder: Path, params: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_params(folder, params)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert kdmtl("prepare").exit_code == 0
        for task in TASK_NAMES:
            assert kdmtl("train-teacher", "--teacher", task).exit_code == 0
            assert kdmtl("extract-features", "--teacher", task).exit_code == 0
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Prepared data, three teachers and their feature stores, made once for the module."""
    folder = tmp_path_factory.mktemp("trained")
    build(folder, PARAMS)
    return folder


@pytest.fixture
def project(trained_copy: Path) -> Path:
    return trained_copy


def stores_of(project: Path) -> dict[str, FeatureStore]:
    return {t: FeatureStore.open(project / "features" / f"{t}.zarr") for t in TASK_NAMES}


# The distillation loss.


def normalise(feature: torch.Tensor) -> torch.Tensor:
    return feature / (feature.pow(2).sum(1, keepdim=True) + 1e-6).sqrt()


def test_normalised_distance_is_two_minus_two_cosine():
    student = torch.tensor([3.0, 4.0, 0.0])[None, :, None, None]
    teacher = torch.tensor([0.0, 4.0, 3.0])[None, :, None, None]
    cosine = 16 / 25
    assert feature_distance(student, teacher).item() == pytest.approx(2 - 2 * cosine, rel=1e-5)
    assert feature_distance(student, 7 * student).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_distance(student, -student).item() == pytest.approx(4.0, rel=1e-5)


def test_distance_averages_over_batch_and_pixels_and_resizes_the_student():
    student = torch.randn(2, 4, 3, 5)
    teacher = torch.randn(2, 4, 3, 5)
    by_hand = ((normalise(student) - normalise(teacher)) ** 2).sum(1).mean()
    assert feature_distance(student, teacher).item() == pytest.approx(by_hand.item(), rel=1e-5)
    small = torch.randn(2, 4, 3, 5, requires_grad=True)
    distance = feature_distance(small, torch.randn(2, 4, 6, 10))  # teacher at twice the size
    distance.backward()
    assert small.grad is not None and torch.isfinite(small.grad).all()


def test_a_normalised_teacher_is_used_as_it_is():
    """A normalized-int8 store holds the teacher's normalisation, tiny norms included (a pixel
    whose feature norm is near sqrt(1e-6) has a normalised norm well below 1)."""
    student, teacher = torch.randn(2, 6, 3, 5), torch.randn(2, 6, 3, 5)
    teacher[0, :, 0, 0] = 1e-4
    stored = normalize_pixels(teacher)
    assert stored[0, :, 0, 0].norm() < 0.5
    assert feature_distance(student, stored, teacher_normalized=True).item() == pytest.approx(
        feature_distance(student, teacher).item(), rel=1e-6
    )
    # Normalising the stored vectors again would have moved the tiny one to unit length.
    assert feature_distance(student, stored).item() != pytest.approx(
        feature_distance(student, teacher).item(), rel=1e-4
    )


def test_distiller_adaptors_and_weighted_total():
    distiller = PaperKD(
        {"bottleneck": 8, "decoder": 4},
        {"depth": {"bottleneck": 16, "decoder": 4}, "normal": {"bottleneck": 16, "decoder": 4}},
        {"depth": 1.0, "normal": 2.0, "semseg": 1.0},
    )
    adaptor = distiller.adaptors["depth"]["bottleneck"]
    assert adaptor.kernel_size == (1, 1) and adaptor.bias is None
    assert tuple(adaptor.weight.shape) == (16, 8, 1, 1)
    student = {"bottleneck": torch.randn(2, 8, 2, 3), "decoder": torch.randn(2, 4, 8, 12)}
    teachers = {
        task: {"bottleneck": torch.randn(2, 16, 2, 3), "decoder": torch.randn(2, 4, 8, 12)}
        for task in ("depth", "normal")
    }
    total, distances = distiller({"depth": student, "normal": student}, teachers)
    assert set(distances) == {
        "depth.bottleneck",
        "depth.decoder",
        "normal.bottleneck",
        "normal.decoder",
    }
    expected = distances["depth.bottleneck"] + distances["depth.decoder"]
    expected = expected + 2 * (distances["normal.bottleneck"] + distances["normal.decoder"])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    teachers["depth"]["decoder"].requires_grad_()
    total.backward()
    assert adaptor.weight.grad is not None
    assert teachers["depth"]["decoder"].grad is None  # teachers are constants


@pytest.mark.parametrize("source, missing", [("cache", "feature stores"), ("online", "teacher")])
def test_distilling_without_its_source_is_refused(source: str, missing: str):
    model = build_model("segnet", [4, 8], {"depth": 1})
    config = StudentParams(kd_source=source)
    with pytest.raises(ValueError, match=missing):
        build_distiller(model, config, None, None, torch.device("cpu"))


# The joined stream.


def test_the_stream_joins_features_to_samples_by_id(project: Path):
    prepared = open_prepared(project / "data/prepared.zarr")
    stores = stores_of(project)
    source = StudentSource(prepared, TASK_NAMES, stores, augment=False, seed=0)
    block = source.read_chunk(1)
    np.testing.assert_array_equal(block["index"], np.arange(4, 8))
    for task, store in stores.items():
        for name in ("bottleneck", "decoder"):
            np.testing.assert_array_equal(block[f"{task}.{name}"], store.array(name)[4:8, 0])
    np.testing.assert_array_equal(
        block["image"], prepared.array("train", "image")[4:8] / np.float32(255)
    )


def epochs_of_batches(source: StudentSource, epochs: int = 2) -> list[list[dict]]:
    stream = ChunkStream(source, batch_size=3, shuffle=True, seed=5, buffer_chunks=2)
    return [[{k: v.clone() for k, v in batch.items()} for batch in stream] for _ in range(epochs)]


@pytest.mark.parametrize("held_on", [None, CPU], ids=["ram", "device"])
@pytest.mark.parametrize("distil", [True, False], ids=["cached-features", "augmented"])
def test_resident_and_streamed_batches_are_identical(project: Path, distil: bool, held_on):
    """Each epoch the same batches whether the data is decoded once (the features as numpy
    arrays, or as tensors on the training device) or read every epoch; the augmented case draws
    fresh views per epoch, which must not be held in memory."""
    prepared = open_prepared(project / "data/prepared.zarr")
    stores = stores_of(project) if distil else None
    streamed = StudentSource(prepared, TASK_NAMES, stores, augment=not distil, seed=0)
    resident = StudentSource(prepared, TASK_NAMES, stores, augment=not distil, seed=0)
    resident.hold_in_memory(held_on, progress=False)
    assert isinstance(resident.split, ResidentChunks)
    if distil:
        held = resident.features["depth"].read_chunk(0)["decoder"]
        assert isinstance(held, torch.Tensor if held_on else np.ndarray)
    first, second = epochs_of_batches(streamed), epochs_of_batches(resident)
    assert len(first[0]) == 4 and first[0][0]["image"].shape == (3, 3, 16, 24)
    if distil:
        assert "depth.decoder" in first[0][0]
    else:
        assert not torch.equal(first[0][0]["image"], first[1][0]["image"])  # views per epoch
    for streamed_epoch, resident_epoch in zip(first, second, strict=True):
        for a, b in zip(streamed_epoch, resident_epoch, strict=True):
            assert a.keys() == b.keys()
            for name in a:
                assert torch.equal(a[name], b[name]), name


def test_residency_follows_the_mode_and_the_budget(project: Path, capsys):
    prepared = open_prepared(project / "data/prepared.zarr")
    source = StudentSource(prepared, TASK_NAMES, stores_of(project), augment=False, seed=0)
    split, features = source.decoded_nbytes()
    chunk = sum(v.nbytes for v in source.split.read_chunk(0).values())
    ids_and_views = sum(
        store.array(name)[:4].nbytes
        for store in stores_of(project).values()
        for name in ("sample_id", "views")
    )
    assert split == (chunk + ids_and_views) * 3  # held in host memory: 3 chunks of 4 samples
    decoder = stores_of(project)["depth"].array("decoder")
    assert features > 3 * decoder.nbytes  # two features of three teachers
    needed = split + features
    loader = LoaderParams(memory_budget_gb=needed * 1.001 / 1e9)
    assert choose_residency(source, loader, CPU) == "ram"  # auto picks ram on a CPU
    assert "student: training data decoded once and read from memory" in capsys.readouterr().out
    assert choose_residency(source, loader.model_copy(update={"resident": "device"}), CPU) == (
        "device"
    )
    assert "teachers' features held on cpu (0.00 GB decoded, budget" in capsys.readouterr().out
    without_features = StudentSource(prepared, TASK_NAMES, None, augment=False, seed=0)
    device = loader.model_copy(update={"resident": "device"})
    assert choose_residency(without_features, device, CPU) == "ram"  # nothing for the device
    assert "decoded once and read from memory" in capsys.readouterr().out
    small = loader.model_copy(update={"memory_budget_gb": needed / 2e9})
    assert choose_residency(source, small, CPU) == "off"
    assert "streamed from disk every epoch (0.00 GB decoded, budget" in capsys.readouterr().out
    off = loader.model_copy(update={"resident": "off"})
    assert choose_residency(source, off, CPU) == "off"
    assert "(loader.resident off)" in capsys.readouterr().out
    for mode in ("ram", "device"):
        with pytest.raises(KdmtlError, match=rf"loader.resident is {mode}, but the training data"):
            choose_residency(source, small.model_copy(update={"resident": mode}), CPU)
    # Reader processes split the chunks between them, which changes the batches: never resident.
    workers = loader.model_copy(update={"num_workers": 2})
    assert choose_residency(source, workers, CPU) == "off"
    assert "by reader processes (loader.num_workers > 0" in capsys.readouterr().out
    for mode in ("ram", "device"):
        with pytest.raises(KdmtlError, match=rf"{mode}, which reads in the training process: set"):
            choose_residency(source, workers.model_copy(update={"resident": mode}), CPU)


def test_the_free_memory_is_what_a_container_limit_leaves(tmp_path: Path, monkeypatch):
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    monkeypatch.setattr(pipeline.store.resident, "CGROUP_FILES", [(str(limit), str(usage))])
    machine = available_memory()  # no such files: the machine's available memory
    assert machine > 10**6
    limit.write_text("1000000\n")
    usage.write_text("400000\n")
    assert available_memory() == 600_000
    usage.write_text("2000000\n")
    assert available_memory() == 0
    limit.write_text("max\n")  # no limit
    assert available_memory() > 600_000


@pytest.mark.parametrize("held_on", [None, CPU], ids=["streamed", "device"])
def test_cached_views_are_replayed_on_the_input_and_targets(tmp_path: Path, held_on):
    folder = tmp_path / "views"
    data = PARAMS["data"] | {"augment": True}
    build(folder, PARAMS | {"data": data, "features": {"shard_chunks": 1, "views": 3}})
    prepared = open_prepared(folder / "data/prepared.zarr")
    stores = stores_of(folder)
    source = StudentSource(prepared, TASK_NAMES, stores, augment=True, seed=0)
    if held_on is not None:
        source.hold_in_memory(held_on, progress=False)
    picks = []
    for epoch in range(3):
        block = source.read_chunk(2, epoch)
        views = stores["depth"].array("views")[8:12]
        decoder = stores["depth"].array("decoder")[8:12]
        for row, index in enumerate(range(8, 12)):
            matches = [
                v for v in range(3) if np.array_equal(block["depth.decoder"][row], decoder[row, v])
            ]
            assert matches, "the features come from one of the sample's stored views"
            view = views[row, matches[0]]
            image = torch.from_numpy(prepared.array("train", "image")[index] / np.float32(255))
            targets = {
                t: torch.from_numpy(prepared.array("train", t)[index].astype(np.int64))
                if t == "semseg"
                else torch.from_numpy(prepared.array("train", t)[index])
                for t in TASK_NAMES
            }
            expected_image, expected = apply_view(view, image, targets)
            np.testing.assert_array_equal(block["image"][row], expected_image.numpy())
            for t in TASK_NAMES:
                np.testing.assert_array_equal(block[t][row], expected[t].numpy())
            picks.append(matches[0])
    assert len(set(picks)) > 1  # the chosen view changes between samples and epochs


def test_mismatched_sample_ids_are_refused(project: Path):
    prepared = open_prepared(project / "data/prepared.zarr")
    stores = stores_of(project)
    stores["depth"].array("sample_id")[0:4] = np.arange(4)[::-1]
    source = StudentSource(prepared, TASK_NAMES, stores, augment=False, seed=0)
    with pytest.raises(DataError, match="the depth feature store's sample ids do not match"):
        source.read_chunk(0)


# Training.


def test_train_student_writes_checkpoint_and_curves(project: Path):
    result = kdmtl("train-student")
    assert result.exit_code == 0, result.output
    assert "wrote models/student.pt (kd): test semseg mIoU" in result.output
    assert "student: training data decoded once and read from memory (0.00 GB decoded" in (
        result.output
    )
    state = torch.load(project / "models/student.pt", weights_only=True)
    metadata = StudentMetadata.model_validate(state["metadata"])
    assert metadata.tasks == TASK_NAMES
    assert metadata.model.heads == {"semseg": 7, "depth": 1, "normal": 3}
    assert set(metadata.distilled_from) == set(TASK_NAMES)
    log = project / "metrics/student"
    curves = curve_names(log)
    assert {f"train/loss_{t}" for t in TASK_NAMES} <= curves
    assert {"test/mIoU", "test/abs_err", "test/mean_angle"} <= curves
    assert {f"train/dist_{t}.{f}" for t in TASK_NAMES for f in ("bottleneck", "decoder")} <= curves
    assert list(curve(log, "train/loss_depth")) == [1]
    total = sum(curve(log, f"train/loss_{t}")[1] for t in TASK_NAMES)
    summary = json.loads((log / "metrics.json").read_text())
    assert summary["step"] == 1 and summary["test"]["semseg"] == metadata.test_metrics["semseg"]
    assert summary["test"]["mIoU"] == curve(log, "test/mIoU")[1]
    (line,) = [line for line in result.output.splitlines() if "student kd epoch 1/1:" in line]
    assert len(line) < 160, line
    assert line.startswith(f"student kd epoch 1/1: loss {total:.4f}, test_mIoU ")
    assert "dist_" not in line


def test_kd_from_the_cache_needs_no_teacher(project: Path, monkeypatch):
    shutil.rmtree(project / "models" / "teachers")
    built = []
    original = pipeline.student.build_model
    monkeypatch.setattr(pipeline.student, "build_model", lambda *a: built.append(a) or original(*a))
    result = kdmtl("train-student")
    assert result.exit_code == 0, result.output
    assert len(built) == 1  # the student only
    assert (project / "models/student.pt").is_file()


def test_ew_needs_no_feature_store(project: Path):
    shutil.rmtree(project / "features")
    write_params(project, PARAMS | {"student": PARAMS["student"] | {"method": "ew"}})
    result = kdmtl("train-student")
    assert result.exit_code == 0, result.output
    assert not any("dist_" in name for name in curve_names(project / "metrics/student"))


def test_a_stale_store_is_refused_naming_it(project: Path):
    teacher, metadata = load_teacher(project / "models/teachers/normal.pt")
    with torch.no_grad():
        next(teacher.parameters()).add_(1.0)
    save_checkpoint(project / "models/teachers/normal.pt", teacher, metadata)
    result = kdmtl("train-student")
    assert result.exit_code == 2
    assert "feature store features/normal.zarr cannot be used: teacher differs" in (result.output)
    assert "run `kdmtl extract-features --teacher normal`" in result.output
    assert not (project / "models/student.pt").exists()


def test_an_incomplete_store_is_refused(project: Path):
    shutil.rmtree(project / "features" / "depth.zarr")
    assert kdmtl("extract-features", "--teacher", "depth", "--shard-of", "0/3").exit_code == 0
    result = kdmtl("train-student")
    assert result.exit_code == 2
    assert "features/depth.zarr cannot be used: incomplete (1 of 3 shards written)" in result.output


def test_missing_stores_are_all_named_with_the_command_for_each(project: Path):
    shutil.rmtree(project / "features" / "semseg.zarr")
    shutil.rmtree(project / "features" / "normal.zarr")
    result = kdmtl("train-student")
    assert result.exit_code == 2
    assert (
        "no feature store for semseg, normal in features: run `kdmtl extract-features --teacher "
        "semseg`, `kdmtl extract-features --teacher normal` (or `dvc repro`)"
    ) in result.output


def test_online_and_cached_distillation_agree_on_the_same_batch(project: Path):
    prepared = open_prepared(project / "data/prepared.zarr")
    stores = stores_of(project)
    batch = StudentSource(prepared, TASK_NAMES, stores, augment=False, seed=0).read_chunk(0)
    images = torch.from_numpy(batch["image"])
    teachers = {t: load_teacher(project / f"models/teachers/{t}.pt")[0] for t in TASK_NAMES}
    torch.manual_seed(0)
    student = {"bottleneck": torch.randn(4, 8, 4, 6), "decoder": torch.randn(4, 4, 16, 24)}
    channels = {t: teachers[t].feature_channels() for t in TASK_NAMES}
    distiller = PaperKD({"bottleneck": 8, "decoder": 4}, channels, PARAMS_KD_WEIGHTS)
    cached = {
        t: {n: torch.from_numpy(batch[f"{t}.{n}"]) for n in ("bottleneck", "decoder")}
        for t in TASK_NAMES
    }
    with torch.no_grad():
        online = {t: teachers[t].distilled_features(images) for t in TASK_NAMES}
        per_task = dict.fromkeys(TASK_NAMES, student)
        cached_loss, cached_parts = distiller(per_task, cached)
        online_loss, online_parts = distiller(per_task, online)
    assert cached_loss.item() == pytest.approx(online_loss.item(), rel=2e-3)
    for key in cached_parts:
        assert cached_parts[key].item() == pytest.approx(online_parts[key].item(), rel=2e-3)
    assert cached_loss.item() != online_loss.item()  # float16 rounding is there, and small


PARAMS_KD_WEIGHTS = {"semseg": 1.0, "depth": 1.0, "normal": 2.0}
FEATURE_ARRAYS = {task: ["bottleneck", "decoder"] for task in TASK_NAMES}


def test_kd_from_normalized_int8_stores_agrees_with_online_teachers(project: Path):
    """The loss sees unit vectors: int8 stores of them give the online loss within a step."""
    int8 = PARAMS | {"features": {"shard_chunks": 1, "encoding": "normalized-int8"}}
    write_params(project, int8)
    for task in TASK_NAMES:
        assert kdmtl("extract-features", "--teacher", task).exit_code == 0
    prepared = open_prepared(project / "data/prepared.zarr")
    stores = stores_of(project)
    source = StudentSource(prepared, TASK_NAMES, stores, augment=False, seed=0)
    source.hold_in_memory(CPU, progress=False)  # int8 tensors, decoded per batch
    batch = next(iter(ChunkStream(source, batch_size=4, shuffle=False)))
    assert batch["depth.decoder"].dtype == torch.int8
    teachers = {t: load_teacher(project / f"models/teachers/{t}.pt")[0] for t in TASK_NAMES}
    torch.manual_seed(0)
    student = {"bottleneck": torch.randn(4, 8, 4, 6), "decoder": torch.randn(4, 4, 16, 24)}
    channels = {t: teachers[t].feature_channels() for t in TASK_NAMES}
    online_distiller = PaperKD({"bottleneck": 8, "decoder": 4}, channels, PARAMS_KD_WEIGHTS)
    distiller, _ = build_distiller(
        build_model("segnet", [4, 8], {"depth": 1}), StudentParams(), stores, None, CPU
    )
    assert distiller.normalized_teachers == set(TASK_NAMES)
    # The prediction keeps its magnitudes: float16 beside the int8 features.
    assert stores["depth"].manifest.features["prediction"].dtype == "float16"
    assert stores["depth"].encoding_of("prediction").name == "float16"
    distiller.load_state_dict(online_distiller.state_dict())  # the same adaptors
    cached = {
        t: {n: stores[t].encoding.decode(batch[f"{t}.{n}"]) for n in ("bottleneck", "decoder")}
        for t in TASK_NAMES
    }
    with torch.no_grad():
        online = {t: teachers[t].distilled_features(batch["image"]) for t in TASK_NAMES}
        per_task = dict.fromkeys(TASK_NAMES, student)
        cached_loss, _ = distiller(per_task, cached)
        online_loss, _ = online_distiller(per_task, online)
    assert cached_loss.item() == pytest.approx(online_loss.item(), rel=1e-2)
    result = kdmtl("train-student")
    assert result.exit_code == 0, result.output
    assert curve(project / "metrics/student", "train/dist_depth.decoder")[1] > 0


def test_a_loss_that_compares_magnitudes_refuses_normalized_stores(project: Path):
    class MagnitudeDistiller(PaperKD):
        uses_teacher_magnitudes = True

    plain, magnitudes = PaperKD, MagnitudeDistiller
    stores = stores_of(project)
    refuse_unusable_stores(stores, magnitudes, FEATURE_ARRAYS)  # float16 keeps magnitudes
    refuse_unusable_stores(stores, plain, FEATURE_ARRAYS)
    write_params(project, PARAMS | {"features": {"shard_chunks": 1, "encoding": "normalized-int8"}})
    assert kdmtl("extract-features", "--teacher", "depth").exit_code == 0
    refuse_unusable_stores(stores_of(project), plain, FEATURE_ARRAYS)
    with pytest.raises(DataError) as refused:
        refuse_unusable_stores(stores_of(project), magnitudes, FEATURE_ARRAYS)
    assert str(refused.value) == (
        f"feature store {project / 'features/depth.zarr'} holds normalized-int8 features, unit "
        "vectors without the teacher's magnitudes, which this distillation loss compares: set "
        "features.encoding: float16, then run `kdmtl extract-features --teacher depth`"
    )


def test_online_kd_trains_from_the_teachers(project: Path):
    shutil.rmtree(project / "features")
    outputs = {"weights": {"semseg": 1.0, "depth": 0.0, "normal": 0.0}, "temperature": 2.0}
    student = PARAMS["student"] | {"kd_source": "online", "kd_outputs": outputs}
    write_params(project, PARAMS | {"student": student})
    result = kdmtl("train-student")
    assert result.exit_code == 0, result.output
    assert curve(project / "metrics/student", "train/dist_depth.decoder")[1] > 0
    assert curve(project / "metrics/student", "train/dist_semseg.prediction")[1] > 0
    names = {p.stem for p in (project / "metrics/student/plots/metrics/train").iterdir()}
    assert "dist_depth.prediction" not in names  # weight 0: left out


def test_unknown_method_and_missing_kd_weight(project: Path):
    write_params(project, PARAMS | {"student": {"method": "magic"}})
    result = kdmtl("train-student")
    assert result.exit_code == 2
    assert "'magic' is not a method; allowed: kd, url, ew, dwa, uw, gradnorm, mgda" in result.output
    write_params(project, PARAMS | {"student": {"kd_weights": {"semseg": 1, "depth": 1}}})
    result = kdmtl("train-student")
    assert result.exit_code == 2
    assert "student.kd_weights has no weight for task 'normal'" in result.output


# Evaluation.


def test_evaluate_compares_the_student_with_its_teachers(project: Path):
    assert kdmtl("train-student").exit_code == 0
    result = kdmtl("evaluate")
    assert result.exit_code == 0, result.output
    assert "Delta_MTL of the student against its teachers:" in result.output
    report = EvaluationReport.model_validate_json(
        (project / "metrics/details/eval.json").read_text()
    )
    semseg = (
        f"  semseg: mIoU student {report.student['semseg']['mIoU']:.4f}, teacher "
        f"{report.teachers['semseg']['mIoU']:.4f}; task delta "
        f"{report.delta_per_task['semseg']:+.2f}%, the mean over its 2 metrics"
    )
    assert semseg in result.output.splitlines()
    tasks = make_tasks(TASK_NAMES, 7)
    assert set(report.student) == set(report.teachers) == set(TASK_NAMES)
    for task in TASK_NAMES:
        assert set(report.student[task]) == set(TASKS[task].directions)
        log = project / f"metrics/teachers/{task}/metrics.json"
        teacher_metrics = json.loads(log.read_text())
        for metric, value in report.teachers[task].items():
            assert value == pytest.approx(teacher_metrics["test"][metric], rel=1e-6)
    assert report.student_checkpoint == sha256_file(project / "models/student.pt")
    assert report.teacher_checkpoints == {
        t: sha256_file(project / f"models/teachers/{t}.pt") for t in TASK_NAMES
    }
    # The headline: what `dvc metrics show` lists.
    headline = json.loads((project / "metrics/eval.json").read_text())
    assert headline == {
        "delta_mtl": report.delta_mtl,
        "semseg": {
            "mIoU": report.student["semseg"]["mIoU"],
            "teacher_mIoU": report.teachers["semseg"]["mIoU"],
            "delta": report.delta_per_task["semseg"],
        },
        "depth": {
            "abs_err": report.student["depth"]["abs_err"],
            "teacher_abs_err": report.teachers["depth"]["abs_err"],
            "delta": report.delta_per_task["depth"],
        },
        "normal": {
            "mean_angle": report.student["normal"]["mean_angle"],
            "teacher_mean_angle": report.teachers["normal"]["mean_angle"],
            "delta": report.delta_per_task["normal"],
        },
    }
    assert EvaluationHeadline.model_validate(headline).model_dump() == headline
    recomputed = delta_mtl(report.teachers, report.student, higher_is_better(tasks))
    assert report.delta_mtl == pytest.approx(recomputed)
    assert report.delta_mtl == pytest.approx(sum(report.delta_per_task.values()) / 3)
    picture = Image.open(project / "plots/eval/predictions.png")
    assert picture.size[1] > 4 * 16 * 2  # four rows of doubled 16-pixel images, and titles
    assert picture.size[0] >= 10 * 24 * 2  # input and three columns per task


def test_evaluate_without_a_student_says_to_train_one(project: Path):
    result = kdmtl("evaluate")
    assert result.exit_code == 2
    assert "no student at models/student.pt: run `kdmtl train-student` first" in result.output


@pytest.mark.parametrize(
    ("method", "weighting"),
    [("dwa", "ew"), ("uw", "ew"), ("gradnorm", "ew"), ("mgda", "ew"), ("kd", "uw"), ("kd", "mgda")],
)
def test_every_method_trains_and_logs_its_weights(project: Path, method: str, weighting: str):
    student = PARAMS["student"] | {"method": method, "weighting": weighting, "epochs": 2}
    write_params(project, PARAMS | {"student": student})
    result = kdmtl("train-student")
    assert result.exit_code == 0, result.output
    curves = curve_names(project / "metrics/student")
    assert {"train/weight_semseg", "train/weight_depth", "train/weight_normal"} <= curves
    assert any(name.startswith("train/dist_") for name in curves) == (method == "kd")


def test_an_mtan_student_distils_its_attended_features(project: Path):
    student = PARAMS["student"] | {"model": {"arch": "mtan", "filters": [4, 8]}}
    write_params(project, PARAMS | {"student": student})
    result = kdmtl("train-student")
    assert result.exit_code == 0, result.output
    state = torch.load(project / "models/student.pt", weights_only=True)
    assert state["metadata"]["model"]["arch"] == "mtan"
    assert any(key.startswith("encoder_attention.normal") for key in state["state_dict"])
    assert kdmtl("evaluate").exit_code == 0


def test_mtan_teachers_cache_their_attended_features(project: Path):
    write_params(project, PARAMS | {"model": {"arch": "mtan", "filters": [4, 8]}})
    for task in TASK_NAMES:
        assert kdmtl("train-teacher", "--teacher", task).exit_code == 0
        assert kdmtl("extract-features", "--teacher", task).exit_code == 0
    teacher, _ = load_teacher(project / "models/teachers/depth.pt")
    image = open_prepared(project / "data/prepared.zarr").array("train", "image")[:1] / 255
    with torch.no_grad():
        attended = teacher(torch.from_numpy(image).float()).task_features["depth"]["decoder"]
    stored = FeatureStore.open(project / "features/depth.zarr").array("decoder")[0, 0]
    np.testing.assert_allclose(stored, attended[0].numpy(), rtol=2**-10, atol=1e-4)
    assert kdmtl("verify", "features/depth.zarr").exit_code == 0
    assert kdmtl("train-student").exit_code == 0

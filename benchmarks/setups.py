"""What the benchmarks run on: the default pipeline's outputs, or a paper-width setting built in a
temporary folder (the built-in scenes at 288x384, untrained SegNet teachers of the paper's width
[64, 128, 256, 512, 512], their feature stores). Untrained teachers cost the same to run as
trained ones; their features compress somewhat differently.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from pipeline.checkpoints import load_teacher
from pipeline.data.sources import make_source
from pipeline.models import Architecture, build_model
from pipeline.store.extract import extract, feature_shapes
from pipeline.store.features import FeatureStore, plan_manifest
from pipeline.store.prepared import PreparedStore, open_prepared, write_prepared
from pipeline.tasks import make_tasks
from schemas.params import DataParams, FeatureParams, ModelParams, Params

PAPER_FILTERS = [64, 128, 256, 512, 512]
PAPER_HEIGHT, PAPER_WIDTH = 288, 384
FAKE_SHA = "0" * 64
# The feature encodings compared: a label and the `features` params that differ from the default.
ENCODINGS = [
    ("float32", {"encoding": "float32"}),
    ("float16 (default)", {}),
    ("float16, BitRound 7 bits", {"keep_bits": 7}),
    ("float16, BitRound 5 bits", {"keep_bits": 5}),
    ("normalized-int8", {"encoding": "normalized-int8"}),
]


@dataclass
class Setting:
    """Prepared data, teachers and their feature stores, and the params to train a student."""

    params: Params
    prepared: PreparedStore
    teachers: dict[str, Architecture]
    stores: dict[str, FeatureStore]


def default_setting() -> Setting:
    """The committed pipeline's outputs, as params.yaml names them (run `dvc repro` first)."""
    params = Params.model_validate(yaml.safe_load(Path("params.yaml").read_text()))
    paths = params.paths
    teachers = {t: load_teacher(Path(paths.teachers) / f"{t}.pt")[0] for t in params.tasks}
    stores = {t: FeatureStore.open(Path(paths.features) / f"{t}.zarr") for t in params.tasks}
    return Setting(params, open_prepared(Path(paths.prepared)), teachers, stores)


def paper_setting(folder: Path, num_train: int, device: torch.device) -> Setting:
    """The paper's width and image size on `num_train` scenes (chunks of 4, batches of 2, as the
    paper trains), teachers seeded and untrained, stores extracted on `device`."""
    defaults = Params()
    params = defaults.model_copy(
        update={
            "data": defaults.data.model_copy(
                update={
                    "num_train": num_train,
                    "num_test": 4,
                    "height": PAPER_HEIGHT,
                    "width": PAPER_WIDTH,
                    "chunk_size": 4,
                }
            ),
            "model": ModelParams(filters=PAPER_FILTERS),
            "student": defaults.student.model_copy(update={"batch_size": 2}),
            "features": FeatureParams(batch_size=2),
        }
    )
    prepared = scenes(folder, params.data)
    tasks = make_tasks(params.tasks, prepared.manifest.num_classes)
    teachers, stores = {}, {}
    for seed, (task, spec) in enumerate(tasks.items()):
        torch.manual_seed(seed)
        teachers[task] = build_model("segnet", PAPER_FILTERS, {task: spec.channels}).eval()
        stores[task] = extract_store(teachers[task], prepared, folder, params.features, device)
    return Setting(params, prepared, teachers, stores)


def scenes(folder: Path, data: DataParams) -> PreparedStore:
    """The built-in scenes, prepared in `folder`."""
    write_prepared(make_source(data), folder / "prepared.zarr", data.chunk_size, progress=False)
    return open_prepared(folder / "prepared.zarr")


def extract_store(
    teacher: Architecture,
    prepared: PreparedStore,
    folder: Path,
    config: FeatureParams,
    device: torch.device,
    name: str | None = None,
) -> FeatureStore:
    """A complete feature store of `teacher` in `folder` (named after its task)."""
    task = next(iter(teacher.heads))
    teacher = teacher.to(device)
    shapes = feature_shapes(teacher, prepared.manifest.height, prepared.manifest.width)
    manifest = plan_manifest(task, FAKE_SHA, prepared, shapes, config, augment=False)
    store = FeatureStore.create(folder / f"{name or task}.zarr", manifest, config)
    shards = list(range(manifest.num_shards))
    extract(teacher, prepared, store, shards, config.batch_size, device, progress=False)
    store.mark_complete_if_all_done()
    return store

"""The multi-task student: its training data, joined with the teachers' cached features, and its
training loop (task losses weighted by a method, plus the distillation losses of `kd` or `url`)."""

import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.augment import IDENTITY, apply_views, random_view
from pipeline.distill import DISTILLERS, Distiller, OutputDistiller
from pipeline.distributed import SINGLE, Replicas, batch_means, data_parallel
from pipeline.errors import DataError, KdmtlError
from pipeline.models import FEATURES, PREDICTION, Architecture, ModelOutput, build_model
from pipeline.precision import Precision
from pipeline.store.features import SPLIT, FeatureChunks, FeatureStore
from pipeline.store.prepared import PreparedSplit, PreparedStore
from pipeline.store.resident import ResidentChunks, available_memory, chunk_nbytes, num_chunks
from pipeline.store.stream import Block, ChunkStream, make_loader
from pipeline.tasks import make_tasks
from pipeline.training import (
    Batch,
    Metrics,
    evaluate,
    fit,
    make_optimizer,
    make_scheduler,
)
from pipeline.weighting import WEIGHTINGS, StepContext, Weighting
from schemas.params import FeatureParams, LoaderParams, ModelParams, StudentParams


def check_stores(
    stores: dict[str, FeatureStore],
    prepared: PreparedStore,
    teacher_fingerprints: dict[str, str | None],
    config: FeatureParams,
    augment: bool,
) -> None:
    """Refuse a stale, incomplete, damaged or mismatched store, naming it and what is wrong:
    each store must hold its task's features of the current prepared data and teacher, stored
    and viewed as the features params say, with every shard file as written.

    A teacher is compared only where its fingerprint is known (its files exist): distilling from
    the cache needs no teacher."""
    for task, store in stores.items():
        manifest = store.manifest
        problems = store.stale_against(
            teacher_fingerprints[task] or manifest.teacher_fingerprint,
            prepared.manifest.fingerprint,
        )
        if manifest.task != task:
            problems.append(f"it holds the {manifest.task} teacher's features")
        if not manifest.complete:
            done = len(store.done_shards())
            problems.append(f"incomplete ({done} of {manifest.num_shards} shards written)")
        problems += store.layout_against(config, augment)
        if problems:
            raise DataError(
                f"feature store {store.path} cannot be used: {'; '.join(problems)}; "
                f"run `kdmtl extract-features --teacher {task}`"
            )
        store.check_intact()


class StudentSource:
    """The student's training samples as a ChunkSource: per chunk of the prepared grid, the image
    and targets joined by sample id with each teacher's cached arrays (`TASK.NAME`): those named
    in `arrays[TASK]`, its two feature taps by default.

    With cached views, each epoch picks one stored view per sample, and the image and targets are
    transformed by replaying that view's stored parameters, so they match the cached features.
    Without stores (no distillation, or online teachers), `augment` draws a fresh view per sample
    and epoch."""

    def __init__(
        self,
        prepared: PreparedStore,
        tasks: list[str],
        stores: dict[str, FeatureStore] | None,
        augment: bool,
        seed: int,
        arrays: dict[str, Sequence[str]] | None = None,
    ) -> None:
        self.split = PreparedSplit(prepared, SPLIT, tasks)
        self.tasks = list(tasks)
        stores = stores or {}
        self.arrays = {task: list((arrays or {}).get(task, FEATURES)) for task in stores}
        self.features = {
            task: FeatureChunks(store, self.arrays[task]) for task, store in stores.items()
        }
        self.augment = augment
        self.seed = seed
        self.chunk_size = self.split.chunk_size
        self.size = (prepared.manifest.height, prepared.manifest.width)

    def __len__(self) -> int:
        return len(self.split)

    def decoded_nbytes(self) -> tuple[int, int]:
        """Bytes that the decoded data kept in host memory (the training split, the stores'
        sample ids and views) and the teachers' features take (from their first chunks: every
        chunk but the last is as large)."""
        host = chunk_nbytes(self.split.read_chunk(0))
        features = 0
        for task, source in self.features.items():
            first = source.read_chunk(0)
            held = sum(first[name].nbytes for name in self.arrays[task])
            features += held
            host += chunk_nbytes(first) - held
        return host * num_chunks(self), features * num_chunks(self)

    def hold_in_memory(self, device: torch.device | None = None, progress: bool = True) -> None:
        """Decode the training split and every feature store once; later epochs read memory
        (the teachers' features on `device` when given). Views and augmentation are still drawn
        per epoch, so batches do not change."""
        self.split = ResidentChunks(self.split, "decoding the training split", progress=progress)
        self.features = {
            task: ResidentChunks(
                source,
                f"decoding the {task} features",
                device=device,
                on_device=self.arrays[task],
                progress=progress,
            )
            for task, source in self.features.items()
        }

    def read_chunk(self, chunk: int, epoch: int = 0) -> Block:
        block = self.split.read_chunk(chunk)
        count = len(block["index"])
        rng = np.random.default_rng([self.seed, epoch, chunk])
        views = None
        if self.features:
            cached = {task: source.read_chunk(chunk) for task, source in self.features.items()}
            stored_views = self._checked_views(cached, block["index"])
            if stored_views.shape[1] == 1:  # one view: no choice, and slicing copies nothing
                pick: slice | tuple = (slice(None), 0)
            else:
                pick = (np.arange(count), rng.integers(stored_views.shape[1], size=count))
            views = stored_views[pick]
            for task, values in cached.items():
                for name in self.arrays[task]:
                    block[f"{task}.{name}"] = values[name][pick]
        elif self.augment:
            views = np.stack([random_view(rng, *self.size) for _ in range(count)])
        if views is not None and (views != IDENTITY).any():
            image, targets = apply_views(
                views,
                torch.from_numpy(block["image"]),
                {task: torch.from_numpy(block[task]) for task in self.tasks},
            )
            block["image"] = image.numpy()
            block |= {task: target.numpy() for task, target in targets.items()}
        return block

    def _checked_views(self, cached: dict[str, dict], index: np.ndarray) -> np.ndarray:
        """The stored views, after checking every store covers these samples with these views."""
        first = next(iter(cached.values()))
        for task, values in cached.items():
            if not np.array_equal(values["sample_id"], index):
                raise DataError(f"the {task} feature store's sample ids do not match the data")
            if not np.array_equal(values["views"], first["views"]):
                raise DataError(f"the {task} feature store cached other views than the others")
        return first["views"]


def memory_budget(loader: LoaderParams, device: torch.device) -> int:
    """Bytes that resident data may take in the memory of `device` (host memory for a CPU):
    `loader.memory_budget_gb`, else half of what is free now (shared equally by the processes
    that torchrun started on this machine)."""
    if loader.memory_budget_gb is not None:
        return int(loader.memory_budget_gb * 1e9)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    # Under torchrun, the processes of this machine share its memory (each GPU is one's own).
    return available_memory() // 2 // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def choose_residency(
    source: StudentSource,
    loader: LoaderParams,
    device: torch.device,
    log: Callable[[str], None] = tqdm.write,
) -> Literal["device", "ram", "off"]:
    """Where the decoded training data is held, as `loader.resident` says, and says which, and
    why, in the log:

    - `device`: the teachers' features in the training device's memory, batched there, the
      images and targets in host memory; refused beyond the budget of either;
    - `ram`: all of it in host memory; refused beyond the budget;
    - `off`: streamed from disk every epoch;
    - `auto`: the first of `device` (on a GPU), `ram` and `off` that fits.

    Resident data is read in the training process, so only with `loader.num_workers` 0: reader
    processes split the chunks between them, which changes the batches, and they must not depend
    on the memory free."""
    if loader.resident == "off":
        log("student: training data streamed from disk every epoch (loader.resident off)")
        return "off"
    if loader.num_workers:
        if loader.resident != "auto":
            raise KdmtlError(
                f"loader.resident is {loader.resident}, which reads in the training process: "
                "set loader.num_workers to 0"
            )
        log(
            "student: training data streamed from disk every epoch by reader processes "
            "(loader.num_workers > 0; with 0, it would be held in memory when it fits)"
        )
        return "off"
    split, features = source.decoded_nbytes()
    host = memory_budget(loader, torch.device("cpu"))
    gb = 1e9
    fits = {"ram": split + features <= host}
    sizes = {"ram": f"{(split + features) / gb:.2f} GB decoded, budget {host / gb:.2f} GB"}
    if device.type == "cpu":  # the device's memory is the host's: the features as tensors there
        fits["device"], sizes["device"] = fits["ram"], sizes["ram"]
    else:
        on_device = memory_budget(loader, device)
        fits["device"] = features <= on_device and split <= host
        sizes["device"] = (
            f"features {features / gb:.2f} GB on {device}, budget {on_device / gb:.2f} GB; the "
            f"rest {split / gb:.2f} GB in host memory, budget {host / gb:.2f} GB"
        )
    candidates = ["device", "ram"] if device.type == "cuda" and features else ["ram"]
    if loader.resident in fits:
        mode = loader.resident
        if not fits[mode]:
            raise KdmtlError(
                f"loader.resident is {mode}, but the training data does not fit ({sizes[mode]}; "
                "the budget is loader.memory_budget_gb, or half the free memory): raise the "
                "budget, or set loader.resident to auto or off"
            )
        if not features:  # no teacher features for the device to hold
            mode = "ram"
    else:
        mode = next((m for m in candidates if fits[m]), "off")
    if mode == "off":
        weighed = "; ".join(sizes[m] for m in candidates)
        log(f"student: training data streamed from disk every epoch ({weighed})")
    elif mode == "ram":
        log(f"student: training data decoded once and read from memory ({sizes['ram']})")
    else:
        log(
            f"student: training data decoded once, teachers' features held on {device} "
            f"({sizes['device']})"
        )
    return mode


def distilled_arrays(
    method: type[Distiller], config: StudentParams, tasks: list[str]
) -> dict[str, list[str]]:
    """Per task, the teacher arrays the student reads: the taps `method` matches, and the
    prediction where `student.kd_outputs` weighs the task."""
    weights = config.kd_outputs.weights
    return {
        task: method.teacher_features() + ([PREDICTION] if weights.get(task, 0) > 0 else [])
        for task in tasks
    }


def refuse_unusable_stores(
    stores: dict[str, FeatureStore], method: type[Distiller], arrays: dict[str, list[str]]
) -> None:
    """Refuse stores without an array the losses read (the teacher's prediction, in stores of
    an older kdmtl or of an imported teacher without `output`), or whose encoding lost what the
    distillation loss needs."""
    for task, store in stores.items():
        again = f"`kdmtl extract-features --teacher {task}`"
        missing = [name for name in arrays[task] if name not in store.manifest.features]
        if PREDICTION in missing:
            imported = store.manifest.imported
            remedy = (
                f"its imported teacher has no output: set one in teacher.imported.{task}, then "
                f"run {again}"
                if imported is not None and imported.output is None
                else f"it was made before kdmtl cached predictions: run {again}"
            )
            raise DataError(
                f"feature store {store.path} holds no {task} teacher predictions, which "
                f"student.kd_outputs.weights.{task} asks to distil; {remedy}, or set that "
                "weight to 0"
            )
        if missing:
            raise DataError(f"feature store {store.path} holds no {missing[0]}: run {again}")
        if store.encoding.normalized and method.uses_teacher_magnitudes:
            raise DataError(
                f"feature store {store.path} holds {store.encoding.name} features, unit vectors "
                "without the teacher's magnitudes, which this distillation loss compares: set "
                f"features.encoding: float16, then run {again}"
            )


def build_distiller(
    model: Architecture,
    config: StudentParams,
    stores: dict[str, FeatureStore] | None,
    teachers: dict[str, nn.Module] | None,
    device: torch.device,
) -> tuple[Distiller, dict[str, nn.Module] | None]:
    """The method's adaptors from the student's channels to each teacher's (read from the
    stores' manifests when distilling from the cache), and the teachers in eval mode on `device`
    otherwise."""
    needed = {"cache": stores, "online": teachers}[config.kd_source]
    if not needed:
        kind = "feature stores" if config.kd_source == "cache" else "teacher models"
        raise ValueError(f"kd_source {config.kd_source!r} needs the teachers' {kind}")
    method = DISTILLERS[config.method]
    normalized = []
    if config.kd_source == "cache":
        refuse_unusable_stores(stores, method, distilled_arrays(method, config, list(stores)))
        channels = {
            task: {name: store.manifest.features[name].shape[2] for name in FEATURES}
            for task, store in stores.items()
        }
        normalized = [task for task, store in stores.items() if store.encoding.normalized]
    else:
        teachers = {task: teacher.to(device).eval() for task, teacher in teachers.items()}
        channels = {task: teacher.feature_channels() for task, teacher in teachers.items()}
    distiller = method(model.feature_channels(), channels, config.kd_weights, normalized)
    return distiller.to(device), teachers


def adaptor_optimizer(
    distiller: Distiller, config: StudentParams
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """Adam for the adaptors, at `student.adaptor_lr` or the method's own rate, annealed by a
    cosine over the student's epochs where the method has it (else constant: no scheduler)."""
    optimizer = torch.optim.Adam(
        distiller.parameters(),
        lr=config.adaptor_lr or distiller.adaptor_lr,
        weight_decay=config.adaptor_weight_decay,
    )
    if not distiller.adaptor_cosine:
        return optimizer, None
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)


def teacher_predictions(
    targets: dict[str, dict[str, torch.Tensor]], tasks: Collection[str]
) -> dict[str, torch.Tensor]:
    """The prediction of each teacher of `tasks` among its distillation targets; an online
    teacher that gives none (an imported one without `output`) is named."""
    missing = [task for task in tasks if PREDICTION not in targets[task]]
    if missing:
        raise KdmtlError(
            f"the {missing[0]} teacher gives no prediction to distil: set an output in "
            f"teacher.imported.{missing[0]}, or student.kd_outputs.weights.{missing[0]} to 0"
        )
    return {task: targets[task][PREDICTION] for task in tasks}


@dataclass
class StudentResult:
    model: Architecture
    history: list[dict[str, float]]
    test_metrics: Metrics


class TrainedModules(nn.Module):
    """Everything the student's optimizers train (the network, the adaptors, a weighting's own
    parameters) as one module, so that DistributedDataParallel averages all of their gradients;
    its forward pass is the network's."""

    def __init__(
        self, model: Architecture, distiller: Distiller | None, weighting: Weighting
    ) -> None:
        super().__init__()
        self.model = model
        self.distiller = distiller
        self.weighting = nn.ParameterList(weighting.parameters())

    def forward(self, images: torch.Tensor) -> ModelOutput:
        return self.model(images)


# Weightings whose weights come from per-task gradients of one process's batch: under
# data-parallel training each process would weight its own share differently.
LOCAL_GRADIENT_WEIGHTINGS = ("gradnorm", "mgda")


def refuse_local_gradient_weighting(name: str, replicas: Replicas) -> None:
    if replicas.count > 1 and name in LOCAL_GRADIENT_WEIGHTINGS:
        raise KdmtlError(
            f"{name} weights the tasks by their gradients in one process's batch, which "
            f"data-parallel training splits over {replicas.count} processes: train it in one "
            "process, or use ew, dwa or uw"
        )


def train_student(
    prepared: PreparedStore,
    task_names: list[str],
    model_params: ModelParams,
    config: StudentParams,
    loader: LoaderParams,
    device: torch.device,
    augment: bool = False,
    stores: dict[str, FeatureStore] | None = None,
    teachers: dict[str, nn.Module] | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    replicas: Replicas = SINGLE,
) -> StudentResult:
    """Train a multi-task student and evaluate it on the test split after every epoch.

    With a distillation method (`kd`, `url`) the distillation targets come from `stores` (cached
    features and predictions, no teacher runs) or from `teachers` run on every batch
    (`kd_source: online`). With several
    `replicas` (data-parallel processes), this process trains on its share of each global batch
    of `config.batch_size` and evaluates its share of the test split."""
    distil = config.method in DISTILLERS
    if refusal := config.output_distillation_refusal(DISTILLERS):
        raise KdmtlError(refusal)
    weighting_name = config.weighting if distil else config.method
    refuse_local_gradient_weighting(weighting_name, replicas)
    replicas.batch_size(config.batch_size, "student.batch_size")  # refused unless it splits
    tasks = make_tasks(task_names, prepared.manifest.num_classes)
    precision = Precision.for_device(config.precision, device)
    seed = config.seed
    torch.manual_seed(seed)
    heads = {name: task.channels for name, task in tasks.items()}
    model = build_model(model_params.arch, model_params.filters, heads).to(device).train()
    weighting = WEIGHTINGS[weighting_name](task_names, config)
    optimizer = make_optimizer([*model.parameters(), *weighting.parameters()], config)
    optimizers, schedulers = [optimizer], [make_scheduler(optimizer, config)]
    distiller, teachers = (
        build_distiller(model, config, stores, teachers, device) if distil else (None, None)
    )
    outputs = None
    if distiller is not None:
        adaptors, adaptor_schedule = adaptor_optimizer(distiller, config)
        optimizers.append(adaptors)
        schedulers += [adaptor_schedule] if adaptor_schedule else []
        if config.kd_outputs.enabled:
            weights, temperature = config.kd_outputs.weights, config.kd_outputs.temperature
            outputs = OutputDistiller(tasks, weights, temperature)
    trained = TrainedModules(model, distiller, weighting).to(device)  # a weighting's too
    trained = data_parallel(trained, replicas, device)
    cached = stores if distil and config.kd_source == "cache" else None
    arrays = distilled_arrays(type(distiller), config, task_names) if distil else {}
    encodings = {
        task: {name: store.encoding_of(name) for name in arrays[task]}
        for task, store in (cached or {}).items()
    }
    source = StudentSource(prepared, task_names, cached, augment, seed, arrays)
    shown = progress and replicas.is_main
    resident = choose_residency(
        source, loader, device, tqdm.write if replicas.is_main else lambda _line: None
    )
    if resident != "off":
        source.hold_in_memory(device if resident == "device" else None, shown)
    pin = device.type == "cuda"
    stream = ChunkStream(
        source,
        config.batch_size,
        True,
        seed,
        loader.buffer_chunks,
        drop_last=replicas.count > 1,  # every replica runs the same number of full steps
        pin_memory=pin,
        replicas=replicas,
    )
    test_stream = ChunkStream(
        PreparedSplit(prepared, "test", task_names),
        config.batch_size,
        False,
        pin_memory=pin,
        replicas=replicas.evaluating,
    )
    test_batches = make_loader(test_stream, num_workers=0)
    last_shared = model.last_shared_layer()

    def step(batch: Batch) -> dict[str, float]:
        with precision.autocast():
            output = trained(batch["image"])
            if distiller is not None and not cached:
                with torch.no_grad():
                    online = {
                        t: teacher.distilled_features(batch["image"])
                        for t, teacher in teachers.items()
                    }
        # Losses and distances in float32, whatever the forward pass ran in.
        terms = {
            name: task.loss_terms(output.predictions[name].float(), batch[name])
            for name, task in tasks.items()
        }
        losses = batch_means(terms, replicas)
        logs = {f"loss_{name}": loss.item() for name, loss in losses.items()}
        extra = None
        if distiller is not None:
            if cached:
                targets = {
                    t: {n: encoding.decode(batch[f"{t}.{n}"]) for n, encoding in names.items()}
                    for t, names in encodings.items()
                }
            else:
                targets = online
            student = {
                task: {n: f.float() for n, f in output.features_of(task).items()} for task in tasks
            }
            extra, distances = distiller(student, targets)
            if outputs is not None:
                predicted = {t: output.predictions[t].float() for t in outputs.tasks}
                taught = teacher_predictions(targets, outputs.tasks)
                matched, output_distances = outputs(predicted, taught)
                extra = extra + matched
                distances |= output_distances
            logs |= {f"dist_{key}": value.item() for key, value in distances.items()}
        context = StepContext(output.features["decoder"], last_shared, precision.scale)
        weights = weighting.backward(losses, extra, context)
        if weighting.name != "ew":
            logs |= {f"weight_{name}": value for name, value in weights.items()}
        return logs

    last: Metrics = {}

    def end_of_epoch(row: dict[str, float]) -> dict[str, float]:
        weighting.end_epoch({name: row[f"loss_{name}"] for name in tasks})
        last.update(evaluate(model, tasks, test_batches, device, precision, replicas))
        return {f"test_{t.main_metric}": last[name][t.main_metric] for name, t in tasks.items()}

    history = fit(
        step,
        make_loader(stream, loader.num_workers),
        config.epochs,
        optimizers,
        schedulers,
        device,
        end_of_epoch,
        description=f"student {config.method}",
        progress=progress,
        on_epoch=on_epoch,
        precision=precision,
        replicas=replicas,
        steps=lambda epoch: stream.steps(epoch, loader.num_workers),
    )
    return StudentResult(model, history.rows, dict(last))

"""The params file: one model of the whole of `params.yaml`, every key with a default.

Names that come from registries of the library (tasks, data sources) are checked against a
validation context, `{"tasks": [...], "sources": {source: [tasks it provides]}}`, so that adding a
task or a source never touches this file. Without a context those checks are skipped.

Integers are strict: YAML's `true` is a Python bool, which pydantic's lax mode would read as 1.
Floats take integers (YAML reads `lr: 1` as one) and numeric strings (YAML 1.1 reads `1e-3`,
without a dot, as a string) but neither booleans nor infinities or NaN.
"""

import re
from collections.abc import Collection, Iterable
from typing import Annotated, Any, Literal

from pydantic import (
    AllowInfNan,
    BeforeValidator,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from schemas.base import Contract

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
# torch.manual_seed takes at most 2**64 - 1 and numpy's generators any size, but seeds are also
# recorded with the outputs (checkpoints, store metadata): a signed 64-bit integer fits them all.
MAX_SEED = 2**63 - 1


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    return value


Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_not_a_bool), AllowInfNan(False)]
Seed = Annotated[int, Strict(), Field(ge=0, le=MAX_SEED)]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


def _context(info: ValidationInfo) -> dict[str, Any]:
    return info.context if isinstance(info.context, dict) else {}


def _check_known(
    values: Iterable[str], known: Iterable[str] | None, what: str, where: str = ""
) -> None:
    """Refuse the first of `values` that is not in `known`, a registry's names from the validation
    context (None when validating without registries: nothing to check)."""
    if known is None:
        return
    known = list(known)
    for value in values:
        if value not in known:
            raise ValueError(f"{where}{value!r} is not {what}; allowed: {', '.join(known)}")


class DataParams(Contract):
    """Which dataset to prepare and how."""

    source: str = Field(
        "scenes",
        description="Data source: scenes (built-in), folder (images and target PNGs), nyuv2 or "
        "cityscapes (.npy files).",
    )
    root: str | None = Field(None, description="Folder of a real dataset; unused by scenes.")
    seed: Seed = Field(0, description="Seed of the built-in scenes; unused by real datasets.")
    num_train: Int | None = Field(
        None,
        ge=1,
        description="Training samples: the first N; null for all (800 built-in scenes).",
    )
    num_test: Int | None = Field(
        None, ge=1, description="Test samples: the first N; null for all (200 built-in scenes)."
    )
    height: Int = Field(48, ge=8, le=4096, description="Image height in pixels.")
    width: Int = Field(64, ge=8, le=4096, description="Image width in pixels.")
    chunk_size: Int = Field(
        32, ge=1, le=4096, description="Samples per chunk: the grid shared by all Zarr stores."
    )
    augment: bool = Field(
        False, description="Random scale-crop and flip views for distillation (off in the paper)."
    )
    depth_scale: Float = Field(
        1000.0,
        gt=0,
        description="folder source: 16-bit depth PNG values per metre (1000: millimetres).",
    )

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str, info: ValidationInfo) -> str:
        _check_known([value], _context(info).get("sources"), "a data source")
        return value


class LoaderParams(Contract):
    """How training reads its data."""

    num_workers: Int = Field(
        0, ge=0, le=64, description="Reader processes (spawned); 0 reads in the training process."
    )
    buffer_chunks: Int = Field(
        4, ge=1, description="Chunks shuffled together; a stream holds twice this many at most."
    )
    resident: Literal["auto", "ram", "device", "off"] = Field(
        "auto",
        description="The student's training data decoded once and served from host memory (ram), "
        "with the teachers' features in the training device's memory (device: a GPU's, or the "
        "host's on a CPU), or streamed from disk every epoch (off); auto: the first of device (on "
        "a GPU), ram and off that fits memory_budget_gb, with num_workers 0.",
    )
    memory_budget_gb: Float | None = Field(
        None,
        gt=0,
        description="Memory that resident data may take, in each of host and GPU memory; null: "
        "half of what is free.",
    )


# Bounds on a network's size, far above any kdmtl trains (the paper's widest level has 512
# filters, it has 5 levels), so that a typo or a hostile checkpoint never builds a network that
# exhausts the memory. Each level halves the image: 2**12 is the largest side params allow.
MAX_FILTERS = 4096
MAX_LEVELS = 12


class ModelParams(Contract):
    """A network of the SegNet family (or another registered architecture)."""

    arch: str = "segnet"
    filters: list[Int] = Field(
        [16, 32, 64, 128],
        min_length=1,
        max_length=MAX_LEVELS,
        description="Channels per level; the paper's are [64, 128, 256, 512, 512].",
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str, info: ValidationInfo) -> str:
        _check_known([value], _context(info).get("architectures"), "an architecture")
        return value

    @field_validator("filters")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if min(value) < 1 or max(value) > MAX_FILTERS:
            raise ValueError(f"filters must be from 1 to {MAX_FILTERS}, got {value}")
        return value


class TrainParams(Contract):
    """Optimisation of one network: Adam, with a per-epoch learning-rate schedule."""

    epochs: Int = Field(20, ge=1)
    batch_size: Int = Field(16, ge=1)
    lr: Float = Field(1e-3, gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    scheduler: Literal["cosine", "step", "none"] = "cosine"
    step_size: Int = Field(10, ge=1, description="Epochs between decays of the step scheduler.")
    gamma: Float = Field(0.5, gt=0, le=1, description="Decay factor of the step scheduler.")
    precision: Precision = Field(
        "auto",
        description="fp32, bf16 or fp16 (with loss scaling) for the forward passes; losses and "
        "metrics are float32 whatever it is. auto: bf16 on a GPU that supports it, else fp32.",
    )


class ImportedTeacherParams(Contract):
    """A teacher that kdmtl does not train: any torch.nn.Module that a function of a Python file
    builds, with weights from a file, and named submodules whose outputs are the features."""

    file: str = Field(description="Python file that defines the factory (a DVC dependency).")
    factory: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Function of that file, called with kwargs, that returns the module.",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Arguments of the factory.")
    weights: str = Field(
        description="The module's state dict: a .safetensors file, or a weights-only torch.save "
        "file; never a pickle."
    )
    taps: dict[str, str] = Field(
        description="Student feature -> the teacher's submodule whose output it is distilled "
        "towards, e.g. {bottleneck: encoder.layer4, decoder: decoder.fuse}."
    )
    output: str | None = Field(
        None,
        description="Where the teacher's prediction is: a submodule's name, `forward` for what "
        "the module returns, or null when it gives none (the student is then evaluated against "
        "the ground truth only).",
    )

    @field_validator("taps")
    @classmethod
    def _student_taps(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        wanted = _context(info).get("feature_taps")
        if wanted is not None and sorted(value) != sorted(wanted):
            raise ValueError(
                f"taps must name one submodule for each of the student's features "
                f"{', '.join(wanted)}; got {', '.join(value) or 'none'}"
            )
        return value


class TeacherParams(TrainParams):
    """Training of the teachers; `overrides.TASK` changes keys for one teacher only, so that
    changing one teacher's params does not retrain the others. `trained` lists the tasks whose
    teachers kdmtl trains, `imported` the others'."""

    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    trained: list[str] = Field(
        ["semseg", "depth", "normal"],
        description="Tasks whose teachers kdmtl trains (train_teacher@TASK in dvc.yaml); every "
        "task is here or in imported.",
    )
    imported: dict[str, ImportedTeacherParams] = Field(
        default_factory=dict, description="TASK -> an imported teacher, which kdmtl never trains."
    )

    @model_validator(mode="after")
    def _valid_overrides(self, info: ValidationInfo) -> "TeacherParams":
        known = _context(info).get("tasks")
        _check_known(self.overrides, known, "a task", "overrides: ")
        _check_known(self.imported, known, "a task", "imported: ")
        _check_known(self.trained, known, "a task", "trained: ")
        for task in self.imported:
            if self.overrides.get(task):
                raise ValueError(
                    f"overrides.{task}: the {task} teacher is imported, kdmtl does not train it"
                )
        for task in self.overrides:
            try:
                self.for_task(task)
            except ValidationError as error:
                first = error.errors()[0]
                key = ".".join(str(part) for part in first["loc"])
                raise ValueError(f"overrides.{task}.{key}: {first['msg']}") from None
        return self

    def for_task(self, task: str) -> TrainParams:
        """The training params of one teacher."""
        base = self.model_dump(exclude={"overrides", "trained", "imported"})
        return TrainParams.model_validate(base | self.overrides.get(task, {}))


class OutputDistillParams(Contract):
    """Distillation of the teachers' predictions, beside their features (`kd` and `url`)."""

    weights: dict[str, Annotated[Float, Field(ge=0)]] = Field(
        {"semseg": 0.0, "depth": 0.0, "normal": 0.0},
        description="Weight per task of the distance to its teacher's prediction; 0: off.",
    )
    temperature: Float = Field(
        1.0, gt=0, description="Softmax temperature of segmentation's KL divergence."
    )

    @field_validator("weights")
    @classmethod
    def _known_tasks(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        _check_known(value, _context(info).get("tasks"), "a task")
        return value

    @property
    def enabled(self) -> bool:
        return any(weight > 0 for weight in self.weights.values())


class StudentParams(TrainParams):
    """Training of the multi-task student.

    `method` is a distillation method (`kd`, the paper: task losses plus distillation towards the
    teachers' features; `url`, its authors' follow-up) or a loss weighting without distillation
    (`ew`, `dwa`, `uw`, `gradnorm`, `mgda`). With a distillation method, `weighting` weights the
    task losses."""

    epochs: Int = Field(30, ge=1)
    model: ModelParams | None = Field(None, description="The student's network; null: as model.")
    method: str = "kd"
    weighting: str = Field("ew", description="Task-loss weighting used with kd or url.")
    kd_source: Literal["cache", "online"] = Field(
        "cache", description="cache: stream the stored features; online: run the teachers."
    )
    kd_weights: dict[str, Annotated[Float, Field(ge=0)]] = Field(
        {"semseg": 1.0, "depth": 1.0, "normal": 2.0},
        description="lambda >= 0 per task, multiplying its two feature distances.",
    )
    kd_outputs: OutputDistillParams = Field(default_factory=OutputDistillParams)
    adaptor_lr: Float | None = Field(
        None, gt=0, description="Adam learning rate of the adaptors; null: the method's own."
    )
    adaptor_weight_decay: Float = Field(5e-4, ge=0)
    gradnorm_alpha: Float = Field(1.5, ge=0, description="GradNorm's asymmetry alpha.")
    seed: Seed = Field(0, description="Seed of the student's initialisation and batches.")

    @field_validator("method", "weighting")
    @classmethod
    def _known_method(cls, value: str, info: ValidationInfo) -> str:
        weightings = _context(info).get("weightings")
        if weightings is not None and info.field_name == "method":
            weightings = [*_context(info).get("distillers", []), *weightings]
        _check_known([value], weightings, "a method")
        return value

    def output_distillation_refusal(self, distillers: Collection[str]) -> str | None:
        """Why `kd_outputs` cannot apply, if it cannot: only a distillation method (one of
        `distillers`) distils the teachers' predictions."""
        if not self.kd_outputs.enabled or self.method in distillers:
            return None
        return (
            "student.kd_outputs distils the teachers' predictions beside their features: it "
            f"needs student.method {' or '.join(distillers)}, not {self.method} (or set its "
            "weights to 0)"
        )

    @field_validator("kd_weights")
    @classmethod
    def _known_tasks(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        # Any registered task, not only those in `tasks`: the defaults weight all three.
        _check_known(value, _context(info).get("tasks"), "a task")
        return value


class FeatureParams(Contract):
    """How teacher features are cached. Encodings come from the library's registry: the
    validation context's `encodings` maps each name to the mantissa bits BitRound may round
    (0 for an encoding that stores integers)."""

    encoding: str = Field(
        "float16",
        description="float16, float32, or normalized-int8 (each pixel's feature vector "
        "L2-normalised over channels, as the distillation loss sees it, stored as int8).",
    )
    keep_bits: Int | None = Field(
        None, ge=1, description="Mantissa bits kept by BitRound before compression; null: all."
    )
    compressor: Literal["zstd", "lz4", "lz4hc", "blosclz", "zlib"] = "zstd"
    clevel: Int = Field(1, ge=0, le=9, description="Blosc compression level.")
    shard_chunks: Int = Field(4, ge=1, description="Chunks per shard file.")
    views: Int = Field(1, ge=1, description="Cached augmentation views per sample.")
    seed: Seed = Field(0, description="Seed of the cached views.")
    batch_size: Int = Field(64, ge=1, description="Teacher batch size during extraction.")
    precision: Precision = Field(
        "auto", description="The teacher's forward pass: fp32, bf16, fp16; auto as for training."
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_dtype(cls, data: Any) -> Any:
        if isinstance(data, dict) and "dtype" in data and "encoding" not in data:
            raise ValueError(
                f"features.dtype is now features.encoding: write encoding: {data['dtype']}"
            )
        return data

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str, info: ValidationInfo) -> str:
        _check_known([value], _context(info).get("encodings"), "a feature encoding")
        return value

    @model_validator(mode="after")
    def _keep_bits_fit_the_encoding(self, info: ValidationInfo) -> "FeatureParams":
        encodings = _context(info).get("encodings")
        if self.keep_bits is None or encodings is None:
            return self
        bits = encodings[self.encoding]
        if not bits:
            raise ValueError(
                f"keep_bits rounds float mantissas, and {self.encoding} stores integers: use null"
            )
        if self.keep_bits >= bits:
            raise ValueError(
                f"keep_bits must be below the {bits} mantissa bits of {self.encoding} "
                f"(got {self.keep_bits}); use null to keep them all"
            )
        return self


class PathParams(Contract):
    """Where each stage writes, relative to the current directory."""

    prepared: str = "data/prepared.zarr"
    teachers: str = Field("models/teachers", description="Folder of TASK.pt teacher checkpoints.")
    features: str = Field("features", description="Folder of TASK.zarr feature stores.")
    student: str = "models/student.pt"
    metrics: str = "metrics"
    plots: str = "plots"
    report: str = Field("reports", description="Folder of `kdmtl report`'s table and chart.")


class Params(Contract):
    """The whole params file."""

    seed: Seed = Field(0, description="Seed of the teachers' initialisation and order.")
    device: str = Field(
        "auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N."
    )
    tasks: list[str] = Field(["semseg", "depth", "normal"], min_length=1)
    data: DataParams = DataParams()
    loader: LoaderParams = LoaderParams()
    model: ModelParams = ModelParams()
    teacher: TeacherParams = TeacherParams()
    features: FeatureParams = FeatureParams()
    student: StudentParams = StudentParams()
    paths: PathParams = PathParams()

    @property
    def student_model(self) -> ModelParams:
        return self.student.model or self.model

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError(f"{value!r} is not a device; allowed: auto, cpu, cuda, cuda:N")
        return value

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"tasks repeat a name: {value}")
        _check_known(value, _context(info).get("tasks"), "a task")
        return value

    @model_validator(mode="after")
    def _image_fits_the_model(self) -> "Params":
        for key, model in (("model", self.model), ("student.model", self.student_model)):
            levels = len(model.filters)
            if min(self.data.height, self.data.width) < 2**levels:
                raise ValueError(
                    f"data.height and data.width must be at least {2**levels}: {key}.filters "
                    f"has {levels} levels, each halving the image"
                )
        return self

    @model_validator(mode="after")
    def _views_need_augmentation(self) -> "Params":
        if self.features.views > 1 and not self.data.augment:
            raise ValueError(
                "features.views > 1 needs data.augment: true (without augmentation every view "
                "is the same image)"
            )
        return self

    @model_validator(mode="after")
    def _distillation_per_task(self, info: ValidationInfo) -> "Params":
        """A distillation method (the context's `distillers`) weighs every task; outputs are
        distilled only by one, and only for tasks in `tasks`."""
        distillers = _context(info).get("distillers")
        if distillers is None:
            return self
        student = self.student
        missing = [task for task in self.tasks if task not in student.kd_weights]
        if student.method in distillers and missing:
            raise ValueError(f"student.kd_weights has no weight for task {missing[0]!r}")
        if refusal := student.output_distillation_refusal(distillers):
            raise ValueError(refusal)
        for task in [task for task, weight in student.kd_outputs.weights.items() if weight > 0]:
            if task not in self.tasks:
                raise ValueError(
                    f"student.kd_outputs.weights: {task!r} is not one of tasks "
                    f"({', '.join(self.tasks)}); set its weight to 0, or add it to tasks"
                )
        return self

    @model_validator(mode="after")
    def _one_teacher_per_task(self) -> "Params":
        imported, trained = self.teacher.imported, self.teacher.trained
        for task in self.tasks:
            if task in trained and task in imported:
                raise ValueError(
                    f"task {task!r} is in teacher.trained and in teacher.imported: keep it in "
                    "one, trained (by kdmtl) or imported"
                )
            if task not in trained and task not in imported:
                raise ValueError(
                    f"task {task!r} has no teacher: add it to teacher.trained (kdmtl trains it) "
                    "or to teacher.imported"
                )
        for key, teachers in (("trained", trained), ("imported", imported)):
            for task in teachers:
                if task not in self.tasks:
                    raise ValueError(
                        f"teacher.{key}: {task!r} is not one of tasks ({', '.join(self.tasks)}); "
                        f"remove it from teacher.{key}, or add it to tasks"
                    )
        return self

    @model_validator(mode="after")
    def _tasks_in_source(self, info: ValidationInfo) -> "Params":
        provided = _context(info).get("sources", {}).get(self.data.source)
        if provided is not None:
            missing = [task for task in self.tasks if task not in provided]
            if missing:
                raise ValueError(
                    f"tasks: data source {self.data.source!r} has no {missing[0]!r} targets; "
                    f"it provides {', '.join(provided)}"
                )
        return self

"""Looking into feature stores: out-of-core statistics with dask, and verification."""

from dataclasses import dataclass, field

import dask
import dask.array as da
import numpy as np
import torch
import zarr
from torch import nn
from upath import UPath

from pipeline.errors import reading
from pipeline.precision import Precision, recomputation_tolerance
from pipeline.store.extract import NonFiniteFeature, teacher_features
from pipeline.store.features import SPLIT, FeatureStore, keep_bits
from pipeline.store.prepared import PreparedStore


def lazy_feature(store: FeatureStore, name: str) -> da.Array:
    """A feature as a lazy float32 dask array, decoded from the store's encoding, one block per
    shard (dask would otherwise take the small inner chunks of a sharded array as its blocks)."""
    array = store.array(name, "r")
    stored = da.from_zarr(array, chunks=array.shards or array.chunks)
    return store.encoding_of(name).decode_array(stored)


def bytes_on_disk(folder: UPath) -> int:
    """The size of every file below `folder`, from one listing (one request in object storage)."""
    folder = UPath(folder)
    return int(folder.fs.du(folder.path))


def summarize(store: FeatureStore) -> dict:
    """Per feature: layout, encoding, codecs, sizes and statistics of the decoded values,
    computed shard by shard in float64 (float16 sums overflow), so memory stays flat whatever
    the store's size."""
    store.check_intact()
    manifest = store.manifest
    done = len(store.done_shards())
    summary = {
        "path": str(store.path),
        "task": manifest.task,
        "imported": None if manifest.imported is None else manifest.imported.model_dump(),
        "samples": manifest.num_samples,
        "views": manifest.views.views,
        "augment": manifest.views.augment,
        "shards_complete": done,
        "shards": manifest.num_shards,
        "complete": manifest.complete,
        "encoding": manifest.encoding,
        "features": {},
    }
    for name in manifest.features:
        x = lazy_feature(store, name)
        axes = (0, 1, 3, 4)
        mean = x.mean(axis=axes, dtype="f8")
        square = (x.astype("f8") ** 2).mean(axis=axes)
        zeros, nans, infs = (x == 0).sum(), da.isnan(x).sum(), da.isinf(x).sum()
        damaged = f"{store.damaged_shard_remedy}; `kdmtl verify` names them"
        with reading(store.path / SPLIT / name, damaged):
            mean, square, zeros, nans, infs = dask.compute(mean, square, zeros, nans, infs)
        std = np.sqrt(np.maximum(square - mean**2, 0))
        raw = int(np.prod(x.shape)) * 4
        disk = bytes_on_disk(store.path / SPLIT / name)
        info = manifest.features[name]
        summary["features"][name] = {
            "shape": info.shape,
            "dtype": info.dtype,
            "encoding": store.encoding_of(name).name,
            "codecs": [c["name"] for c in info.codecs],
            "bytes_on_disk": disk,
            "bytes_raw_float32": raw,
            "ratio": disk / raw,
            "channel_mean": _spread(mean),
            "channel_std": _spread(std),
            "zero_share": float(zeros) / x.size,
            "nan": int(nans),
            "inf": int(infs),
        }
    return summary


def _spread(values: np.ndarray) -> dict[str, float]:
    return {
        "min": float(values.min()),
        "median": float(np.median(values)),
        "max": float(values.max()),
    }


@dataclass
class Verification:
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    remedy: str = ""  # what mends the problems found


def _read_shard(array: zarr.Array, name: str, start: int, stop: int) -> tuple[bool, str | None]:
    """Decode samples start..stop-1 of the array (its checksums are verified on read): whether
    they could be read, and what is wrong with them, if anything."""
    try:
        values = array[start:stop]
    except Exception as error:  # a codec error names the damage; report, go on
        return False, f"{name} samples {start}-{stop - 1} unreadable: {error}"
    if name == "sample_id" and not np.array_equal(values, np.arange(start, stop)):
        return True, f"sample_id of samples {start}-{stop - 1} out of order"
    return True, None


def read_every_chunk(store: FeatureStore, report: Verification) -> set[int]:
    """Decode every shard of every array, as dask tasks (threads here, or the workers of a
    dask.distributed cluster when a client is active); returns the shards that could not be
    read."""
    names = [*store.manifest.features, "sample_id", "views"]
    # A shard not written holds nothing to decode (zarr reads its missing files as zeros).
    work = [(name, shard) for name in names for shard in sorted(store.done_shards())]
    arrays = {name: store.array(name, "r") for name in names}
    results = dask.compute(
        *[
            dask.delayed(_read_shard)(arrays[name], name, *store.shard_range(shard))
            for name, shard in work
        ]
    )
    damaged = set()
    for (_, shard), (readable, problem) in zip(work, results, strict=True):
        if problem:
            report.problems.append(problem)
        if not readable:
            damaged.add(shard)
    failures = sum(not readable for readable, _ in results)
    report.checked.append(
        f"read every chunk of {len(names)} arrays ({len(work)} shard files): "
        + ("checksums ok" if not failures else f"{failures} shard files unreadable")
    )
    return damaged


def recompute(
    store: FeatureStore,
    teacher: nn.Module,
    prepared: PreparedStore,
    checks: int,
    device: torch.device,
    report: Verification,
    skip: set[int] = frozenset(),
    seed: int = 0,
) -> None:
    """Run the teacher again on a few random (sample, view) pairs of written shards, except those
    in `skip`, and compare with the stored features."""
    manifest = store.manifest
    done = sorted(store.done_shards() - skip)
    candidates = [i for s in done for i in range(*store.shard_range(s))]
    if not candidates:
        report.problems.append("no shard is written: nothing to recompute")
        return
    rng = np.random.default_rng(seed)
    samples = np.sort(rng.choice(candidates, size=min(checks, len(candidates)), replace=False))
    chosen_views = rng.integers(manifest.views.views, size=len(samples))
    images = prepared.array(SPLIT, "image").oindex[samples].astype(np.float32) / np.float32(255)
    views = store.array("views").oindex[samples][np.arange(len(samples)), chosen_views]
    precision = Precision(manifest.precision, device)
    try:
        recomputed = teacher_features(
            teacher, torch.from_numpy(images), views[:, None], 64, device, precision=precision
        )
    except NonFiniteFeature as error:
        report.problems.append(f"{error} on the recomputed sample views (NaN or Inf)")
        return
    errors: dict[tuple[str, float], list[str]] = {}  # (kind, tolerance) -> "NAME error"
    for name, info in manifest.features.items():
        encoding = store.encoding_of(name)
        allowed = max(
            encoding.tolerance(keep_bits(info.codecs)),
            recomputation_tolerance(manifest.precision),
        )
        kind = encoding.error_kind
        chosen = store.array(name, "r").oindex[samples][np.arange(len(samples)), chosen_views]
        expected = encoding.expected(recomputed[name][:, 0].numpy())
        error = float(encoding.errors(encoding.decode_array(chosen), expected).max())
        if error > allowed:
            report.problems.append(
                f"{name} differs from the teacher's recomputed features: {kind} error "
                f"{error:.2e} > {allowed:.2e}"
            )
        errors.setdefault((kind, allowed), []).append(f"{name} {error:.1e}")
    shown = "; ".join(
        f"max {kind} error {', '.join(names)} (tolerance {allowed:.1e})"
        for (kind, allowed), names in errors.items()
    )
    report.checked.append(
        f"recomputed {len(samples)} sample views with the teacher ({store.encoding.name}, "
        f"{manifest.precision}): {shown}"
    )

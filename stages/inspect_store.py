"""`kdmtl inspect STORE`: what a feature store holds, computed out of core with dask."""

import json

import click
from upath import UPath

from pipeline.store.checks import summarize
from pipeline.store.features import FeatureStore
from stages.common import dask_scheduler, scheduler_option, store_argument, user_errors


def format_summary(summary: dict) -> str:
    state = "complete" if summary["complete"] else "INCOMPLETE"
    imported = summary["imported"]
    origin = "" if imported is None else f" (imported: {imported['file']}:{imported['factory']})"
    lines = [
        f"{summary['path']}: teacher {summary['task']}{origin}, {summary['samples']} samples x "
        f"{summary['views']} views (augment {'on' if summary['augment'] else 'off'}), "
        f"{summary['shards_complete']}/{summary['shards']} shards written, {state}"
    ]
    for name, f in summary["features"].items():
        mean, std = f["channel_mean"], f["channel_std"]
        lines += [
            f"  {name}: {f['shape']} stored as {f['dtype']} ({f['encoding']} encoding), "
            f"codecs {' + '.join(f['codecs'])}",
            f"    {f['bytes_on_disk'] / 1e6:.2f} MB on disk, {f['bytes_raw_float32'] / 1e6:.2f} MB "
            f"as raw float32: ratio {f['ratio']:.3f}",
            f"    decoded values: channel mean min/median/max {mean['min']:.3g} / "
            f"{mean['median']:.3g} / {mean['max']:.3g}; channel std {std['min']:.3g} / "
            f"{std['median']:.3g} / {std['max']:.3g}",
            f"    exact zeros {100 * f['zero_share']:.1f}%, NaN {f['nan']}, Inf {f['inf']}",
        ]
    return "\n".join(lines)


@click.command("inspect")
@store_argument
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@scheduler_option
@user_errors
def command(store: UPath, as_json: bool, scheduler: str | None) -> None:
    """Show a feature store's layout, size, compression, value statistics and completion. STORE
    is a path or a URL (s3://bucket/features/depth.zarr)."""
    with dask_scheduler(scheduler):
        summary = summarize(FeatureStore.open(store))
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))

"""Feature encodings against the method: bytes on disk and the student's Delta_MTL per encoding.

    python benchmarks/feature_encodings.py [--seeds 0,1,2] [--epochs 30]

Run after `dvc repro`: every row reuses data/prepared.zarr and the trained teachers (read only),
and extracts, trains and evaluates in a temporary folder with the default params but
`features.encoding` and `features.keep_bits` (and `student.epochs`), through the `kdmtl` commands.
Prints one Markdown table: per encoding, the three stores' bytes on disk against raw float32, and
Delta_MTL against the teachers, mean and standard deviation over the seeds.
"""

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import yaml
from setups import ENCODINGS

from schemas.params import Params

KDMTL = str(Path(sys.executable).parent / "kdmtl")


def run(folder: Path, *args: str) -> str:
    done = subprocess.run([KDMTL, *args], cwd=folder, capture_output=True, text=True)
    if done.returncode:
        raise click.ClickException(f"kdmtl {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def encoding_row(label: str, features: dict, seeds: list[int], epochs: int) -> str:
    params = Params()
    repo = Path.cwd()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        config = {
            "features": features,
            "student": {"epochs": epochs},
            "paths": {
                "prepared": str(repo / params.paths.prepared),
                "teachers": str(repo / params.paths.teachers),
            },
        }
        (folder / "params.yaml").write_text(yaml.safe_dump(config))
        for task in params.tasks:
            run(folder, "extract-features", "--teacher", task)
        disk = raw = 0
        for task in params.tasks:
            summary = json.loads(run(folder, "inspect", f"features/{task}.zarr", "--json"))
            disk += sum(f["bytes_on_disk"] for f in summary["features"].values())
            raw += sum(f["bytes_raw_float32"] for f in summary["features"].values())
        deltas = []
        for seed in seeds:
            config["student"]["seed"] = seed
            (folder / "params.yaml").write_text(yaml.safe_dump(config))
            run(folder, "train-student")
            run(folder, "evaluate")
            deltas.append(json.loads((folder / "metrics/eval.json").read_text())["delta_mtl"])
    spread = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
    per_seed = ", ".join(f"{d:+.2f}" for d in deltas)
    return (
        f"| {label} | {disk / 1e6:.1f} MB | {disk / raw:.3f} | "
        f"{statistics.mean(deltas):+.2f} ± {spread:.2f} | {per_seed} |"
    )


@click.command()
@click.option("--seeds", default="0,1,2", show_default=True, help="student.seed values")
@click.option("--epochs", default=Params().student.epochs, show_default=True)
@click.option("--only", default=None, help="Row labels to run, separated by semicolons.")
def main(seeds: str, epochs: int, only: str | None) -> None:
    seed_list = [int(s) for s in seeds.split(",")]
    chosen = [s for s in ENCODINGS if only is None or s[0] in only.split(";")]
    click.echo(
        "| encoding | features on disk (3 stores) | / raw float32 | "
        f"Δ_MTL (%), mean ± std over seeds {seeds} | per seed |"
    )
    click.echo("|---|---|---|---|---|")
    for label, features in chosen:
        click.echo(encoding_row(label, features, seed_list, epochs))


if __name__ == "__main__":
    main()

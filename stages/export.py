"""`kdmtl export --out FILE.onnx`: a trained student (or teacher) as an ONNX model."""

from pathlib import Path

import click

from pipeline.checkpoints import load_trained_network
from pipeline.errors import KdmtlError
from pipeline.export import TOLERANCE, export_onnx, made_by_kdmtl, onnx_difference
from pipeline.files import sha256_file, write_atomically
from stages.common import model_option, network_input_size, size_option, user_errors


def check_replaceable(path: Path) -> None:
    """Refuse to replace anything but an ONNX model that kdmtl export wrote."""
    if (path.exists() or path.is_symlink()) and (path.is_dir() or not made_by_kdmtl(path)):
        raise KdmtlError(
            f"{path} exists and is not an ONNX model that kdmtl exported, and kdmtl replaces "
            "only its own files: move it away or choose another --out"
        )


@click.command("export")
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="The ONNX file to write."
)
@model_option
@click.option(
    "--format",
    "export_format",
    type=click.Choice(["onnx"]),
    default="onnx",
    show_default=True,
    help="The model format.",
)
@size_option("Input size of the exported model; default: the size it was trained on.")
@user_errors
def command(out: Path, model: Path, export_format: str, size: str | None) -> None:
    """Export a trained network for deployment: input `image`, float RGB in [0, 1] of shape
    [batch, 3, H, W]; one output per task, named after it (class scores, depth in metres,
    normals before normalisation). The export is checked against PyTorch with ONNX Runtime when
    it is installed, and removed if they disagree."""
    if out.suffix != ".onnx":
        raise click.BadParameter(f"{out} does not end in .onnx", param_hint="'--out'")
    check_replaceable(out)
    network, metadata = load_trained_network(model)
    shape = network_input_size(network, size, model, metadata)
    tasks = list(network.heads)
    differences = []

    def write_checked(partial: Path) -> None:
        export_onnx(network, tasks, shape, partial, sha256_file(model))
        differences.append(onnx_difference(network, tasks, shape, partial))
        if differences[0] is not None and differences[0] > TOLERANCE:
            raise KdmtlError(
                f"the ONNX model's outputs differ from PyTorch's by {differences[0]:.2e} of "
                f"their magnitude (tolerance {TOLERANCE:.0e}): {out} is left as it was; "
                "please report it"
            )

    write_atomically(out, write_checked)  # in place only once checked
    difference = differences[0]
    checked = (
        "not checked: install onnxruntime to compare it with PyTorch"
        if difference is None
        else f"ONNX Runtime agrees with PyTorch to {difference:.1e} of each output's magnitude"
    )
    click.echo(
        f"wrote {out} ({export_format}, {out.stat().st_size / 1e6:.1f} MB, sha256 "
        f"{sha256_file(out)[:12]}): {model} at {shape[0]}x{shape[1]}, outputs "
        f"{', '.join(tasks)}; {checked}"
    )

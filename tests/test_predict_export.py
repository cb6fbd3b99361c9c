"""Using the student: `kdmtl predict` on new images of any size, `kdmtl export` to ONNX."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from conftest import kdmtl, refused
from PIL import Image

from pipeline.checkpoints import load_student
from pipeline.export import TOLERANCE
from pipeline.files import sha256_file


def write_images(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (height, width) in enumerate(sizes):
        path = folder / f"photo{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_predict_writes_each_task_at_the_images_own_size(outputs: Path):
    paths = write_images(outputs / "photos", [(40, 50), (9, 13)])
    extra = write_images(outputs / "more", [(16, 24)])[0].rename(outputs / "more/single.png")
    result = kdmtl("predict", "photos", str(extra), "--out", "predicted", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert "3 images x 3 tasks" in result.output
    for path, (height, width) in zip([*paths, extra], [(40, 50), (9, 13), (16, 24)], strict=True):
        semseg = np.load(outputs / f"predicted/{path.stem}.semseg.npy")
        depth = np.load(outputs / f"predicted/{path.stem}.depth.npy")
        normal = np.load(outputs / f"predicted/{path.stem}.normal.npy")
        assert (semseg.shape, semseg.dtype) == ((height, width), np.int16)
        assert (depth.shape, depth.dtype) == ((height, width), np.float32)
        assert normal.shape == (3, height, width)
        np.testing.assert_allclose(np.linalg.norm(normal, axis=0), 1, rtol=1e-5)
        for task in ("semseg", "depth", "normal"):
            picture = Image.open(outputs / f"predicted/{path.stem}.{task}.png")
            assert picture.width >= width and picture.height >= height
        assert Image.open(outputs / f"predicted/{path.stem}.depth.png").height > height  # its bar

    # The first image by hand: resized to the trained 16x24, the heads' outputs resized back.
    student, _ = load_student(outputs / "models/student.pt")
    image = torch.from_numpy(np.asarray(Image.open(paths[0]), dtype=np.float32) / 255)
    image = image.permute(2, 0, 1)[None]
    small = F.interpolate(image, (16, 24), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        heads = student.eval()(small).predictions
    back = {
        k: F.interpolate(v, (40, 50), mode="bilinear", align_corners=False)
        for k, v in heads.items()
    }
    np.testing.assert_array_equal(
        np.load(outputs / "predicted/photo0.semseg.npy"), back["semseg"].argmax(1)[0].numpy()
    )
    np.testing.assert_allclose(
        np.load(outputs / "predicted/photo0.depth.npy"),
        back["depth"][0, 0].numpy(),
        rtol=1e-4,
        atol=1e-7,  # a batch of two sums in another order than one image
    )


def test_predict_runs_a_teacher_too(outputs: Path):
    write_images(outputs / "photos", [(20, 30)])
    result = kdmtl("predict", "photos", "--out", "depth", "--model", "models/teachers/depth.pt")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (outputs / "depth").iterdir()) == [
        "photo0.depth.npy",
        "photo0.depth.png",
    ]


def test_predict_refuses_what_it_would_overwrite_or_cannot_read(outputs: Path):
    write_images(outputs / "photos", [(20, 30)])
    (outputs / "mine").mkdir()
    (outputs / "mine/notes.txt").write_text("keep me")
    refused(("predict", "photos", "--out", "mine"), "mine holds files that kdmtl predict does not")
    assert (outputs / "mine/notes.txt").read_text() == "keep me"
    write_images(outputs / "other", [(20, 30)])
    refused(("predict", "photos", "other", "--out", "x"), "have the same name")
    (outputs / "broken.png").write_text("not a picture")
    refused(("predict", "broken.png", "--out", "x"), "broken.png is not an image file")
    refused(("predict", "missing.png", "--out", "x"), "no image or folder at missing.png")
    refused(("predict", "photos", "--out", "x", "--device", "banana"), "'banana' is not a device")
    refused(("predict", "photos", "--out", "x", "--size", "2x2"), "each side must be at least 4")
    Image.fromarray(np.zeros((20, 30), np.uint16)).save(outputs / "sixteen.png")
    refused(("predict", "sixteen.png", "--out", "x"), "expected an 8-bit RGB or grey PNG or JPEG")
    assert not (outputs / "x").exists()

    # A killed run's partial file is predict's own: the next run removes it.
    (outputs / "mine/notes.txt").unlink()
    (outputs / "mine/photo0.depth.png.partial").write_bytes(b"half")
    assert kdmtl("predict", "photos", "--out", "mine").exit_code == 0
    assert not (outputs / "mine/photo0.depth.png.partial").exists()
    assert (outputs / "mine/photo0.depth.png").is_file()


def test_export_gives_an_onnx_model_with_the_students_outputs(outputs: Path, monkeypatch):
    result = kdmtl("export", "--out", "student.onnx")
    assert result.exit_code == 0, result.output
    assert "ONNX Runtime agrees with PyTorch" in result.output
    model = onnx.load("student.onnx")
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    assert metadata["kdmtl.checkpoint_sha256"] == sha256_file(outputs / "models/student.pt")

    student, _ = load_student(outputs / "models/student.pt")
    images = torch.rand(5, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = student.eval()(images).predictions
    session = onnxruntime.InferenceSession("student.onnx", providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["semseg", "depth", "normal"]
    found = session.run(None, {"image": images.numpy()})
    for task, values in zip(["semseg", "depth", "normal"], found, strict=True):
        reference = expected[task].numpy()
        assert values.shape == reference.shape
        np.testing.assert_allclose(values, reference, atol=1e-4 * np.abs(reference).max())

    # An export that disagrees with PyTorch (here: any difference at all) is not written.
    before = Path("student.onnx").read_bytes()
    monkeypatch.setattr("stages.export.TOLERANCE", -1.0)
    refused(("export", "--out", "student.onnx"), "student.onnx is left as it was")
    assert Path("student.onnx").read_bytes() == before
    assert sorted(p.name for p in outputs.glob("student.onnx*")) == ["student.onnx"]
    monkeypatch.setattr("stages.export.TOLERANCE", TOLERANCE)

    # It replaces its own export, and nothing else.
    assert kdmtl("export", "--out", "student.onnx").exit_code == 0
    Path("notes.onnx").write_text("someone's")
    refused(("export", "--out", "notes.onnx"), "notes.onnx exists and is not an ONNX model")
    assert Path("notes.onnx").read_text() == "someone's"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--out", "model.pt"), "model.pt does not end in .onnx"),
        (("--out", "m.onnx", "--model", "features"), "features is a folder, not a checkpoint"),
        (("--out", "m.onnx", "--size", "3x40"), "3x40 is too small for models/student.pt"),
        (("--out", "m.onnx", "--size", "12"), "'12' is not HxW"),
    ],
)
def test_export_refuses_bad_arguments(outputs: Path, args: tuple[str, ...], message: str):
    refused(("export", *args), message)
    assert not Path("m.onnx").exists()

"""Shared fixtures: a tiny project folder with its params, and a runner for the `kdmtl` CLI."""

import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
import pytest
import yaml
from click.testing import CliRunner, Result

from stages.cli import main

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

TINY_PARAMS = {
    "data": {"num_train": 12, "num_test": 6, "height": 16, "width": 24, "chunk_size": 4},
    "model": {"filters": [4, 8]},
    "teacher": {"epochs": 2, "batch_size": 4},
    "student": {"epochs": 1, "batch_size": 4},
}


def write_params(folder: Path, params: dict, name: str = "params.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty project folder, made the current directory, with tiny params."""
    write_params(tmp_path, TINY_PARAMS)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(cwd)


def working_copy(source: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of the project `source`, made the current directory."""
    folder = tmp_path / "project"
    shutil.copytree(source, folder)
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def trained_copy(trained: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of the test module's `trained` project, made the current directory."""
    return working_copy(trained, tmp_path, monkeypatch)


def kdmtl(*args: str) -> Result:
    """Run the CLI in-process, as the console script would."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def refused(command: tuple[str, ...], *fragments: str) -> str:
    """Run `kdmtl COMMAND`; it must stop with exit status 2, no traceback, and a message holding
    every fragment. Returns the output."""
    result = kdmtl(*command)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    return result.output


def curve(folder: Path, name: str) -> dict[int, float]:
    """A curve that a training run logged with DVCLive, FOLDER/plots/metrics/NAME.tsv (NAME such
    as `train/loss`): epoch -> value."""
    lines = (folder / "plots/metrics" / f"{name}.tsv").read_text().splitlines()
    assert lines[0] == f"step\t{name.split('/')[-1]}", lines[0]
    return {int(step): float(value) for step, value in (line.split("\t") for line in lines[1:])}


def curve_names(folder: Path) -> set[str]:
    """The curves of a training run's DVCLive folder, as `train/NAME` and `test/NAME`."""
    root = folder / "plots/metrics"
    return {p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.tsv")}


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def run(*command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def copy_project(target: Path, changes: dict) -> None:
    """The repository's pipeline, with `changes` merged into each params section."""
    for name in ("pipeline", "stages", "schemas"):
        shutil.copytree(REPO / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", target / "dvc.yaml")
    write_repo_params(target, changes)


def write_repo_params(target: Path, changes: dict) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    (target / "params.yaml").write_text(yaml.safe_dump(params))


def dvc(*args: str, cwd: Path) -> str:
    result = run(sys.executable, "-m", "dvc", *args, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A real small disk at `folder` (a tmpfs of `size`, e.g. "16k"), to fill up. Mounting needs
    root, as the tests run here and in CI; a test that cannot mount one fails, never skips."""
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    mounted = subprocess.run(mount, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"`{' '.join(mount)}` failed (run the tests as root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        # Lazily: a file a failed writer left open must not keep the mount busy.
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    """A real S3 API on the loopback address: moto's standalone server, in its own process,
    stopped at the end of the session."""
    port = free_port()
    log = (tmp_path_factory.mktemp("s3") / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            assert server.poll() is None, f"the S3 server exited: see {log.name}"
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError(f"the S3 server did not answer at {endpoint} in 30 s")
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


S3_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "kdmtl-test",
    "AWS_SECRET_ACCESS_KEY": "kdmtl-test",
    "AWS_DEFAULT_REGION": "us-east-1",
    # No profile or configuration of this machine's user may change where requests go.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch, request) -> str:
    """A new, empty bucket on the test S3 server, as `s3://NAME`; the standard AWS environment
    points at the server, for this process and the ones it starts."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for key, value in S3_ENVIRONMENT.items():
        monkeypatch.setenv(key, value)
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    bucket = f"{name}-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3").mkdir(bucket)
    return f"s3://{bucket}"


OUTPUT_PARAMS = TINY_PARAMS | {"teacher": {"epochs": 1, "batch_size": 4}}


@pytest.fixture(scope="session")
def pipeline_outputs(tmp_path_factory) -> Path:
    """A tiny project run through the whole pipeline once: prepared data, three teachers, their
    feature stores and a kd student. Tests work on copies (`outputs`)."""
    folder = tmp_path_factory.mktemp("outputs")
    write_params(folder, OUTPUT_PARAMS)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        steps = [["prepare"]]
        for task in ("semseg", "depth", "normal"):
            steps.append(["train-teacher", "--teacher", task])
            steps.append(["extract-features", "--teacher", task])
        for step in [*steps, ["train-student"]]:
            result = kdmtl(*step)
            assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)
    return folder


@pytest.fixture
def outputs(pipeline_outputs: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of `pipeline_outputs`, made the current directory."""
    return working_copy(pipeline_outputs, tmp_path, monkeypatch)


KILLED = """
import os, signal, sys, importlib
owner = importlib.import_module({module!r})
*path, name = {name!r}.split(".")
for part in path:
    owner = getattr(owner, part)
original = getattr(owner, name)
calls = []
def dies(*args, **kwargs):
    if {when}:
        calls.append(args)
        if len(calls) == {nth}:
            os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(owner, name, dies)
from stages.cli import main
sys.argv = ["kdmtl", *sys.argv[1:]]
main()
"""


def killed(cwd: Path, target: str, *command: str, nth: int = 1, when: str = "True") -> None:
    """Run `kdmtl COMMAND` and SIGKILL it before the nth call of `target` ("module:name") for
    which `when` (an expression of `args`) holds."""
    module, name = target.split(":")
    code = KILLED.format(module=module, name=name, nth=nth, when=when)
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == -9, run.stdout + run.stderr

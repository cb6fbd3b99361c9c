"""Stores in object storage: every command on `s3://` paths, against a real S3 API (moto's server
on the loopback address, `conftest.s3_endpoint`), configured by the standard AWS environment only;
and `inspect` and `verify` on a dask.distributed cluster."""

import json
import os
import socket
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
import zarr
from conftest import OUTPUT_PARAMS, kdmtl, killed, refused, write_params
from distributed import LocalCluster, get_worker
from s3fs import S3FileSystem

from pipeline.store import features
from pipeline.store.features import FeatureStore
from pipeline.store.location import store_path
from pipeline.store.prepared import open_prepared
from stages import common

TASKS = ("semseg", "depth", "normal")


def on_s3(bucket: str, prepared: bool = True, **changes: dict) -> dict:
    """The outputs' params with the feature stores, and with `prepared` the prepared data, in
    `bucket` (the teachers and the student stay local), and `changes` merged into their
    sections."""
    params = {**OUTPUT_PARAMS, "paths": {"features": f"{bucket}/features"}}
    if prepared:
        params["paths"]["prepared"] = f"{bucket}/data/prepared.zarr"
    for section, values in changes.items():
        params[section] = {**params.get(section, {}), **values}
    write_params(Path.cwd(), params)
    return params


def objects(url: str) -> list[str]:
    path = store_path(url)
    root = path.path.rstrip("/")
    return sorted(name[len(root) + 1 :] for name in path.fs.find(root))


def arrays(url: str, split: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(url, mode="r")[split]
    return {name: group[name][:] for name in sorted(group.array_keys())}


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.fixture
def cluster(s3_bucket: str) -> str:
    """A dask.distributed cluster of two worker processes on this machine, started once the
    AWS environment points at the test server (its workers read the stores themselves)."""
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as local:
        yield local.scheduler_address


def test_the_pipeline_on_s3_stores_gives_what_it_gives_on_local_ones(
    outputs: Path, s3_bucket: str, cluster: str
):
    on_s3(s3_bucket, paths={"student": "models/student_s3.pt"})
    assert kdmtl("prepare").exit_code == 0
    prepared = f"{s3_bucket}/data/prepared.zarr"
    local = open_prepared(outputs / "data/prepared.zarr")
    remote = open_prepared(store_path(prepared))
    assert remote.manifest.fingerprint == local.manifest.fingerprint
    for split in ("train", "test"):
        held, expected = arrays(str(remote.path), split), arrays("data/prepared.zarr", split)
        assert held.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(held[name], expected[name])
    for task in TASKS:
        result = kdmtl("extract-features", "--teacher", task)
        assert result.exit_code == 0, result.output
        assert f"{s3_bucket}/features/{task}.zarr: wrote 1 shards" in result.output
        held = arrays(f"{s3_bucket}/features/{task}.zarr", "train")
        expected = arrays(f"features/{task}.zarr", "train")
        for name in expected:  # the same bytes, decoded: `written` records the same digests
            np.testing.assert_array_equal(held[name], expected[name])
    # The student streams from S3 and is the one trained from the local stores.
    result = kdmtl("train-student")
    assert result.exit_code == 0, result.output
    trained, expected = (
        state(outputs / "models/student_s3.pt"),
        state(outputs / "models/student.pt"),
    )
    assert trained.keys() == expected.keys()
    for name in expected:
        assert torch.equal(trained[name], expected[name]), name
    # inspect and verify read from S3, and find what they find locally; on a dask cluster too.
    url = f"{s3_bucket}/features/depth.zarr"
    remote = json.loads(kdmtl("inspect", url, "--json").output)
    local = json.loads(kdmtl("inspect", "features/depth.zarr", "--json").output)
    assert remote.pop("path") == url and local.pop("path") == "features/depth.zarr"
    assert remote == local
    for store in (url, "features/normal.zarr"):
        there = kdmtl("inspect", store, "--json", "--scheduler", cluster)
        assert there.exit_code == 0 and json.loads(there.output) == json.loads(
            kdmtl("inspect", store, "--json").output
        )
    for store, checked in ((url, "recomputed 4 sample views"), (prepared, "20 chunk files")):
        here = kdmtl("verify", store)
        there = kdmtl("verify", store, "--scheduler", cluster)
        assert here.exit_code == there.exit_code == 0 and checked in here.output
        assert there.output == here.output
    # Nothing but the stores was written to the bucket: no work folders are left.
    assert {name.split("/")[0] for name in objects(s3_bucket)} == {"data", "features"}
    assert {name.split("/")[1] for name in objects(s3_bucket) if name.startswith("features")} == {
        f"{task}.zarr" for task in TASKS
    }
    # Damage found on the cluster is the damage found here.
    path = store_path(url)
    shard = next(n for n in objects(url) if n.startswith("train/bottleneck/c/"))
    body = path.fs.cat_file(f"{path.path}/{shard}")
    path.fs.pipe_file(f"{path.path}/{shard}", body[:-8] + bytes(8))  # same size, other bytes
    here = kdmtl("verify", url)
    there = kdmtl("verify", url, "--scheduler", cluster)
    assert here.exit_code == there.exit_code == 1
    assert there.output == here.output
    assert f"{url}/{shard} differs from what was written (sha256)" in there.output
    refused(
        ("inspect", url, "--scheduler", "tcp://127.0.0.1:9"),
        "cannot reach a dask scheduler at tcp://127.0.0.1:9",
    )


def test_an_extraction_to_s3_resumes_after_a_kill_and_mends_damage(outputs: Path, s3_bucket):
    on_s3(s3_bucket, prepared=False, features={"shard_chunks": 1})  # three shards
    url = f"{s3_bucket}/features/depth.zarr"
    # Killed after writing the second shard's arrays, before recording them as written.
    killed(
        outputs,
        "pipeline.store.features:FeatureStore.mark_done",
        "extract-features",
        "--teacher",
        "depth",
        nth=2,
    )
    store = FeatureStore.open(store_path(url))
    assert store.done_shards() == {0} and not store.manifest.complete
    result = kdmtl("verify", url)
    assert result.exit_code == 1 and "incomplete: 1 of 3 shards written" in result.output
    assert "out of order" not in result.output  # shards not written are not read
    result = kdmtl("extract-features", "--teacher", "depth")
    assert result.exit_code == 0, result.output
    assert "wrote 2 shards (8 samples" in result.output and "the store is complete" in result.output
    assert kdmtl("verify", url).exit_code == 0
    assert not [name for name in objects(s3_bucket) if ".creating-" in name]
    # A shard deleted from the bucket, and another truncated, are found at opening, and
    # extraction writes them again (zarr reads a shard file it writes over: the damaged one
    # goes first).
    fs, root = store.path.fs, store.path.path
    deleted = next(name for name in objects(url) if name.startswith("train/decoder/c/1/"))
    truncated = next(name for name in objects(url) if name.startswith("train/decoder/c/2/"))
    fs.rm_file(f"{root}/{deleted}")
    fs.pipe_file(f"{root}/{truncated}", fs.cat_file(f"{root}/{truncated}")[:100])
    refused(("inspect", url), f"feature store {url} is damaged: {url}/{deleted} is missing")
    result = kdmtl("verify", url)
    assert result.exit_code == 1 and f"{url}/{deleted} is missing" in result.output
    assert f"{url}/{truncated} has 100 bytes" in result.output
    result = kdmtl("extract-features", "--teacher", "depth")
    assert result.exit_code == 0
    assert "wrote 2 shards, 2 of them damaged before (8 samples" in result.output
    assert kdmtl("verify", url).exit_code == 0


def test_a_process_of_several_waits_for_a_store_another_is_copying_into_s3(
    outputs: Path, s3_bucket: str, monkeypatch
):
    """Object storage has no rename: the store another --shard-of process made is copied into
    place, its manifest first. Found halfway, it is waited for, not refused or deleted."""
    on_s3(s3_bucket, prepared=False)
    assert kdmtl("extract-features", "--teacher", "depth").exit_code == 0
    store = store_path(f"{s3_bucket}/features/depth.zarr")
    made = store_path(f"{s3_bucket}/made").path  # where the other process built it
    fs, names = store.fs, objects(str(store))
    fs.copy([f"{store.path}/{n}" for n in names], [f"{made}/{n}" for n in names])

    def copying_into_place() -> threading.Thread:
        """The manifest is in place; the thread copies the rest when started."""
        fs.rm(store.path, recursive=True)
        fs.copy(f"{made}/zarr.json", f"{store.path}/zarr.json")
        rest = [n for n in names if n != "zarr.json"]

        def copy_rest() -> None:
            time.sleep(3)
            fs.copy([f"{made}/{n}" for n in rest], [f"{store.path}/{n}" for n in rest])

        return threading.Thread(target=copy_rest)

    copy = copying_into_place()
    copy.start()
    result = kdmtl("extract-features", "--teacher", "depth", "--shard-of", "0/2")
    copy.join()
    assert result.exit_code == 0, result.output
    assert "wrote 0 shards" in result.output and "the store is complete" in result.output
    assert kdmtl("verify", str(store)).exit_code == 0
    # A copy that never ends (its process killed) is refused after the wait, and left alone.
    monkeypatch.setattr(features, "SHARED_STORE_WAIT_S", 2.0)
    copying_into_place()
    refused(
        ("extract-features", "--teacher", "depth", "--shard-of", "1/2"),
        f"feature store {store} (still, after waiting 2 s for another process's copy) is damaged: ",
        "extract with one process, without --shard-of, which makes it anew",
    )
    assert objects(str(store)) == ["zarr.json"]
    result = kdmtl("extract-features", "--teacher", "depth")
    assert result.exit_code == 0 and "wrote 1 shards (12 samples" in result.output, result.output


def test_an_interrupted_copy_into_s3_is_refused_then_replaced(outputs: Path, s3_bucket):
    # Object storage has no rename: a store is copied into place. Killed midway, the copy holds
    # the manifest and some of the files: readers refuse it, and the rerun replaces it.
    on_s3(s3_bucket)
    url = f"{s3_bucket}/data/prepared.zarr"
    killed(
        outputs,
        "s3fs.core:S3FileSystem._cp_file",
        "prepare",
        when="'zarr.json' not in str(args[1])",  # after the manifest, before the chunks
    )
    assert "zarr.json" in objects(url) and len(objects(url)) == 1
    refused(("train-teacher", "--teacher", "depth"), f"the prepared data is damaged: {url}/")
    result = kdmtl("verify", url)
    assert result.exit_code == 1 and "is missing" in result.output
    # The killed run's work copy is this host's and its process is gone: the rerun removes it.
    # Another host's is left alone (its process id says nothing here).
    ours = [name for name in objects(s3_bucket) if f".partial-{os.uname().nodename}-" in name]
    assert ours
    theirs = "data/prepared.zarr.partial-elsewhere-999999999/zarr.json"
    store_path(s3_bucket).fs.pipe_file(f"{s3_bucket}/{theirs}", b"{}")
    assert kdmtl("prepare").exit_code == 0
    assert open_prepared(store_path(url)).problems(full=True) == []
    assert [name for name in objects(s3_bucket) if ".partial-" in name] == [theirs]


def test_kdmtl_writes_only_over_its_own_stores_in_s3(outputs: Path, s3_bucket):
    on_s3(s3_bucket)
    someone = store_path(f"{s3_bucket}/data/prepared.zarr")
    someone.fs.pipe_file(f"{someone.path}/notes.txt", b"mine")
    refused(("prepare",), f"{someone} exists and is not a readable kdmtl store")
    assert objects(str(someone)) == ["notes.txt"]
    # A store inside another store is refused, as is a store that is a whole bucket.
    on_s3(s3_bucket, paths={"features": f"{s3_bucket}/data/prepared.zarr/features"})
    someone.fs.rm_file(f"{someone.path}/notes.txt")
    assert kdmtl("prepare").exit_code == 0
    refused(("extract-features", "--teacher", "depth"), "lies inside the Zarr store")
    on_s3(s3_bucket, paths={"prepared": s3_bucket})
    refused(("prepare",), f"{s3_bucket}/ is a whole bucket; a store is a folder in one")


def test_unreachable_or_misconfigured_object_storage_is_one_message(
    outputs: Path, s3_bucket: str, monkeypatch
):
    store = f"{s3_bucket}/features/depth.zarr"
    refused(("inspect", "s3://no-such-bucket-kdmtl/depth.zarr"), "there is no bucket")
    refused(("inspect", store), f"no feature store at {store}: run `kdmtl extract-features")
    refused(("inspect", "nosuch://bucket/x.zarr"), "is not a path kdmtl can open")
    refused(("inspect", f"{s3_bucket}//features/depth.zarr"), "has an empty part (//)")
    on_s3("s3://no-such-bucket-kdmtl")
    refused(("train-teacher", "--teacher", "depth"), "there is no bucket 'no-such-bucket-kdmtl'")

    # An S3 client reads its environment when it is made: these cases make their own.
    for environment, message in (
        (
            {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
            "Unable to locate credentials",
        ),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "Could not connect to the endpoint URL"),
    ):
        with monkeypatch.context() as changed:
            changed.setenv("AWS_MAX_ATTEMPTS", "1")
            for key, value in environment.items():
                if value is None:
                    changed.delenv(key)
                else:
                    changed.setenv(key, value)
            S3FileSystem.clear_instance_cache()
            try:
                refused(("inspect", store), f"cannot reach the object store: {message}")
            finally:
                S3FileSystem.clear_instance_cache()


def test_a_scheduler_that_does_not_answer_or_has_no_workers_is_one_message(
    outputs: Path, monkeypatch
):
    monkeypatch.setattr(common, "SCHEDULER_TIMEOUT", 1)
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        refused(
            ("inspect", "features/depth.zarr", "--scheduler", address),
            f"cannot reach a dask scheduler at {address} (no answer in 6 s)",
        )
        # The client it left connecting does not make dask's work of this process go to it.
        assert dask.config.get("scheduler", None) is None
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as empty:
        refused(
            ("verify", "features/depth.zarr", "--scheduler", empty.scheduler_address),
            f"the dask scheduler at {empty.scheduler_address} has no workers after 1 s",
        )
    assert dask.config.get("scheduler", None) is None
    assert dask.compute(dask.delayed(sum)([1, 2])) == (3,)


def test_dask_work_runs_on_the_cluster_within_the_block_and_here_after_it():
    def where() -> str:
        try:
            return get_worker().address
        except ValueError:  # not on a worker
            return "here"

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as local,
        common.dask_scheduler(local.scheduler_address),
    ):
        (worker,) = local.workers.values()
        assert dask.compute(dask.delayed(where)()) == (worker.address,)
    assert dask.config.get("scheduler", None) is None
    assert dask.compute(dask.delayed(where)()) == ("here",)


def test_a_local_path_written_as_a_file_url_is_a_local_path(tmp_path: Path):
    path = store_path(f"file://{tmp_path}/prepared.zarr")
    assert isinstance(path, Path) and path == tmp_path / "prepared.zarr"
    assert isinstance(store_path("features"), Path)

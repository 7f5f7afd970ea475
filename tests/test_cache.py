"""The artifact cache: keys follow dependencies, writes are atomic, damage is detected and repaired."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from lib.io import cache as C
from lib.io.profiles import load_profile
from lib.steps.study import Study


@pytest.fixture
def cache(tmp_path):
    logs = []
    c = C.Cache(tmp_path / "cache", log=logs.append)
    c.logs = logs
    return c


def _tensor_build(value, calls):
    def build(out):
        calls.append(value)
        C.save_tensors(out / "w.safetensors", {"w": torch.full((64, 64), float(value))})

    return build


def test_reuse_and_log(cache):
    calls = []
    a = cache.get("thing", {"v": 1}, _tensor_build(1, calls))
    b = cache.get("thing", {"v": 1}, _tensor_build(1, calls))
    assert a == b and calls == [1]
    assert cache.logs[0].startswith("[cache] computed thing") and cache.logs[1].startswith("[cache] reused thing")
    assert C.load_tensors(b / "w.safetensors")["w"][0, 0] == 1


def test_changing_a_setting_recomputes_only_downstream(cache):
    """up -> down: changing down's setting rebuilds down only; changing up's rebuilds both."""
    calls = []

    def run(up_v, down_v):
        up = cache.get("up", {"v": up_v}, _tensor_build(up_v, calls))
        return cache.get("down", {"v": down_v}, _tensor_build(100 + down_v, calls), deps=[up])

    run(1, 1)
    assert calls == [1, 101]
    run(1, 2)
    assert calls == [1, 101, 102]  # up reused
    run(2, 2)
    assert calls == [1, 101, 102, 2, 102]  # up changed: down rebuilt although its own setting did not change
    run(1, 1)
    assert calls == [1, 101, 102, 2, 102]  # everything seen before is reused


def test_profile_value_changes_only_dependent_artifacts(cache, tmp_path):
    """A real step: the world census depends on `world.*` and `seed`, not on the profile's description."""
    P = load_profile("tiny")
    _ = Study(P, cache).census
    other = P.__class__(**{**P.__dict__, "description": "changed"})
    _ = Study(other, cache).census
    assert [e["event"] for e in cache.events] == ["computed", "reused"]
    world = P.world.__class__(**{**P.world.__dict__, "n_census": P.world.n_census + 72})
    _ = Study(P.__class__(**{**P.__dict__, "world": world}), cache).census
    assert [e["event"] for e in cache.events] == ["computed", "reused", "computed"]
    assert len({e["key"] for e in cache.events}) == 2


def test_truncated_artifact_is_detected_and_recomputed(cache):
    calls = []
    art = cache.get("thing", {}, _tensor_build(3, calls))
    f = art / "w.safetensors"
    f.write_bytes(f.read_bytes()[:100])  # truncate
    art2 = cache.get("thing", {}, _tensor_build(3, calls))
    assert calls == [3, 3]
    assert any("corrupt thing" in m and "truncated" in m for m in cache.logs)
    assert C.load_tensors(art2 / "w.safetensors")["w"].shape == (64, 64)


def test_corrupted_bytes_same_size_are_detected(cache):
    calls = []
    art = cache.get("thing", {}, _tensor_build(3, calls))
    f = art / "w.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    cache.get("thing", {}, _tensor_build(3, calls))
    assert calls == [3, 3] and any("checksum" in m for m in cache.logs)


def test_failed_build_leaves_nothing(cache):
    def build(out):
        (out / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.get("thing", {}, build)
    assert list(cache.root.iterdir()) == []


def test_killed_write_leaves_nothing_that_reads_as_valid(tmp_path):
    """SIGKILL a process in the middle of writing an artifact: no published artifact, and the next run rebuilds."""
    root = tmp_path / "cache"
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import time, torch
        from pathlib import Path
        from lib.io import cache as C
        def build(out):
            C.save_tensors(out / "a.safetensors", {{"w": torch.ones(1000)}})
            Path({str(marker)!r}).write_text("started")
            time.sleep(60)  # killed here, half-way through the artifact
        C.Cache({str(root)!r}).get("slow", {{}}, build)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parent.parent)
    for _ in range(600):
        if marker.exists():
            break
        proc.poll()
        assert proc.returncode is None, "writer exited early"
        import time

        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    published = [p for p in root.iterdir() if not p.name.startswith(".tmp-")]
    assert published == []
    logs, calls = [], []
    c = C.Cache(root, log=logs.append)
    c.get("slow", {}, _tensor_build(5, calls))
    assert calls == [5] and logs[0].startswith("[cache] computed slow")
    assert c.clean_tmp() == 1


def test_tables_and_json_round_trip(cache):
    df = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})

    def build(out):
        C.save_table(out / "t.parquet", df)
        return {"metric": 0.5}

    art = cache.get("table", {}, build)
    pd.testing.assert_frame_equal(C.load_table(art / "t.parquet"), df)
    assert C.load_json(art / "info.json") == {"metric": 0.5}


def test_committed_store_is_read_after_the_local_cache_and_never_modified(tmp_path):
    store, calls, logs = tmp_path / "artifacts", [], []
    writer = C.Cache(store, log=lambda m: None, stores=())
    art = writer.get("thing", {"v": 1}, _tensor_build(1, calls))
    c = C.Cache(tmp_path / "local", log=logs.append, stores=(store,))
    assert c.get("thing", {"v": 1}, _tensor_build(1, calls)).path == art.path
    assert calls == [1] and "from artifacts/" in logs[-1]
    # a damaged committed artifact is reported and rebuilt locally, the committed copy is left as it is
    f = art / "w.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    rebuilt = c.get("thing", {"v": 1}, _tensor_build(1, calls))
    assert calls == [1, 1] and rebuilt.path.parent == tmp_path / "local" and f.stat().st_size == 50

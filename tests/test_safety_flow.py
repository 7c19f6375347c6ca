"""Content-addressed stage keys in the flow (issue 14): a recomputed stage that produces the same content leaves
every downstream key, and so every downstream artifact, as it was."""

from __future__ import annotations

from pathlib import Path

from tests.test_flow import (
    STAGES,
    code_snapshot,
    corpus,
    prefect_home,
    prefect_server,
    run_flow,
    s3_server,
    tiny_config,
)

__all__ = ["code_snapshot", "corpus", "prefect_home", "prefect_server", "s3_server"]  # the fixtures this module uses


def test_deleted_mid_pipeline_manifest_recomputes_only_that_stage(prefect_home, corpus, code_snapshot, tmp_path):
    """Before: deleting layer-wise's manifest gave CPT, KD, LRC, export and eval new keys and they retrained."""
    root = tmp_path / "artifacts"
    cfg = tiny_config(corpus, str(root))
    first, states, _ = run_flow(cfg)
    assert states == {s: "Completed" for s in STAGES}, states
    layerwise = Path(first.row("layerwise").uri.removeprefix("file://"))
    (layerwise / "manifest.json").unlink()

    second, states, _ = run_flow(cfg)
    assert states == {**{s: "Cached" for s in STAGES}, "layerwise": "Completed"}, states
    assert {r.stage: r.uri for r in second.stages} == {r.stage: r.uri for r in first.stages}
    assert (layerwise / "manifest.json").is_file()


def test_object_store_lock_is_a_conditional_write(s3_server):
    """On s3:// the per-key lock is an object created only if absent (If-None-Match: *): a second holder is
    refused with a clear message; a lock left by a killed run goes stale and is broken."""
    import json
    import time

    import pytest
    import s3fs

    from tasks.artifacts import ArtifactLockedError, ArtifactStore, _RemoteLock

    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    fs.mkdir("locks")
    store = ArtifactStore("s3://locks/runs", {"endpoint_url": s3_server})
    with store.lock("kd", "abc"):
        assert fs.exists("locks/runs/kd/.abc.lock")
        with pytest.raises(ArtifactLockedError, match=r"s3://locks/runs/kd/abc is being computed by another run"):
            with store.lock("kd", "abc"):
                pass
    assert not fs.exists("locks/runs/kd/.abc.lock")
    stale = {"owner": "killed:1", "time": time.time() - 2 * _RemoteLock.stale_s}
    fs.pipe_file("locks/runs/kd/.abc.lock", json.dumps(stale).encode())
    with store.lock("kd", "abc"):  # the stale lock of a killed run is broken
        assert json.loads(fs.cat_file("locks/runs/kd/.abc.lock"))["owner"] != "killed:1"

"""Content-addressed stage keys in the flow (issue 14): a recomputed stage that produces the same content leaves
every downstream key, and so every downstream artifact, as it was."""

from __future__ import annotations

from pathlib import Path

from tests.test_flow import STAGES, code_snapshot, corpus, prefect_home, prefect_server, run_flow, tiny_config

__all__ = ["code_snapshot", "corpus", "prefect_home", "prefect_server"]  # the fixtures this module uses


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

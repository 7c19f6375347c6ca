"""MLflow records every attempt of every stage (issue #22, item 1): failed, refused, crashed and killed attempts get
nested runs with their error, tokens and wall time; parents are closed when Prefect marks the state; tokens count
what the attempt trained; eval names the split it read; a cache hit logs no new model; a retried stage replaces its
progress artifact. Real MLflow (sqlite) and a real Prefect server throughout."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bitdistill-prefect-"))
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

from tasks.artifacts import ArtifactRef, ArtifactStore  # noqa: E402
from tasks.tracking import TAG, Lineage, TrackingConfig  # noqa: E402

LOG = logging.getLogger("test-lineage")


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def _lineage(tmp_path: Path, flow_run: str = "flow-a", **kw: Any) -> tuple[Lineage, Any]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lineage = Lineage(TrackingConfig(uri=uri), ArtifactStore(str(tmp_path / "artifacts")), "smoke", flow_run,
                      flow_run, {}, LOG, **kw)
    assert lineage.client is not None
    return lineage, MlflowClient(tracking_uri=uri)


def _children(client: Any, parent: str) -> dict[str, Any]:
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    return {r.data.tags[f"{TAG}.stage"]: r for r in runs}


def _duration_s(run: Any) -> float:
    return (run.info.end_time - run.info.start_time) / 1000


# ------------------------------------------------------------------------------------ failed / refused stages
def test_failed_stage_is_a_failed_nested_run_with_error_tokens_and_wall(tmp_path):
    lineage, client = _lineage(tmp_path)
    started = time.time()
    listener = lineage.begin("cpt", started)
    assert listener is not None
    assert client.get_run(lineage.open["cpt"].run_id).info.status == "RUNNING"  # a killed attempt leaves a run
    listener({"step": 10.0, "tokens": 2560.0, "loss": 5.5})
    lineage.stage_failed("cpt", "cpt: RuntimeError: boom\n  at line 3", wall_s=1.5, started=started)
    lineage.stage_failed("kd", "kd: ArtifactError: refused", wall_s=0.0)  # refused before it started
    lineage.finish({"stages": []}, None, None, failed=True, error="stage cpt: RuntimeError: boom")

    runs = _children(client, lineage.parent)
    cpt, kd = runs["cpt"], runs["kd"]
    assert cpt.info.status == kd.info.status == "FAILED"
    assert cpt.data.tags["error"] == "cpt: RuntimeError: boom at line 3"  # one line
    assert kd.data.tags["error"] == "kd: ArtifactError: refused"
    assert cpt.data.metrics["tokens"] == 2560 and cpt.data.metrics["stage_wall_s"] == 1.5
    assert cpt.data.metrics["progress/step"] == 10
    assert abs(_duration_s(cpt) - 1.5) < 0.01
    parent = client.get_run(lineage.parent)
    assert parent.info.status == "FAILED" and parent.data.tags["error"] == "stage cpt: RuntimeError: boom"


def test_failed_and_refused_stages_of_real_flow_runs(prefect_server, tmp_path):
    """A corpus that does not exist (refused before the task) and an eval-only run with nothing finished (refused
    by the task): each failing stage has a FAILED nested run with the flow's error, the parent the same error."""
    from mlflow import MlflowClient

    from flows.bitdistill import bitdistill, bitdistill_eval_only

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = {"store": {"root": str(tmp_path / "artifacts")}, "tracking": {"uri": uri}}
    bad = {**base, "world": {"source": {"kind": "dir", "path": str(tmp_path / "no-such-corpus"), "glob": "*.txt"}}}
    client = MlflowClient(tracking_uri=uri)
    for flow, config in ((bitdistill, bad), (bitdistill_eval_only, base)):
        state = flow(config=config, preset="smoke", return_state=True)
        assert state.is_failed()
        flow_run = state.state_details.flow_run_id
        parent = client.search_runs([client.get_experiment_by_name("bitdistill").experiment_id],
                                    filter_string=f"tags.`{TAG}.prefect_flow_run_id` = '{flow_run}'")
        assert len(parent) == 1 and parent[0].info.status == "FAILED"
        assert parent[0].data.tags["error"] == state.message, (parent[0].data.tags, state.message)
        world = _children(client, parent[0].info.run_id)["world"]
        assert world.info.status == "FAILED" and state.message == f"stage {world.data.tags['error']}"
        assert world.data.metrics["tokens"] == 0 and world.info.end_time >= world.info.start_time
    assert "no-such-corpus" in world.data.tags["error"] or "reuse-only" in world.data.tags["error"]


def test_each_prefect_retry_of_a_stage_is_its_own_run(prefect_server, tmp_path, monkeypatch):
    """A stage whose first attempt fails and whose Prefect retry succeeds: two nested runs, FAILED (its error) and
    FINISHED, one after the other."""
    from mlflow import MlflowClient

    from bitnet.stages import STAGES
    from flows.bitdistill import bitdistill
    from flows.config import PipelineConfig

    real, calls = STAGES["world"], []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated worker loss\nin world")
        return real.run(*args, **kwargs)

    monkeypatch.setitem(STAGES, "world", dataclasses.replace(real, run=flaky))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    later = {name: {"enabled": False} for name in PipelineConfig.stage_names() if name != "world"}
    config = {"store": {"root": str(tmp_path / "artifacts")}, "tracking": {"uri": uri},
              "world": {"retries": 1, "retry_delay_s": 0}, **later}
    assert bitdistill(config=config, preset="smoke", return_state=True).is_completed()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("bitdistill").experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`{TAG}.stage` = 'world'",
                              order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"] and len(calls) == 2
    failed, done = runs
    assert failed.data.tags["error"] == "world: RuntimeError: simulated worker loss in world"
    assert failed.info.end_time <= done.info.start_time
    assert failed.data.metrics["stage_wall_s"] == pytest.approx(_duration_s(failed), abs=0.01)
    assert done.data.metrics["stage_wall_s"] == pytest.approx(_duration_s(done), abs=0.01)
    assert done.data.tags["mlflow.parentRunId"] == failed.data.tags["mlflow.parentRunId"]


# ------------------------------------------------------------------------------------ crashed / killed
class Kill(BaseException):
    """Stands for the process being terminated mid-stage (a BaseException: Prefect marks the run Crashed)."""


def test_crashed_flow_closes_its_runs_when_prefect_marks_the_state(prefect_server, tmp_path, monkeypatch):
    """The on_crashed hook closes the parent and the stage it was in as KILLED at the Crashed state's time, with
    the tokens the killed attempt had trained; nothing is left RUNNING for the next run to find."""
    from mlflow import MlflowClient

    from bitnet.stages import STAGES
    from flows.bitdistill import bitdistill

    def killed_mid_training(cfg: Any, inputs: Any, out: Path, *args: Any, **kwargs: Any) -> Any:
        train = out / "train"
        train.mkdir(parents=True, exist_ok=True)
        with (train / "metrics.jsonl").open("a") as f:  # what bitnet.trainer appends per logged step
            for step in (1, 2, 3):
                f.write(json.dumps({"step": step, "loss": 6.0 - step, "tokens": step * 512}) + "\n")
        time.sleep(1.0)
        raise Kill()

    monkeypatch.setitem(STAGES, "teacher", dataclasses.replace(STAGES["teacher"], run=killed_mid_training))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = {"store": {"root": str(tmp_path / "artifacts")}, "tracking": {"uri": uri}}
    with pytest.raises(Kill):
        bitdistill(config=config, preset="smoke")
    t_crash = time.time()

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("bitdistill").experiment_id
    (parent,) = client.search_runs([exp], filter_string=f"tags.`{TAG}.preset` = 'smoke'")
    flow_run_id = parent.data.tags[f"{TAG}.prefect_flow_run_id"]
    state = _flow_run_state(flow_run_id)
    assert state["type"] == "CRASHED", state
    crashed_ms = _epoch_ms(state["timestamp"])
    assert parent.info.status == "KILLED" and parent.data.tags["error"].startswith("Crashed: ")
    assert abs(parent.info.end_time - crashed_ms) < 5 and parent.info.end_time <= t_crash * 1000
    stages = _children(client, parent.info.run_id)
    assert stages["world"].info.status == "FINISHED"
    teacher = stages["teacher"]
    assert teacher.info.status == "KILLED" and teacher.info.end_time == parent.info.end_time
    assert teacher.data.metrics["tokens"] == 3 * 512  # what the killed attempt trained
    assert teacher.data.metrics["stage_wall_s"] == pytest.approx(_duration_s(teacher), abs=0.01)
    assert teacher.data.metrics["stage_wall_s"] >= 1.0


def _flow_run_state(flow_run_id: str) -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)  # type: ignore[arg-type]
    assert run.state is not None
    return {"type": run.state.type.value, "timestamp": run.state.timestamp}


def _epoch_ms(ts: Any) -> int:
    return int(ts.timestamp() * 1000)


def test_flows_close_their_lineage_on_cancellation_crash_and_failure():
    from flows.bitdistill import bitdistill, bitdistill_eval_only
    from flows.runner import close_lineage

    for fn in (bitdistill, bitdistill_eval_only):
        assert fn.on_cancellation_hooks == fn.on_crashed_hooks == fn.on_failure_hooks == [close_lineage]


def test_sigkilled_attempt_is_closed_at_its_last_sign_of_life(tmp_path):
    """A SIGKILL that no hook saw: the retry closes the dead attempt's runs as KILLED at their last progress
    metric, not at the time it finds them, so their durations stop where the process died."""
    killed, client = _lineage(tmp_path)
    listener = killed.begin("cpt", time.time())
    assert listener is not None
    listener({"step": 10.0, "tokens": 2560.0})
    died = time.time() * 1000
    time.sleep(1.5)
    retry, _ = _lineage(tmp_path, attempt=2)
    parent, cpt = client.get_run(killed.parent), client.get_run(killed.open["cpt"].run_id)
    assert parent.info.status == cpt.info.status == "KILLED"
    assert cpt.info.end_time == parent.info.end_time and abs(cpt.info.end_time - died) < 50
    assert cpt.data.metrics["tokens"] == 2560 and cpt.data.tags["error"] == "its flow run's process was killed"
    assert client.get_run(retry.parent).info.status == "RUNNING"


# ------------------------------------------------------------------------------------ tokens, splits, models
def test_tokens_count_what_the_attempt_trained(tmp_path):
    """A CPT of 40 steps resumed from step 10: the attempt trained 30 steps' tokens (the trainer's own count, or
    the share of steps after the checkpoint), a cache hit none; the progress reporter says the same while it runs."""
    from tasks.mlflow_records import attempt_tokens
    from tasks.progress import TrainProgress, listening

    per_step = 4 * 64
    resumed = {"steps": 40, "tokens": 40 * per_step, "resumed_from": 10, "wall_s": 3.0,
               "tokens_per_s": 30 * per_step / 3.0}
    assert attempt_tokens(resumed) == 30 * per_step
    assert attempt_tokens({**resumed, "tokens_per_s": None}) == 30 * per_step
    assert attempt_tokens({"steps": 40, "tokens": 40 * per_step, "resumed_from": None}) == 40 * per_step

    train = tmp_path / "train"
    ckpt = train / "checkpoints" / f"step-{10:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer.json").write_text(json.dumps({"step": 10, "tokens": 10 * per_step}))
    heard: list[dict[str, float]] = []
    with listening(heard.append), TrainProgress("cpt", train / "metrics.jsonl", 40, LOG, interval=60,
                                                artifact=False):
        time.sleep(0.01)  # the trainer rewrites the history it resumed from, then appends its steps
        (train / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 1.0, "tokens": s * per_step}) + "\n" for s in range(1, 41)))
    assert heard == [{"step": 40.0, "tokens": 30.0 * per_step, "loss": 1.0}]


def test_eval_inputs_name_the_split_it_read_and_a_cache_hit_logs_no_model(tmp_path):
    from tasks.artifacts import Manifest
    from tasks.mlflow_records import splits_read

    def manifest(stage: str, config: dict[str, Any]) -> Manifest:
        return Manifest(stage=stage, key="k", files={}, config=config)

    assert splits_read(manifest("eval", {"split": "test"})) == (("test", "evaluation"),)
    assert splits_read(manifest("eval", {"split": "validation"})) == (("validation", "evaluation"),)
    assert [s for s, _ in splits_read(manifest("cpt", {}))] == ["train", "validation"]

    student = ArtifactRef(uri=f"file://{tmp_path}/artifacts/lrc/k", sha256="ab" * 32, stage="lrc", key="k")
    for flow_run in ("first", "cached"):
        lineage, client = _lineage(tmp_path, flow_run)
        lineage.finish({"stages": []}, student, None)
    models = client.search_logged_models(experiment_ids=[lineage.experiment_id])
    assert len(models) == 1 and models[0].tags[f"{TAG}.manifest_sha256"] == student.sha256


# ------------------------------------------------------------------------------------ progress artifacts
def test_retried_stage_replaces_its_progress_artifact(prefect_server, tmp_path):
    """A stage whose first attempt dies at 12.5 % and whose retry finishes leaves one progress artifact, at 100 %."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from tasks.progress import TrainProgress

    metrics = tmp_path / "train" / "metrics.jsonl"
    metrics.parent.mkdir()

    @task(retries=1, retry_delay_seconds=0)
    def train() -> None:
        first = not metrics.exists()
        with TrainProgress("cpt", metrics, 40, LOG, interval=60):
            metrics.write_text(json.dumps({"step": 5 if first else 40, "loss": 1.0, "tokens": 1}) + "\n")
            if first:
                raise RuntimeError("killed at step 5")

    @flow
    def run() -> str:
        from prefect.runtime import flow_run

        train()
        return str(flow_run.id)

    flow_run_id = run()
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    progress = [a for a in found if a.type == "progress"]
    assert [a.data for a in progress] == [100.0], [(a.description, a.data) for a in progress]

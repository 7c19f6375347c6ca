"""Flow ``bitdistill`` end to end on a 40-file world, its caching, and the artifact store on file:// and s3://."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

# Prefect reads its settings at import: keep it off ~/.prefect, any configured server and the network.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="bitdistill-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"

from bitnet.data import PYTHON_DOCS_DIR, TextSource, python_docs_available  # noqa: E402
from bitnet.teacher import TinyTeacherConfig  # noqa: E402
from tasks.artifacts import ArtifactRef, ArtifactStore, CorruptArtifactError  # noqa: E402
from tests.support import free_port, stop, wait_http

STAGES = ["world", "teacher", "convert", "layerwise", "cpt", "kd", "lrc", "export", "eval"]


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not python_docs_available():
        pytest.fail("the corpus package python3.11-doc is missing: run `make test` (it installs it)")
    src = tmp_path_factory.mktemp("flow-corpus")
    for f in sorted(Path(PYTHON_DOCS_DIR).glob("library/*.rst.txt"))[:40]:
        shutil.copy(f, src / f.name)
    return src


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def prefect_home(prefect_server, tmp_path: Path):
    """An isolated PREFECT_HOME (and so result storage / cache records) per test."""
    from prefect.settings import PREFECT_HOME, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    home = tmp_path / "prefect-home"
    with temporary_settings(updates={PREFECT_HOME: home, PREFECT_RESULTS_LOCAL_STORAGE_PATH: home / "storage"}):
        yield home


@pytest.fixture
def code_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Hash a private copy of bitnet/ and kernels/ so concurrent edits of the tree cannot flip the cache; the
    test may edit the copy."""
    import tasks.caching

    snap = tmp_path / "code"
    roots = []
    for root in tasks.caching.code_roots():
        shutil.copytree(root, snap / root.name, ignore=shutil.ignore_patterns("__pycache__"))
        roots.append(snap / root.name)
    monkeypatch.setattr(tasks.caching, "code_roots", lambda: roots)
    monkeypatch.delenv("BITDISTILL_CODE_VERSION", raising=False)
    return snap


def tiny_config(corpus: Path, root: str, **over: Any):
    from bitnet.config import deep_merge
    from flows.config import PipelineConfig

    train = {"lr": 2e-3, "warmup_steps": 1, "log_every": 1, "progress": False, "ckpt_every": 2}
    data = {"batch_size": 4, "eval_batch_size": 8, "eval_max_batches": 2}
    student = {"train": {**train, "max_steps": 3}, "data": data}
    cfg: dict[str, Any] = {
        "store": {"root": root},
        "tracking": {"enabled": False},
        "world": {"source": TextSource(kind="dir", path=str(corpus), glob="*.rst.txt").model_dump(),
                  "split_fractions": [0.8, 0.1, 0.1], "vocab_size": 512, "seq_len": 64},
        "teacher": {
            "model": TinyTeacherConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128).model_dump(),
            "train": {**train, "max_steps": 6, "lr": 5e-3},
            "data": {"batch_size": 8, "eval_batch_size": 8, "eval_max_batches": 2}},
        "layerwise": student,
        "cpt": {**student, "lambda_warmup_steps": 2},
        "kd": student,
        "lrc": {**student, "rank": 4, "calib_batches": 2},
        "eval": {"batch_size": 8, "max_batches": 2},
    }
    return PipelineConfig.model_validate(deep_merge(cfg, over))


def run_flow(cfg) -> tuple[Any, dict[str, str], float]:
    from flows.bitdistill import bitdistill

    t0 = time.perf_counter()
    state = bitdistill(config=cfg, return_state=True)
    wall = time.perf_counter() - t0
    assert state.is_completed(), state
    summary = state.result()
    return summary, {r.stage: r.state for r in summary.stages if r.state}, wall


# ------------------------------------------------------------------------------------------------ flow
def test_tiny_flow_end_to_end_cached_rerun_and_invalidation(prefect_home, corpus, code_snapshot, tmp_path):
    root = tmp_path / "artifacts"
    cfg = tiny_config(corpus, str(root))

    summary, states, t_first = run_flow(cfg)
    assert states == {s: "Completed" for s in STAGES}, states
    assert summary.evaluation["student_ppl"] > 1 and 0 <= summary.evaluation["student_top1_agreement"] <= 1
    student = Path(summary.student.removeprefix("file://"))
    assert (student / "manifest.json").is_file() and (student / "model" / "model.safetensors").is_file()
    gguf = Path(summary.gguf.removeprefix("file://"))
    assert gguf.is_file() and (gguf.parent / "lrc-lora.gguf").is_file()  # the LRC student's adapter
    assert summary.row("lrc").perplexity and summary.row("teacher").final_loss
    for name in ("layerwise", "cpt", "kd", "lrc"):  # the report states each training stage's tokens, speed, memory
        r = summary.row(name)
        step = cfg.step(name)
        assert r.tokens == step.train.max_steps * step.data.batch_size * cfg.world.seq_len, (name, r.tokens)
        assert r.tokens_per_s > 0 and r.peak_gb > 0.1, r
    report = Path(summary.report.removeprefix("file://")).read_text()
    assert report.startswith("# bitdistill") and f"| {summary.row('cpt').tokens:,} |" in report
    check_agreement_columns(summary, cfg)

    # a second run with the same config: every stage is a Prefect cache hit
    summary2, states, t_cached = run_flow(cfg)
    assert states == {s: "Cached" for s in STAGES}, states
    assert summary2.student == summary.student
    print(f"tiny flow: first run {t_first:.1f} s, fully cached re-run {t_cached:.1f} s")

    # one stage's config changes: that stage and those after it re-run, nothing before it
    cfg_kd = tiny_config(corpus, str(root), kd={"temperature": 2.0})
    _, states, _ = run_flow(cfg_kd)
    assert states == {**{s: "Cached" for s in STAGES[:5]}, **{s: "Completed" for s in STAGES[5:]}}, states

    # the training math changes (the digest of the bitnet code a stage imports): the stages that run it re-run,
    # the world build (which does not import bitnet/layers.py) stays cached
    layers = code_snapshot / "bitnet" / "layers.py"
    layers.write_text(layers.read_text() + "\n# changed\n")
    cfg_short = tiny_config(corpus, str(root), **{s: {"enabled": False} for s in STAGES[3:]})
    _, states, _ = run_flow(cfg_short)
    assert states == {"world": "Cached", "teacher": "Completed", "convert": "Completed"}, states


def check_agreement_columns(summary: Any, cfg: Any) -> None:
    """The summary's naive and student rows are those models' numbers: recomputed here from the convert and final
    student artifacts on the same held-out batches, they agree to float rounding (same code, same batches, same
    CPU: only the order of float32 accumulations across threads may differ, ~2^-24 per term; rel 1e-5 covers sums
    of the ~1000 positions and vocabulary of the test config)."""
    from bitnet.data import iter_eval_batches
    from bitnet.evaluate import compare_to_teacher
    from bitnet.stages.base import model_dir, teacher_source
    from bitnet.student import load_student
    from bitnet.teacher import load_teacher
    from bitnet.world import open_world

    path = lambda stage: Path(summary.row(stage).uri.removeprefix("file://"))  # noqa: E731
    data = open_world(path("world")).dataset(cfg.eval.split)
    teacher = load_teacher(teacher_source(path("teacher")))
    for name, stage in (("naive", "convert"), ("student", "lrc")):
        m = compare_to_teacher(load_student(model_dir(path(stage))), teacher,
                               iter_eval_batches(data, cfg.eval.batch_size, cfg.eval.max_batches))
        for k in ("ppl", "top1_agreement", "kl"):
            assert summary.evaluation[f"{name}_{k}"] == pytest.approx(m[k], rel=1e-5, abs=1e-6), (name, k)
    row = {line.split("|")[1].strip(): line for line in summary.report and
           Path(summary.report.removeprefix("file://")).read_text().splitlines() if line.startswith("| ")}
    assert f"{summary.evaluation['naive_top1_agreement']:.3f}" in row["naive ternary (converted, untrained)"]
    assert f"{summary.evaluation['student_top1_agreement']:.3f}" in row["student"]


def test_code_digest_covers_what_a_stage_imports(code_snapshot, monkeypatch):
    from tasks.caching import code_digest

    WORLD_CODE, TRAIN_CODE = ("bitnet.stages.world",), ("bitnet.stages.kd",)

    world, train = code_digest(WORLD_CODE), code_digest(TRAIN_CODE)
    (code_snapshot / "bitnet" / "unused_new_module.py").write_text("X = 1\n")  # imported by nothing
    assert (code_digest(WORLD_CODE), code_digest(TRAIN_CODE)) == (world, train)
    trainer = code_snapshot / "bitnet" / "trainer.py"  # run by the training stages only
    trainer.write_text(trainer.read_text() + "\n# changed\n")
    assert code_digest(WORLD_CODE) == world and code_digest(TRAIN_CODE) != train
    train = code_digest(TRAIN_CODE)
    kernel = code_snapshot / "kernels" / "reference.py"  # BitLinear's CPU path lives outside bitnet/
    kernel.write_text(kernel.read_text() + "\n# changed\n")
    assert code_digest(TRAIN_CODE) != train
    monkeypatch.setenv("BITDISTILL_CODE_VERSION", "v1")
    assert code_digest(TRAIN_CODE) == code_digest(WORLD_CODE) == "pinned:v1"


def test_one_stage_identity_for_cli_store_and_prefect(tmp_path):
    """The CLI's stage.json, the flow's store key and Prefect's cache key see a config the same way: a setting that
    cannot change the output (the progress bar) changes none of them, a training setting changes all three."""
    from bitnet.stages.kd import KDConfig
    from bitnet.stages.outputs import stage_identity
    from tasks.caching import StageCode, stage_cache_policy
    from tasks.stages import stage_material

    base = KDConfig()
    bar = base.model_copy(update={"train": base.train.model_copy(update={"progress": not base.train.progress})})
    lr = base.model_copy(update={"train": base.train.model_copy(update={"lr": base.train.lr * 2})})
    inputs = {"student": ArtifactRef(uri=f"file://{tmp_path}/s", sha256="0" * 64, stage="cpt", key="k",
                                     content="c" * 64)}
    policies = {type(p).__name__: p for p in stage_cache_policy().policies}

    def keys(cfg):
        task_inputs = {"name": "kd", "cfg": cfg, "inputs": inputs, "store": None, "reuse_only": False, "compute": None}
        prefect = tuple(policy.compute_key(None, task_inputs, {}) for policy in (StageCode(), policies["Inputs"]))
        store = json.dumps(stage_material("kd", cfg, inputs, "code"), sort_keys=True)
        cli = stage_identity("kd", cfg.model_dump(mode="json"), None, {"student": tmp_path / "s"})
        return prefect, store, cli

    assert keys(bar) == keys(base)
    (code_lr, inputs_lr), store_lr, cli_lr = keys(lr)
    (code_base, inputs_base), store_base, cli_base = keys(base)
    assert code_lr != code_base and store_lr != store_base and cli_lr != cli_base
    assert inputs_lr == inputs_base  # INPUTS leaves cfg to StageCode's identity view


def test_lost_prefect_storage_and_corrupt_artifact(prefect_home, corpus, code_snapshot, tmp_path):
    """Results survive losing Prefect's storage (valid manifests are reused); a corrupted file is recomputed."""
    root = tmp_path / "artifacts"
    cfg = tiny_config(corpus, str(root), **{s: {"enabled": False} for s in STAGES[3:]})
    summary, states, _ = run_flow(cfg)
    assert set(states.values()) == {"Completed"}

    shutil.rmtree(prefect_home / "storage")  # Prefect's cache records are gone
    summary2, states, _ = run_flow(cfg)
    assert set(states.values()) == {"Completed"} and {r.status for r in summary2.stages[:3]} == {"reused"}
    assert summary2.student == summary.student

    teacher = Path(summary.row("teacher").uri.removeprefix("file://"))
    (teacher / "metrics.json").write_text('{"tampered": true}')  # same manifest, different bytes
    summary3, states, _ = run_flow(cfg)
    # the recomputed teacher has the same content (content-addressed keys): convert is not recomputed
    assert states == {"world": "Cached", "teacher": "Completed", "convert": "Cached"}, states
    assert summary3.row("teacher").status == "completed"
    assert ArtifactStore(str(root)).lookup("teacher", summary3.row("teacher").uri.rsplit("/", 1)[1]) is not None


def test_tiny_flow_on_s3(prefect_home, corpus, code_snapshot, s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    fs.mkdir("bitdistill")
    cfg = tiny_config(corpus, "s3://bitdistill/runs", store={"storage_options": {"endpoint_url": s3_server},
                                                            "cache_dir": str(tmp_path / "cache")})
    summary, states, _ = run_flow(cfg)
    assert states == {s: "Completed" for s in STAGES}, states
    assert summary.gguf.startswith("s3://bitdistill/runs/export/") and fs.exists(summary.gguf.removeprefix("s3://"))
    assert fs.exists(f"{summary.student.removeprefix('s3://')}/manifest.json")
    assert not fs.exists(f"{summary.row('cpt').uri.removeprefix('s3://')}/train/checkpoints")  # checkpoints stay local
    _, states, _ = run_flow(cfg)
    assert set(states.values()) == {"Cached"}


def _flow_subprocess(cfg_file: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", str(cfg_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_sigkill_mid_stage_then_rerun_resumes(corpus, tmp_path):
    """Kill the flow process (and its ephemeral API server) while CPT trains; a new run reuses the finished
    stages from Prefect's cache and CPT continues from its last trainer checkpoint."""
    root = tmp_path / "artifacts"
    cfg = tiny_config(corpus, str(root), cpt={"train": {"max_steps": 120, "ckpt_every": 5}},
                      export={"enabled": False})
    cfg_file = tmp_path / "pipeline.json"
    cfg_file.write_text(cfg.model_dump_json())
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "OMP_NUM_THREADS": "1",
           "BITDISTILL_CODE_VERSION": "resume-test"}  # pinned: concurrent edits of bitnet/ must not change keys
    env.pop("PREFECT_API_URL", None)

    proc = _flow_subprocess(cfg_file, env)
    deadline = time.monotonic() + 240
    ckpts: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        ckpts = sorted(root.glob("cpt/*/train/checkpoints/step-*[0-9]"))
        if len(ckpts) >= 2:
            break
        time.sleep(0.2)
    try:
        assert ckpts and proc.poll() is None, proc.communicate(timeout=5)[0][-3000:] if proc.poll() else "timeout"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the flow process and the API server it started
        proc.wait(timeout=30)
    killed_at = int(ckpts[-1].name.split("-")[1])
    cpt_dir = ckpts[-1].parents[2]
    assert not (cpt_dir / "manifest.json").exists()

    proc = _flow_subprocess(cfg_file, env)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    result, _ = json.JSONDecoder().raw_decode(out[out.rindex("{\n"):])
    summary = json.loads(Path(result["report"].removeprefix("file://")).with_name("summary.json").read_text())
    states = {r["stage"]: r["state"] for r in summary["stages"] if r["state"]}
    assert states == {**{s: "Cached" for s in STAGES[:4]}, **{s: "Completed" for s in [*STAGES[4:7], "eval"]}}, states
    metrics = json.loads((cpt_dir / "metrics.json").read_text())
    assert metrics["resumed_from"] is not None and metrics["resumed_from"] >= killed_at, (metrics, killed_at)
    assert metrics["steps"] == 120
    print(f"killed CPT after checkpoint step {killed_at}; rerun resumed from step {metrics['resumed_from']}")


def test_failing_stage_fails_the_run_and_retries(prefect_home, corpus, code_snapshot, tmp_path, monkeypatch):
    import dataclasses

    from bitnet.stages import STAGES as REGISTRY
    from flows.bitdistill import bitdistill

    real = REGISTRY["kd"]
    calls: list[str] = []

    def flaky(cfg, *args, **kwargs):
        calls.append("kd")
        if calls.count("kd") == 1:
            raise RuntimeError("simulated worker loss in kd")
        return real.run(cfg, *args, **kwargs)

    monkeypatch.setitem(REGISTRY, "kd", dataclasses.replace(real, run=flaky))
    root = str(tmp_path / "artifacts")
    cfg = tiny_config(corpus, root, export={"enabled": False}, kd={"retries": 1, "retry_delay_s": 0})
    _, states, _ = run_flow(cfg)  # the per-stage retry absorbs the first failure
    assert states["kd"] == "Completed" and calls.count("kd") == 2

    cfg = tiny_config(corpus, root, export={"enabled": False}, kd={"temperature": 3.0})
    calls.clear()
    state = bitdistill(config=cfg, return_state=True)
    assert state.is_failed() and "simulated worker loss in kd" in str(state.message)
    _, states, _ = run_flow(cfg)  # the cause is gone: a new run recomputes only what is missing
    assert states == {**{s: "Cached" for s in STAGES[:5]}, "kd": "Completed", "lrc": "Completed",
                      "eval": "Completed"}, states


def test_invalid_pipeline_config_is_rejected_before_any_work(prefect_home, tmp_path):
    from flows.bitdistill import bitdistill

    root = tmp_path / "artifacts"
    with pytest.raises(Exception, match=r"kd\.temperature"):
        bitdistill(config={"store": {"root": str(root)}, "kd": {"temperature": -1}})
    assert not root.exists()


def test_unwritable_artifact_root_is_a_one_line_error(prefect_home, tmp_path, capsys):
    from flows.cli import main

    assert main(["run", "--root", "/proc/bitdistill-test/artifacts"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bitdistill: error: artifact root file:///proc/bitdistill-test/artifacts is not writable")
    assert "\n" not in err


def test_cli_rejects_unknown_preset_and_bad_config(tmp_path, capsys):
    from flows.cli import main

    assert main(["run", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("layerwise: {enabled: true}\nconvert: {enabled: false}\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert "need the convert stage" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- artifact store
def _write_stage(work: Path) -> None:
    (work / "model").mkdir(parents=True)
    (work / "model" / "weights.bin").write_bytes(os.urandom(4096))
    (work / "metrics.json").write_text('{"loss": 1.5}')
    (work / "train" / "checkpoints" / "step-00000001").mkdir(parents=True)
    (work / "train" / "checkpoints" / "step-00000001" / "model.safetensors").write_bytes(b"ckpt")


def check_store(store: ArtifactStore, corrupt_file: Any, corrupt_manifest: Any) -> ArtifactRef:
    assert store.lookup("teacher", "k1") is None  # nothing there
    work = store.work_dir("teacher", "k1")
    _write_stage(work)
    assert store.lookup("teacher", "k1") is None  # files without a manifest: unfinished
    ref = store.commit("teacher", "k1", work, config={"lr": 1}, metrics={"train_loss": 1.5})
    again = store.lookup("teacher", "k1", deep=True)
    assert again == ref and ref.model_validate_json(ref.model_dump_json()) == ref
    manifest = store.verify(ref, deep=True)
    assert set(manifest.files) == {"model/weights.bin", "metrics.json"}  # checkpoints are not part of the artifact
    assert manifest.config == {"lr": 1} and manifest.metrics == {"train_loss": 1.5}
    local = store.fetch(ref)
    assert (local / "model" / "weights.bin").read_bytes() == (work / "model" / "weights.bin").read_bytes()

    corrupt_file("teacher/k1/model/weights.bin")  # same size, different bytes
    assert store.lookup("teacher", "k1", deep=True) is None
    with pytest.raises(CorruptArtifactError):
        store.verify(ref, deep=True)

    ref2 = store.commit("teacher", "k2", work)
    corrupt_manifest("teacher/k2/manifest.json")
    assert store.lookup("teacher", "k2") is None
    with pytest.raises(CorruptArtifactError):
        store.read_manifest(ref2)
    return ref


def test_local_store(tmp_path: Path) -> None:
    root = tmp_path / "store"

    def corrupt_file(rel: str) -> None:
        p = root / rel
        p.write_bytes(bytes(b ^ 0xFF for b in p.read_bytes()))

    def corrupt_manifest(rel: str) -> None:
        (root / rel).write_text("{not json")

    check_store(ArtifactStore(str(root)), corrupt_file, corrupt_manifest)


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch):
    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_SESSION_TOKEN": "testing"}.items():
        monkeypatch.setenv(k, v)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_s3_store(s3_server: str, tmp_path: Path) -> None:
    import s3fs

    opts = {"endpoint_url": s3_server}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    fs.mkdir("artifacts")
    store = ArtifactStore("s3://artifacts/runs", {**opts, "skip_instance_cache": True}, cache_dir=tmp_path / "cache")
    assert store.root_uri == "s3://artifacts/runs"

    def corrupt_file(rel: str) -> None:
        p = f"artifacts/runs/{rel}"
        fs.pipe_file(p, bytes(b ^ 0xFF for b in fs.cat_file(p)))

    def corrupt_manifest(rel: str) -> None:
        fs.pipe_file(f"artifacts/runs/{rel}", b"{not json")

    ref = check_store(store, corrupt_file, corrupt_manifest)
    # a fresh local cache downloads the (corrupted) remote files and refuses them
    other = ArtifactStore("s3://artifacts/runs", {**opts, "skip_instance_cache": True}, cache_dir=tmp_path / "cache2")
    with pytest.raises(CorruptArtifactError):
        other.fetch(ref)


# ---------------------------------------------------------------------------------------- deployments


# The deployments against a real server and worker (deploy, run, kill, Crashed, retry, eval-only) are tested in
# tests/test_ops.py::test_killed_worker_crashes_then_retry_resumes_on_a_real_server.


# ------------------------------------------------------------------------------------------------ MLflow
@pytest.fixture
def mlflow_server(tmp_path: Path):
    port = free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen(
        [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "mlartifacts")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc, group=True, timeout=5)


def test_mlflow_lineage(prefect_home, corpus, code_snapshot, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    cfg = tiny_config(corpus, str(tmp_path / "artifacts"), tracking={"enabled": True, "uri": mlflow_server})
    summary, states, _ = run_flow(cfg)
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("bitdistill")

    def runs(filter_string: str) -> list[Any]:
        return client.search_runs([exp.experiment_id], filter_string=filter_string,
                                  order_by=["attributes.start_time ASC"])

    parents = runs("tags.`bitdistill.preset` = 'tiny'")
    assert len(parents) == 1 and parents[0].data.tags["bitdistill.prefect_flow_run_id"] not in ("", "None")
    parent = parents[0].info.run_id
    stages = {r.data.tags["bitdistill.stage"]: r for r in runs(f"tags.`mlflow.parentRunId` = '{parent}'")}
    assert set(stages) == set(STAGES)
    teacher = stages["teacher"]
    assert teacher.data.params["train.max_steps"] == "6" and teacher.data.tags["bitdistill.cached"] == "false"
    assert len(teacher.data.params) <= 12  # a few key params; the whole config is config.json
    assert len(client.get_metric_history(teacher.info.run_id, "train/loss")) == 6
    files = {a.path for a in client.list_artifacts(teacher.info.run_id)}
    files |= {a.path for a in client.list_artifacts(teacher.info.run_id, "plots")}
    assert {"manifest.json", "config.json", "plots/loss_curve.png"} <= files, files
    # wall time and tokens as metrics; the run spans the stage, so MLflow's Duration column is the stage's time
    wall = teacher.data.metrics["stage_wall_s"]
    manifest = json.loads(Path(summary.row("teacher").uri.removeprefix("file://"), "manifest.json").read_text())
    assert teacher.data.metrics["tokens"] == manifest["metrics"]["tokens"] >= 6 * 8 * 64
    assert wall == pytest.approx(summary.row("teacher").wall_s)
    assert abs((teacher.info.end_time - teacher.info.start_time) / 1000 - wall) < 0.01  # ms, truncated twice
    # the parent: few params, the final evaluation as metrics
    final = client.get_run(parent)
    assert len(final.data.params) <= 5 and final.info.status == "FINISHED"
    assert final.data.metrics["eval/student_ppl"] == pytest.approx(summary.evaluation["student_ppl"])
    assert final.data.metrics["eval/naive_top1_agreement"] == pytest.approx(summary.evaluation["naive_top1_agreement"])
    inputs = {d.dataset.name: d.dataset.digest for d in teacher.inputs.dataset_inputs}
    assert set(inputs) == {"world-train", "world-validation"} and all(inputs.values())
    # eval's lineage names the split it evaluated (cfg.eval.split, "test"), nothing it did not read
    evaluated = [(d.dataset.name, d.tags[0].value) for d in stages["eval"].inputs.dataset_inputs]
    assert evaluated == [(f"world-{cfg.eval.split}", "evaluation")] and cfg.eval.split == "test"
    assert stages["kd"].data.tags["bitdistill.upstream_run.student"] == stages["cpt"].info.run_id
    models = client.search_logged_models(experiment_ids=[exp.experiment_id])
    assert len(models) == 1 and models[0].tags["bitdistill.artifact_uri"] == summary.student

    # a cached re-run: the stages appear again, linked to the runs that produced their artifacts
    _, states, _ = run_flow(cfg)
    assert set(states.values()) == {"Cached"}
    parent2 = runs("tags.`bitdistill.preset` = 'tiny'")[-1].info.run_id
    cached = {r.data.tags["bitdistill.stage"]: r for r in runs(f"tags.`mlflow.parentRunId` = '{parent2}'")}
    assert set(cached) == set(STAGES) and all(r.data.tags["bitdistill.cached"] == "true" for r in cached.values())
    assert cached["teacher"].data.tags["bitdistill.produced_by_run_id"] == teacher.info.run_id
    # a cache hit trained nothing (tokens 0; the artifact's own training is tokens_total) and logs no new model
    assert cached["teacher"].data.metrics["tokens"] == 0
    assert cached["teacher"].data.metrics["tokens_total"] == manifest["metrics"]["tokens"]
    assert all(r.info.status == "FINISHED" for r in cached.values())
    assert len(client.search_logged_models(experiment_ids=[exp.experiment_id])) == 1

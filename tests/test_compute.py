"""Compute backends: the worker entry point, SkyPilot task rendering (parsed offline by SkyPilot itself), the
skypilot backend end to end with a launcher that runs the rendered ``run`` command here, and bad input."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.artifacts import ArtifactRef, ArtifactStore, StoreConfig
from tasks.compute import (
    PROJECT_ROOT,
    ComputeConfig,
    ComputeError,
    LogStream,
    SkyPilotCompute,
    TorchrunCompute,
    local_launcher,
    preflight,
    render_task,
    run_request,
)
from tasks.execute import StageRequest
from tests.support import free_port
from tests.test_flow import code_snapshot, corpus, prefect_home, prefect_server, run_flow, tiny_config  # noqa: F401

FAKE_KEY_ID = "AKIAFAKEKEYID0000001"
FAKE_SECRET = "fake-secret-Zq8s7d6f5g4h3j2k1"  # must never show up in rendered YAML or logs


def _teacher_request(world: ArtifactRef, store: StoreConfig, key: str = "t0") -> StageRequest:
    train = {"max_steps": 2, "lr": 5e-3, "warmup_steps": 1, "log_every": 1, "progress": False, "ckpt_every": 1,
             "eval_every": 0}
    model = {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 64}
    cfg = {"model": model, "train": train, "data": {"batch_size": 4, "eval_batch_size": 4, "eval_max_batches": 1}}
    return StageRequest(stage="teacher", key=key, config=cfg, upstream={"world": world}, store=store,
                        code="test", producer={"task_run_id": "test"})


def _commit_world(small_world: Any, store_cfg: StoreConfig) -> ArtifactRef:
    return ArtifactStore.from_config(store_cfg).commit("world", "w0", small_world.root, config={"test": True})


def _sky_env() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}


# ------------------------------------------------------------------------------------------- rendering
def test_gcp_multinode_spot_yaml_parses_with_skypilot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sky

    for k, v in _sky_env().items():
        monkeypatch.setenv(k, v)
    store = StoreConfig(root="s3://bucket/runs", storage_options={"endpoint_url": "https://s3.example"})
    compute = SkyPilotCompute(cloud="gcp", accelerators="A100:8", nodes=2, spot=True, region="us-central1")
    secrets = preflight(compute, store)
    assert secrets["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET
    req = _teacher_request(ArtifactRef(uri="s3://bucket/runs/world/w0", sha256="0" * 64, stage="world", key="w0"),
                           store)
    text = render_task(compute, req, "s3://bucket/runs/requests/teacher/t0.json", sorted(secrets))
    assert FAKE_SECRET not in text and FAKE_KEY_ID not in text
    path = tmp_path / "task.yaml"
    path.write_text(text)

    task = sky.Task.from_yaml(str(path))
    assert task.num_nodes == 2
    (res,) = task.resources
    assert str(res.cloud) == "GCP" and res.region == "us-central1"
    assert res.accelerators == {"A100": 8} and res.use_spot
    assert task.envs["BITDISTILL_REQUEST"] == "s3://bucket/runs/requests/teacher/t0.json"
    assert json.loads(task.envs["BITDISTILL_STORAGE_OPTIONS"]) == {"endpoint_url": "https://s3.example"}
    assert task.envs["AWS_DEFAULT_REGION"] == "us-east-1"
    for s in ("--nnodes=\"$SKYPILOT_NUM_NODES\"", "--node_rank=\"$SKYPILOT_NODE_RANK\"", "SKYPILOT_NODE_IPS",
              "SKYPILOT_NUM_GPUS_PER_NODE", "-m tasks.worker \"$BITDISTILL_REQUEST\""):
        assert s in task.run, s
    assert "pip install -c requirements.lock -e ." in task.setup
    assert not task.secrets  # names only: values come at launch
    assert yaml.safe_load(text)["secrets"] == {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}

    # what the real launcher builds in memory: the values become SkyPilot secrets (SecretStr, masked in reprs)
    live = sky.Task.from_yaml_config(yaml.safe_load(text), secrets_overrides=list(secrets.items()))
    assert live.secrets["AWS_SECRET_ACCESS_KEY"].get_secret_value() == FAKE_SECRET
    assert FAKE_SECRET not in repr(live.secrets)
    assert FAKE_SECRET not in str(live.to_yaml_config(use_user_specified_yaml=True))


def test_runpod_yaml_single_node_with_gcs_key(tmp_path: Path) -> None:
    import sky

    key = tmp_path / "sa.json"
    key.write_text('{"private_key": "' + FAKE_SECRET + '"}')
    env = {"GOOGLE_APPLICATION_CREDENTIALS": str(key), "HF_TOKEN": "hf_" + FAKE_SECRET}
    store = StoreConfig(root="gs://bucket/runs")
    compute = SkyPilotCompute(cloud="runpod", accelerators="RTX4090:1")
    secrets = preflight(compute, store, env)
    assert list(secrets) == ["HF_TOKEN"]
    req = _teacher_request(ArtifactRef(uri="gs://bucket/runs/world/w0", sha256="0" * 64, stage="world", key="w0"),
                           store)
    text = render_task(compute, req, "gs://bucket/runs/requests/teacher/t0.json", sorted(secrets), env=env)
    assert FAKE_SECRET not in text
    path = tmp_path / "task.yaml"
    path.write_text(text)
    task = sky.Task.from_yaml(str(path))
    assert task.num_nodes == 1
    (res,) = task.resources
    assert str(res.cloud) == "RunPod" and res.accelerators == {"RTX4090": 1} and not res.use_spot
    assert task.envs["GOOGLE_APPLICATION_CREDENTIALS"] == "~/.config/bitdistill/gcs-key.json"
    assert task.file_mounts == {"~/.config/bitdistill/gcs-key.json": str(key.resolve())}
    assert "--standalone" in task.run and "-m tasks.worker \"$BITDISTILL_REQUEST\"" in task.run
    assert yaml.safe_load(text)["secrets"] == {"HF_TOKEN": None}


# ----------------------------------------------------------------------------------------------- worker
def test_worker_runs_a_stage_once_then_does_nothing(small_world: Any, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    from tasks import worker

    store = StoreConfig(root=f"file://{tmp_path / 'artifacts'}")
    req = _teacher_request(_commit_world(small_world, store), store)
    path = tmp_path / "request.json"
    path.write_text(req.model_dump_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tasks.worker", str(path)], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bitdistill-worker: teacher →" in proc.stdout
    s = ArtifactStore.from_config(store)
    ref = s.lookup("teacher", "t0")
    assert ref is not None
    manifest = s.read_manifest(ref)
    assert "model/model.safetensors" in manifest.files and manifest.upstream["world"].key == "w0"
    assert manifest.producer["task_run_id"] == "test" and manifest.code == "test"
    assert not any(f.startswith("train/checkpoints/") for f in manifest.files)
    assert (Path(ref.uri.removeprefix("file://")) / "train" / "checkpoints").is_dir()  # resumable, not artifact

    before = (Path(ref.uri.removeprefix("file://")) / "manifest.json").stat().st_mtime_ns
    caplog.set_level(logging.INFO, logger="bitdistill.worker")
    assert worker.main([str(path)]) == 0  # second call: a valid manifest → nothing to do
    assert "nothing to do" in caplog.text
    assert (Path(ref.uri.removeprefix("file://")) / "manifest.json").stat().st_mtime_ns == before
    assert s.lookup("teacher", "t0") == ref


def test_worker_bad_requests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tasks import worker

    assert worker.main([str(tmp_path / "missing.json")]) == 2
    (bad := tmp_path / "bad.json").write_text("{not json")
    assert worker.main([str(bad)]) == 2
    store = StoreConfig(root=str(tmp_path))
    (op := tmp_path / "op.json").write_text(StageRequest(stage="train-everything", key="k",
                                                         store=store).model_dump_json())
    assert worker.main([str(op)]) == 2
    (cfg := tmp_path / "cfg.json").write_text(StageRequest(stage="convert", key="k", store=store,
                                                           config={"nope": 1}).model_dump_json())
    assert worker.main([str(cfg)]) == 2
    assert worker.main([]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bitdistill-worker: error")]
    assert len(lines) == 4, lines
    assert "cannot read request" in lines[0] and "unknown stage 'train-everything'" in lines[2] and "nope" in lines[3]


# ------------------------------------------------------------------------------------------ skypilot e2e
@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch):
    from moto.server import ThreadedMotoServer

    for k, v in _sky_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_skypilot_backend_end_to_end_with_local_launcher(small_world: Any, s3_server: str, tmp_path: Path) -> None:
    """Render → upload the request → run the rendered ``run`` command here (torchrun + worker, reading the request
    and artifacts from S3) → the result manifest read back from the store; trainer checkpoints mirrored to S3."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    bucket = f"compute-{uuid.uuid4().hex[:8]}"  # moto's state is per process, shared with other tests' servers
    fs.mkdir(bucket)
    store = StoreConfig(root=f"s3://{bucket}/runs", storage_options={"endpoint_url": s3_server},
                        cache_dir=str(tmp_path / "cache-flow"))
    world = _commit_world(small_world, store)
    # the job has its own machine: its own cache directory
    req = _teacher_request(world, store.model_copy(update={"cache_dir": str(tmp_path / "cache-job")}))
    logger = logging.getLogger("test-skypilot")
    logger.setLevel(logging.INFO)
    logger.addHandler(records := _Records())
    seen: dict[str, Any] = {}

    def launcher(task_yaml: str, secrets: Any, **kw: Any) -> int | None:
        seen["yaml"], seen["secrets"], seen["kw"] = task_yaml, dict(secrets), kw
        return local_launcher({"BITDISTILL_VENV": str(Path(sys.executable).parent.parent),
                               "BITDISTILL_MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
                               "HF_HUB_OFFLINE": "1"})(task_yaml, secrets, **kw)

    compute = SkyPilotCompute(cloud="gcp", accelerators="L4:1", spot=True)
    ref = run_request(compute, req, logger, launcher=launcher)

    assert ref.uri == f"s3://{bucket}/runs/teacher/t0"
    manifest = ArtifactStore.from_config(store).verify(ref, deep=True)
    assert "model/model.safetensors" in manifest.files and manifest.metrics
    assert fs.exists(f"{bucket}/runs/requests/teacher/t0.json")
    ckpts = fs.ls(f"{bucket}/runs/teacher/t0/train/checkpoints", detail=False)
    assert ckpts and all(fs.exists(f"{c}/trainer.json") for c in ckpts)  # mirrored for a preempted job's resume
    assert seen["kw"]["cluster"] is None and seen["secrets"]["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET
    assert FAKE_SECRET not in seen["yaml"]
    text = "\n".join(records.lines)
    assert "launching on a managed job" in text and "bitdistill-worker: teacher →" in text  # the job's logs
    assert FAKE_SECRET not in text

    assert manifest.metrics["resumed_from"] is None

    # a preempted job: the manifest was never written and the VM (its local cache) is gone; the recovered job
    # restores the mirrored checkpoints and the trainer resumes from the last one instead of step 0
    ArtifactStore.from_config(store).invalidate("teacher", "t0")
    shutil.rmtree(tmp_path / "cache-job")
    records.lines.clear()
    ref2 = run_request(compute, req, logger, launcher=launcher)
    assert any("restored checkpoint step-" in line for line in records.lines), records.lines[-20:]
    assert ArtifactStore.from_config(store).verify(ref2).metrics["resumed_from"] == 2


# ------------------------------------------------------------------------------------------- bad input
def test_bad_compute_settings_are_one_line_errors(tmp_path: Path) -> None:
    from pydantic import TypeAdapter, ValidationError

    from flows.config import PipelineConfig

    with pytest.raises(ValidationError, match="unknown compute backend 'slurm'"):
        TypeAdapter(ComputeConfig).validate_python({"backend": "slurm"})
    with pytest.raises(ValidationError, match="RunPod is single node"):
        SkyPilotCompute(cloud="runpod", nodes=2)
    with pytest.raises(ValidationError, match=r"need an s3:// or gs:// store.root"):
        PipelineConfig.model_validate({"kd": {"compute": {"backend": "skypilot"}}})
    with pytest.raises(ValidationError, match="unknown compute backend"):
        PipelineConfig.model_validate({"cpt": {"compute": {"backend": "k8s"}}})
    from bitnet.config import ConfigError
    from flows.config import pipeline_config

    (bad := tmp_path / "pipeline.yaml").write_text("kd: {compute: {backend: slurm}}\n")
    with pytest.raises(ConfigError, match=r"^invalid PipelineConfig: kd.compute: unknown compute backend 'slurm'"):
        pipeline_config(None, "tiny", file=str(bad))
    sky_gcp = SkyPilotCompute()
    errors = []
    for compute, root, env in [
        (sky_gcp, f"file://{tmp_path}", {}),
        (sky_gcp, "s3://b/r", {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID}),
        (SkyPilotCompute(cloud="runpod"), "gs://b/r", {}),
        (sky_gcp, "gs://b/r", {"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "nope.json")}),
    ]:
        with pytest.raises(ComputeError) as e:
            preflight(compute, StoreConfig(root=root), env)
        errors.append(str(e.value))
    assert all("\n" not in m for m in errors), errors
    assert "needs an s3:// or gs:// artifact root" in errors[0]
    assert "missing credentials" in errors[1] and "AWS_SECRET_ACCESS_KEY" in errors[1]
    assert "GOOGLE_APPLICATION_CREDENTIALS" in errors[2] and "is not a file" in errors[3]
    assert preflight(TorchrunCompute(), StoreConfig(root=str(tmp_path)), {}) == {}
    assert preflight(sky_gcp, StoreConfig(root="gs://b/r"), {}) == {}  # GCP VMs use their service account


def test_log_stream_masks_secrets() -> None:
    got: list[str] = []
    stream = LogStream(got.append, {"AWS_SECRET_ACCESS_KEY": FAKE_SECRET})
    stream.write(f"line one\nkey={FAKE_SECRET} par")
    stream.write("tial\n\n")
    stream.write("tail")
    stream.flush()
    assert got == ["line one", "key=*** partial", "tail"]


@pytest.mark.slow
def test_torchrun_backend_two_processes(small_world: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``torchrun --standalone --nproc_per_node=2 -m tasks.worker``: DDP on gloo, rank 0 commits."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    store = StoreConfig(root=f"file://{tmp_path / 'artifacts'}")
    req = _teacher_request(_commit_world(small_world, store), store)
    logger = logging.getLogger("test-torchrun")
    logger.setLevel(logging.INFO)
    logger.addHandler(records := _Records())
    ref = run_request(TorchrunCompute(nproc_per_node=2), req, logger)
    manifest = ArtifactStore.from_config(store).verify(ref, deep=True)
    assert "model/model.safetensors" in manifest.files
    text = "\n".join(records.lines)
    assert "[rank 1]" in text and text.count("bitdistill-worker: teacher →") == 1
    assert ".request.json" not in manifest.files  # the request sits hidden in the stage directory


@pytest.mark.slow
def test_flow_runs_a_stage_on_torchrun(prefect_home, corpus, code_snapshot, tmp_path):  # noqa: F811
    """The pipeline config's per-stage ``compute`` reaches the backend; the artifact is the one a local run makes."""
    off = {s: {"enabled": False} for s in ("layerwise", "cpt", "kd", "lrc", "export", "eval")}
    root = str(tmp_path / "artifacts")
    cfg = tiny_config(corpus, root, teacher={"compute": {"backend": "torchrun", "nproc_per_node": 1}}, **off)
    summary, states, _ = run_flow(cfg)
    assert states == {"world": "Completed", "teacher": "Completed", "convert": "Completed"}, states
    teacher = summary.row("teacher").uri
    manifest = ArtifactStore(root).read_manifest(ArtifactStore(root).lookup("teacher", teacher.rsplit("/", 1)[1]))
    assert manifest.producer["flow_run_id"] and manifest.metrics
    # where a stage ran is not part of its cache key: the same config on the local backend is a cache hit
    _, states, _ = run_flow(tiny_config(corpus, root, **off))
    assert set(states.values()) == {"Cached"}, states


def test_sky_launcher_calls_the_skypilot_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real launcher's calls, against SkyPilot 0.14.1's own signatures (the SDK itself is faked: offline it
    would start a local API server)."""
    import inspect

    import sky
    import sky.jobs

    from tasks.compute import sky_launcher

    calls: list[tuple[str, Any]] = []

    def fake(name: str, real: Any, result: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            inspect.signature(real).bind(*args, **kwargs)  # raises when the call does not fit the real API
            calls.append((name, inspect.signature(real).bind(*args, **kwargs).arguments))
            return result
        return call

    monkeypatch.setattr(sky.jobs, "launch", fake("jobs.launch", sky.jobs.launch, "req-1"))
    monkeypatch.setattr(sky.jobs, "tail_logs", fake("jobs.tail_logs", sky.jobs.tail_logs, 0))
    monkeypatch.setattr(sky, "launch", fake("launch", sky.launch, "req-2"))
    monkeypatch.setattr(sky, "tail_logs", fake("tail_logs", sky.tail_logs, 0))
    results = iter([([7], None), (3, None)])
    monkeypatch.setattr(sky, "stream_and_get", lambda request_id, **kw: (calls.append(("get", request_id)),
                                                                          next(results))[1])
    store = StoreConfig(root="s3://bucket/runs")
    req = StageRequest(stage="kd", key="k1", store=store)
    text = render_task(SkyPilotCompute(accelerators="L4:1"), req, "s3://bucket/runs/r.json",
                       ["AWS_SECRET_ACCESS_KEY"], env={})
    log = LogStream(lambda line: None)
    secrets = {"AWS_SECRET_ACCESS_KEY": FAKE_SECRET}

    assert sky_launcher(text, secrets, cluster=None, idle_minutes_to_autostop=None, log=log) == 0
    (_, launch), get, (_, tail) = calls
    assert launch["task"].secrets["AWS_SECRET_ACCESS_KEY"].get_secret_value() == FAKE_SECRET
    assert launch["name"] == "bitdistill-kd-k1" and get == ("get", "req-1")
    assert tail["job_id"] == 7 and tail["follow"] and tail["output_stream"] is log

    calls.clear()
    assert sky_launcher(text, secrets, cluster="dev", idle_minutes_to_autostop=15, log=log) == 0
    (_, launch), get, (_, tail) = calls
    assert launch["cluster_name"] == "dev" and launch["idle_minutes_to_autostop"] == 15 and get == ("get", "req-2")
    assert tail["cluster_name"] == "dev" and tail["job_id"] == 3 and tail["follow"]

"""Backend ``skypilot``: a SkyPilot managed job (``sky.jobs.launch``) or a job on a named cluster (``sky.launch``).

The task is rendered from ``infra/{cloud}.yaml`` (pure code, parsed offline by ``sky.Task``); the request is
uploaded next to the artifacts (``{root}/requests/{stage}/{key}.json``) and the job runs
``python -m tasks.worker`` on it, its logs streamed to the caller's logger. Credentials never enter the rendered
YAML: it names them under ``secrets:`` with null values, and the launcher fills them in memory from the
environment or Prefect ``Secret`` blocks (``compute.secret_blocks``). No Prefect or SkyPilot import at module level.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import Field, model_validator

from tasks.artifacts import ArtifactRef, ArtifactStore, StoreConfig
from tasks.backends.base import (
    PROJECT_ROOT,
    BackendConfig,
    ComputeError,
    Logger,
    LogStream,
    committed,
    stream_process,
)
from tasks.execute import Progress, StageRequest, no_progress

INFRA_DIR = PROJECT_ROOT / "infra"
STORAGE_OPTIONS_ENV = "BITDISTILL_STORAGE_OPTIONS"  # fsspec options (no secrets) for reading the request
GCS_KEY_REMOTE = "~/.config/bitdistill/gcs-key.json"
# non-secret settings passed through to the job when set here
PASS_ENV = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "BITDISTILL_CODE_VERSION")
OPTIONAL_SECRETS = ("AWS_SESSION_TOKEN", "HF_TOKEN")


class SkyPilotCompute(BackendConfig):
    """A GCP or RunPod job through SkyPilot (GCP multi-node via torchrun)."""

    backend: Literal["skypilot"] = "skypilot"
    cloud: Literal["gcp", "runpod"] = Field(default="gcp", description="infra template infra/{cloud}.yaml")
    accelerators: str | None = Field(default=None, description="e.g. 'H100:8', 'A100-80GB:1'")
    nodes: int = Field(default=1, ge=1, description="nodes (GCP only; torchrun across them)")
    spot: bool = Field(default=False, description="spot/preemptible instances (managed jobs recover)")
    region: str | None = None
    disk_size: int | None = Field(default=None, ge=10, description="GB (template default otherwise)")
    cluster: str | None = Field(default=None, description="run on this named cluster (sky.launch) instead of a "
                                                          "managed job (sky.jobs.launch)")
    idle_minutes_to_autostop: int | None = Field(default=30, ge=0, description="named cluster: autostop")
    secret_blocks: dict[str, str] = Field(
        default_factory=dict, description="env var name → Prefect Secret block holding its value (fallback when "
                                          "the variable is not set)")
    env: dict[str, str] = Field(default_factory=dict, description="extra non-secret env vars for the job")

    @model_validator(mode="after")
    def _nodes(self) -> SkyPilotCompute:
        if self.nodes > 1 and self.cloud != "gcp":
            raise ValueError("compute.nodes > 1 needs cloud 'gcp' (RunPod is single node)")
        return self

    @property
    def remote(self) -> bool:
        return True


# ------------------------------------------------------------------------------------------ credentials
def _scheme(store: StoreConfig) -> str:
    return store.root.split("://", 1)[0] if "://" in store.root else "file"


def required_secrets(compute: SkyPilotCompute, store: StoreConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) env var names whose values the job needs to reach the artifact root."""
    required: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if _scheme(store) == "s3" else ()
    return required + tuple(k for k in compute.secret_blocks if k not in required), OPTIONAL_SECRETS


def _secret_from_block(block: str) -> str | None:
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(block).get()
    except Exception:  # noqa: BLE001 — a missing block reads as a missing credential
        return None
    return value if isinstance(value, str) else json.dumps(value)


def resolve_secrets(compute: SkyPilotCompute, store: StoreConfig,
                    env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The job's credential values, from the environment or Prefect Secret blocks; one-line error when missing."""
    env = os.environ if env is None else env
    required, optional = required_secrets(compute, store)
    out: dict[str, str] = {}
    for name in (*required, *optional):
        value = env.get(name) or (_secret_from_block(compute.secret_blocks[name])
                                  if name in compute.secret_blocks else None)
        if value:
            out[name] = value
    if missing := [n for n in required if n not in out]:
        raise ComputeError(f"missing credentials for {store.root}: set {', '.join(missing)} in the environment or "
                           "name Prefect Secret blocks for them in compute.secret_blocks")
    return out


def preflight(compute: SkyPilotCompute, store: StoreConfig, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Checks before anything is launched; returns the resolved secrets."""
    env = os.environ if env is None else env
    scheme = _scheme(store)
    if scheme not in ("s3", "gs"):
        raise ComputeError(f"backend {compute.backend!r} needs an s3:// or gs:// artifact root (the job cannot "
                           f"reach {store.root})")
    if scheme == "gs" and compute.cloud != "gcp" and not env.get("GOOGLE_APPLICATION_CREDENTIALS"):
        raise ComputeError(f"missing credentials for {store.root} on {compute.cloud}: set "
                           "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file")
    key = env.get("GOOGLE_APPLICATION_CREDENTIALS")
    if scheme == "gs" and key and not Path(key).expanduser().is_file():
        raise ComputeError(f"GOOGLE_APPLICATION_CREDENTIALS={key} is not a file")
    return resolve_secrets(compute, store, env)


# --------------------------------------------------------------------------------------------- rendering
def request_uri(store: ArtifactStore, req: StageRequest) -> str:
    return f"{store.protocol}://{store.root_path}/requests/{req.stage}/{req.key}.json"


def render_task(
    compute: SkyPilotCompute,
    req: StageRequest,
    req_uri: str,
    secret_names: list[str] | tuple[str, ...] = (),
    *,
    env: Mapping[str, str] | None = None,
    workdir: Path = PROJECT_ROOT,
) -> str:
    """The SkyPilot task YAML of one stage run (no secret values: ``secrets`` lists names with null values)."""
    env = os.environ if env is None else env
    template = INFRA_DIR / f"{compute.cloud}.yaml"
    task: dict[str, Any] = yaml.safe_load(template.read_text())
    task["name"] = f"bitdistill-{req.stage}-{req.key[:8]}"
    task["workdir"] = str(workdir)
    task["num_nodes"] = compute.nodes
    res = task.setdefault("resources", {})
    res["infra"] = compute.cloud if not compute.region else f"{compute.cloud}/{compute.region}"
    if compute.accelerators:
        res["accelerators"] = compute.accelerators
    res["use_spot"] = compute.spot
    if compute.disk_size:
        res["disk_size"] = compute.disk_size
    envs = task.setdefault("envs", {})
    envs["BITDISTILL_REQUEST"] = req_uri
    envs[STORAGE_OPTIONS_ENV] = json.dumps(req.store.storage_options, sort_keys=True)
    envs.update({k: env[k] for k in PASS_ENV if env.get(k)})
    envs.update(compute.env)
    if req.store.root.startswith("gs://") and env.get("GOOGLE_APPLICATION_CREDENTIALS"):
        task.setdefault("file_mounts", {})[GCS_KEY_REMOTE] = str(Path(env["GOOGLE_APPLICATION_CREDENTIALS"])
                                                                   .expanduser().resolve())
        envs["GOOGLE_APPLICATION_CREDENTIALS"] = GCS_KEY_REMOTE
    if leaked := [k for k in envs if k in secret_names]:
        raise ComputeError(f"secret(s) {', '.join(leaked)} must not be set in compute.env")
    if secret_names:
        task["secrets"] = {name: None for name in secret_names}  # values are filled in at launch, in memory
    return yaml.dump(task, Dumper=_BlockDumper, sort_keys=False)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (setup, run) as literal ``|`` blocks, as in the templates."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


# -------------------------------------------------------------------------------------------- launchers
class Launcher(Protocol):
    def __call__(self, task_yaml: str, secrets: Mapping[str, str], *, cluster: str | None,
                 idle_minutes_to_autostop: int | None, log: LogStream) -> int | None:
        """Launch the task, wait for it, stream its logs to ``log``; return its exit code (None: unknown)."""
        ...


def sky_launcher(task_yaml: str, secrets: Mapping[str, str], *, cluster: str | None,
                 idle_minutes_to_autostop: int | None, log: LogStream) -> int | None:
    """The real launcher: ``sky.jobs.launch`` (managed job) or ``sky.launch`` on a named cluster."""
    import sky
    from sky import jobs

    task = sky.Task.from_yaml_config(yaml.safe_load(task_yaml), secrets_overrides=list(secrets.items()))
    if cluster is None:
        request_id = jobs.launch(task, name=task.name)
        job_ids, _ = sky.stream_and_get(request_id, output_stream=log)  # sky.get plus the launch's own logs
        if not job_ids:
            raise ComputeError("sky.jobs.launch returned no job id")
        return jobs.tail_logs(job_id=job_ids[0], follow=True, output_stream=log)
    request_id = sky.launch(task, cluster_name=cluster, idle_minutes_to_autostop=idle_minutes_to_autostop)
    job_id, _ = sky.stream_and_get(request_id, output_stream=log)
    return sky.tail_logs(cluster, job_id, follow=True, output_stream=log)


def local_launcher(extra_env: Mapping[str, str] | None = None, gpus_per_node: int = 0) -> Launcher:
    """A launcher that runs the rendered ``setup``-less ``run`` command here (one node): tests and dry runs."""

    def launch(task_yaml: str, secrets: Mapping[str, str], *, cluster: str | None,
               idle_minutes_to_autostop: int | None, log: LogStream) -> int | None:
        task = yaml.safe_load(task_yaml)
        env = {**os.environ, **{k: str(v) for k, v in (task.get("envs") or {}).items()}, **secrets,
               "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NODE_IPS": "127.0.0.1", "SKYPILOT_NUM_NODES": "1",
               "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus_per_node), **(extra_env or {})}
        return stream_process(["bash", "-c", task["run"]], env, Path(task.get("workdir") or PROJECT_ROOT), log)

    return launch


# ---------------------------------------------------------------------------------------------- backend
def run(request: StageRequest, cfg: SkyPilotCompute, logger: Logger, *, progress: Progress = no_progress,
        launcher: Launcher | None = None) -> ArtifactRef:
    """Upload the request, render and launch the task (``launcher``, default :func:`sky_launcher`), wait for it,
    read the manifest back."""
    secrets = preflight(cfg, request.store)
    store = ArtifactStore.from_config(request.store)
    stream = LogStream(logger.info, secrets)
    uri = request_uri(store, request)
    store.fs.makedirs(uri.split("://", 1)[1].rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe_file(uri.split("://", 1)[1], request.model_dump_json(indent=2).encode())
    task_yaml = render_task(cfg, request, uri, sorted(secrets))
    where = f"cluster {cfg.cluster}" if cfg.cluster else "a managed job"
    logger.info("%s: launching on %s (%s%s, %d node(s)%s)", request.stage, where, cfg.cloud,
                f", {cfg.accelerators}" if cfg.accelerators else "", cfg.nodes, ", spot" if cfg.spot else "")
    code = (launcher or sky_launcher)(task_yaml, secrets, cluster=cfg.cluster,
                                      idle_minutes_to_autostop=cfg.idle_minutes_to_autostop, log=stream)
    stream.flush()
    return committed(store, request, code, cfg.backend, logger)

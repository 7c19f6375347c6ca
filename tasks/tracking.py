"""MLflow lineage of flow ``bitdistill``: a parent run per flow run, a nested run per stage.

Params stay few: a run's full config is one ``config.json`` artifact; the params are a handful of key values
(:data:`KEY_PARAMS`: steps, learning rate, batch size, temperature, rank, ...). Each stage's nested run spans the
stage's wall time (so MLflow's Duration column is the stage's time, 0 for a cache hit) and carries
``stage_wall_s`` and ``tokens`` as metrics, the trainer's per-step metrics, the input datasets (the world's splits
with their content digests, via ``log_inputs``), the manifest and a loss-curve plot as artifacts, and tags linking
it to its artifact (URI + manifest sha256) and to the runs that produced its upstream artifacts. A stage served
from a cache still gets a nested run (final metrics) tagged ``bitdistill.cached`` and linked to the run that
produced the artifact (``bitdistill.produced_by_run_id``). The parent run carries the final evaluation
(``eval/*``) and the pipeline's wall time. The final student is recorded as an external logged model.

Runs of killed attempts (a SIGKILLed flow run leaves its MLflow runs ``RUNNING``) are closed as ``KILLED`` by the
next run: the retry of the same flow run, or any later run once Prefect holds the old flow run as final.

Tracking URI: the pipeline's ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else sqlite under the work dir.
Lineage is secondary to training: an HTTP tracking server that does not answer ``/health`` within
``tracking.connect_timeout_s`` is a warning and the flow goes on without lineage, or, with
``tracking.required: true``, the run is refused before any stage runs. Later HTTP calls retry at most
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` times (default here 2, about 6 s, instead of MLflow's 7, about 4 min).

Credentials: ``tracking.uri`` holding any (``user:password@``, ``?token=``) is refused, since the config is stored
as the flow run's parameters and in MLflow; they go in ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``
(or ``MLFLOW_TRACKING_TOKEN``), or in ``MLFLOW_TRACKING_URI`` of the worker's environment, which is used as it is
and only ever shown redacted (:func:`bitnet.config.redact_uri`): in logs, errors, the run summary and MLflow.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bitnet.config import redact_text, redact_uri, refuse_credentials
from tasks.artifacts import ArtifactRef, ArtifactStore, Manifest

if TYPE_CHECKING:
    from urllib.request import Request

    from mlflow import MlflowClient

TAG = "bitdistill"


# a stage's few params; the whole config is the run's config.json artifact
KEY_PARAMS = ("pretrained", "tokenizer", "vocab_size", "seq_len", "train.max_steps", "train.lr", "train.warmup_steps",
              "train.grad_accum", "train.precision", "data.batch_size", "temperature", "alpha", "beta", "gamma",
              "lambda_warmup_steps", "rank", "split", "max_batches")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # backoff 2 s, 4 s: a dead server costs seconds
# MLflow prints "View run … at: <tracking URI>/#/…" to stdout at the end of every run, credentials included; the
# parent run's link is in the run summary (Lineage.location), redacted
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


class TrackingError(RuntimeError):
    """The tracking server is required (``tracking.required``) and cannot be reached."""


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    enabled: bool = True
    uri: str | None = Field(
        default=None, description="tracking URI; default MLFLOW_TRACKING_URI, else sqlite in the work dir"
    )
    experiment: str = "bitdistill"
    required: bool = Field(default=False, description="refuse the run when the tracking server cannot be reached "
                           "(default: warn and run without lineage)")
    connect_timeout_s: float = Field(default=5.0, gt=0, description="how long an HTTP tracking server may take to "
                                     "answer /health before it counts as unreachable")

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        refuse_credentials(v, "tracking.uri", "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or "
                           "MLFLOW_TRACKING_TOKEN) in the environment, or the whole URI as MLFLOW_TRACKING_URI")
        return v


def check_reachable(uri: str, timeout_s: float) -> str | None:
    """``None`` when an HTTP(S) tracking server answers ``GET /health`` within ``timeout_s`` (other URIs are not
    checked), else why not, in one line."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(health_request(uri), timeout=timeout_s) as r:
            return None if r.status == 200 else f"GET /health answered {r.status}"
    except urllib.error.HTTPError as e:
        return f"GET /health answered {e.code}"
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return redact_text(f"no answer within {timeout_s:g} s ({reason})", uri)


def health_request(uri: str) -> Request:
    """``GET {uri}/health`` with the credentials MLflow itself would send: the URI's ``user:password@`` (urllib
    takes none inside a URL), else ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``, else ``MLFLOW_TRACKING_TOKEN``."""
    import base64
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(uri)
    user, password = parts.username, parts.password
    if user is None:
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    netloc = parts.netloc.rpartition("@")[2]
    url = urllib.parse.urlunsplit(parts._replace(netloc=netloc, path=f"{parts.path.rstrip('/')}/health"))
    headers = {}
    if user is not None:
        pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    elif token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    return urllib.request.Request(url, headers=headers)


def key_params(config: dict[str, Any]) -> dict[str, str]:
    """The :data:`KEY_PARAMS` present in a stage config, flattened to dotted keys."""
    flat = flatten(config)
    return {k: flat[k] for k in KEY_PARAMS if k in flat and flat[k] not in ("None", "null")}


def default_tracking_uri(store: ArtifactStore, preset: str) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment); sqlite next to a local artifact root."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri, None
    workdir = Path(store.root_path).parent if store.local else Path("runs") / preset
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{workdir / 'mlflow.db'}", (workdir / "mlartifacts").as_uri()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | dict) else str(v)
    return out


def _numeric(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class Lineage:
    """The MLflow side of one flow run (all methods swallow and log tracking errors)."""

    def __init__(self, cfg: TrackingConfig, store: ArtifactStore, preset: str, flow_run_id: str | None,
                 flow_run_name: str | None, params: dict[str, Any], logger: logging.Logger | logging.LoggerAdapter,
                 attempt: int = 1, is_stale: Callable[[str], bool] | None = None):
        """``attempt``: Prefect's run count of this flow run (2+ after ``prefect flow-run retry``); ``is_stale``:
        whether another flow run (by id) is over, so that its ``RUNNING`` MLflow runs are leftovers of a kill."""
        self.store, self.logger = store, logger
        self.client: MlflowClient | None = None
        self.parent: str | None = None
        self.stage_runs: dict[str, str] = {}
        self.started = time.time()
        if not cfg.enabled:
            return
        uri, artifact_location = (cfg.uri, None) if cfg.uri else default_tracking_uri(store, preset)
        self.uri = uri
        self.shown = redact_uri(uri)  # MLFLOW_TRACKING_URI may hold credentials: used, never shown
        if (why := check_reachable(uri, cfg.connect_timeout_s)) is not None:
            if cfg.required:
                raise TrackingError(f"MLflow tracking server {self.shown} is unreachable: {why} "
                                    "(tracking.required is true)")
            logger.warning("MLflow tracking disabled for this run: %s is unreachable: %s", self.shown, why)
            return
        try:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(cfg.experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
                cfg.experiment, artifact_location=artifact_location)
            self.close_stale(str(flow_run_id), is_stale)
            run = self.client.create_run(self.experiment_id, run_name=flow_run_name, tags={
                f"{TAG}.prefect_flow_run_id": str(flow_run_id), f"{TAG}.preset": preset,
                f"{TAG}.artifact_root": store.root_uri, f"{TAG}.attempt": str(attempt)})
            self.parent = run.info.run_id
            self._config(self.parent, params, {"preset": preset, "store.root": store.root_uri,
                                               "reuse_only": params.get("reuse_only")})
            logger.info("MLflow: run %s in experiment %r at %s", self.parent, cfg.experiment, self.shown)
        except Exception as e:  # noqa: BLE001 — lineage must not stop the pipeline
            if cfg.required:
                raise TrackingError(f"MLflow tracking at {self.shown} failed: {self._why(e)}") from None
            self._disable(e)

    def close_stale(self, flow_run_id: str, is_stale: Callable[[str], bool] | None) -> list[str]:
        """Close the ``RUNNING`` runs that killed flow runs left behind as ``KILLED``: those of this flow run's
        earlier attempts, and (with ``is_stale``) those of other flow runs that Prefect holds as final."""
        from mlflow.entities import RunStatus, ViewType

        assert self.client is not None
        running = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                          run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)
        parents = {r.info.run_id: r.data.tags.get(f"{TAG}.prefect_flow_run_id") for r in running
                   if f"{TAG}.prefect_flow_run_id" in r.data.tags}
        verdict: dict[str, bool] = {}
        closed: list[str] = []
        for run in running:
            parent = run.data.tags.get("mlflow.parentRunId", run.info.run_id)
            fr = parents.get(parent) or run.data.tags.get(f"{TAG}.prefect_flow_run_id")
            if fr is None:
                continue
            if fr not in verdict:
                verdict[fr] = fr == flow_run_id or (is_stale is not None and _safe(is_stale, fr))
            if verdict[fr]:
                self.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
                closed.append(run.info.run_id)
        if closed:
            self.logger.info("MLflow: closed %d run(s) of killed flow runs as KILLED", len(closed))
        return closed

    @property
    def location(self) -> str | None:
        """Where the parent run is: its UI link for an HTTP tracking server, else the store URI and run id."""
        if self.client is None or self.parent is None:
            return None
        if self.uri.startswith(("http://", "https://")):
            return f"{self.shown.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.parent}"
        return f"{self.shown} (experiment {self.experiment_id}, run {self.parent})"

    def _why(self, e: Exception) -> str:
        """An MLflow error in one line, without the tracking URI's credentials (MLflow quotes request URLs)."""
        return redact_text(" ".join(str(e).split()), self.uri)[:300]

    def _disable(self, e: Exception) -> None:
        self.logger.warning("MLflow tracking disabled for this run: %s", self._why(e))
        self.client = None

    def _config(self, run_id: str, config: dict[str, Any], params: dict[str, Any]) -> None:
        """The whole config as the artifact ``config.json``, and a few key ``params``."""
        from mlflow.entities import Param

        assert self.client is not None
        items = [Param(k[:250], str(v)[:6000]) for k, v in params.items() if v is not None]
        if items:
            self.client.log_batch(run_id, params=items)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(config, indent=2))
            self.client.log_artifact(run_id, str(Path(tmp) / "config.json"))

    # ------------------------------------------------------------------------------------------- stages
    def stage(self, name: str, ref: ArtifactRef, manifest: Manifest, *, cached: bool, wall_s: float,
              started: float | None = None) -> None:
        """A nested run for stage ``name`` spanning ``started`` (epoch seconds) to ``started + wall_s``."""
        if self.client is None:
            return
        try:
            self._stage(name, ref, manifest, cached, wall_s, started if started is not None else time.time() - wall_s)
        except Exception as e:  # noqa: BLE001
            self._disable(e)

    def _producer_run(self, ref: ArtifactRef) -> str | None:
        assert self.client is not None
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG}.manifest_sha256` = '{ref.sha256}' and tags.`{TAG}.cached` = 'false'",
            max_results=1, order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None

    def _stage(self, name: str, ref: ArtifactRef, manifest: Manifest, cached: bool, wall_s: float,
               started: float) -> None:
        from mlflow.entities import Metric, RunStatus

        client = self.client
        assert client is not None and self.parent is not None
        tags = {"mlflow.parentRunId": self.parent, f"{TAG}.stage": name, f"{TAG}.artifact_uri": ref.uri,
                f"{TAG}.manifest_sha256": ref.sha256, f"{TAG}.cached": str(cached).lower(),
                f"{TAG}.code": manifest.code, f"{TAG}.prefect_task_run_id": str(manifest.producer.get("task_run_id"))}
        for up_name, up in manifest.upstream.items():
            tags[f"{TAG}.upstream.{up_name}"] = up.uri
            if (up_run := self.stage_runs.get(up.sha256) or self._producer_run(up)) is not None:
                tags[f"{TAG}.upstream_run.{up_name}"] = up_run
        if cached and (producer := self._producer_run(ref)) is not None:
            tags[f"{TAG}.produced_by_run_id"] = producer
        start_ms = int(started * 1000)
        run_id = client.create_run(self.experiment_id, run_name=name, tags=tags, start_time=start_ms).info.run_id
        self.stage_runs[ref.sha256] = tags.get(f"{TAG}.produced_by_run_id", run_id)
        self._config(run_id, manifest.config, key_params(manifest.config))
        now = int(time.time() * 1000)
        final = {**_numeric(manifest.metrics), "stage_wall_s": wall_s,
                 "tokens": float(manifest.metrics.get("tokens") or 0)}
        metrics = [Metric(k, v, now, 0) for k, v in final.items()]
        history = [] if cached else self._history(ref, manifest)
        for rec in history:
            step = int(rec.get("step", 0))
            metrics += [Metric(f"train/{k}", v, now, step) for k, v in _numeric(rec).items() if k != "step"]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        if not cached:
            self._inputs(run_id, manifest)
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "manifest.json").write_text(manifest.model_dump_json(indent=2))
                client.log_artifact(run_id, str(Path(tmp) / "manifest.json"))
                if history and (png := _loss_curve(name, history, Path(tmp))) is not None:
                    client.log_artifact(run_id, str(png), "plots")
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED), end_time=start_ms + int(wall_s * 1000))

    def _history(self, ref: ArtifactRef, manifest: Manifest) -> list[dict[str, Any]]:
        rel = "train/metrics.jsonl"
        if rel not in manifest.files:
            return []
        with self.store.fs.open(f"{self.store.path_of(ref.uri)}/{rel}", "rb") as f:
            return [json.loads(line) for line in io.TextIOWrapper(f) if line.strip()]

    def _inputs(self, run_id: str, manifest: Manifest) -> None:
        """The datasets a stage read: the corpus (world) or the world's packed splits, with their digests."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        assert self.client is not None
        found: list[tuple[str, str, str, str]] = []  # (name, source uri, digest, context)
        if manifest.stage == "world":
            src = manifest.config.get("source", {})
            uri = src.get("url") or src.get("path") or f"hf://{src.get('name')}"
            found.append(("corpus", uri if "://" in uri else Path(uri).resolve().as_uri(), manifest.key, "source"))
        elif (world := manifest.upstream.get("world")) is not None:
            splits = self.store.read_manifest(world).metrics.get("splits", {})
            for split, context in (("train", "training"), ("validation", "validation")):
                if split in splits:
                    found.append((f"world-{split}", f"{world.uri}/data/{split}", str(splits[split]["digest"]), context))
        inputs = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, uri, digest, context in found:
                ds = MetaDataset(resolve_dataset_source(uri), name=name, digest=digest[:32])
                inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)

    # ------------------------------------------------------------------------------------------- finish
    def finish(
        self, summary: dict[str, Any], student: ArtifactRef | None, gguf: str | None, failed: bool = False
    ) -> None:
        if self.client is None or self.parent is None:
            return
        try:
            from mlflow.entities import Metric, RunStatus

            if student is not None:
                import mlflow

                mlflow.set_tracking_uri(self.uri)
                source_run = self.stage_runs.get(student.sha256, self.parent)
                mlflow.create_external_model(
                    name="bitdistill-student", source_run_id=source_run, experiment_id=self.experiment_id,
                    model_type="bitnet-student",
                    tags={f"{TAG}.artifact_uri": student.uri, f"{TAG}.manifest_sha256": student.sha256,
                          f"{TAG}.gguf": gguf or ""})
            now = int(time.time() * 1000)
            final = {f"eval/{k}": v for k, v in _numeric(summary.get("evaluation") or {}).items()}
            final["pipeline_wall_s"] = time.time() - self.started
            final["stages_run"] = float(sum(r.get("status") == "completed" for r in summary.get("stages", [])))
            self.client.log_batch(self.parent, metrics=[Metric(k, v, now, 0) for k, v in final.items()])
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "summary.json").write_text(json.dumps(summary, indent=2))
                self.client.log_artifact(self.parent, str(Path(tmp) / "summary.json"))
            status = RunStatus.FAILED if failed else RunStatus.FINISHED
            self.client.set_terminated(self.parent, RunStatus.to_string(status))
        except Exception as e:  # noqa: BLE001
            self._disable(e)


def _safe(fn: Callable[[str], bool], arg: str) -> bool:
    try:
        return fn(arg)
    except Exception:  # noqa: BLE001 — an unknown verdict leaves the run as it is
        return False


def _loss_curve(stage: str, history: list[dict[str, Any]], out_dir: Path) -> Path | None:
    points = [(r["step"], r["loss"]) for r in history if isinstance(r.get("loss"), int | float)]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*points), label="train loss")
    val = [(r["step"], r["val_loss"]) for r in history if isinstance(r.get("val_loss"), int | float)]
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{stage}")
    ax.legend()
    fig.tight_layout()
    path = out_dir / "loss_curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""MLflow lineage of flow ``bitdistill``: a parent run per flow run, a nested run per stage.

Params stay few: a run's full config is one ``config.json`` artifact; the params are a handful of key values
(:data:`KEY_PARAMS`: steps, learning rate, batch size, temperature, rank, ...).

Every attempt of every stage has a nested run, opened ``RUNNING`` when the stage starts (:meth:`Lineage.begin`) and
spanning the stage's wall time (so MLflow's Duration column is the stage's time, ~0 for a cache hit). While it trains,
the stage's progress reporter logs ``progress/step``, ``progress/tokens`` and ``progress/loss`` to it. It ends

- ``FINISHED`` (:meth:`Lineage.stage`) with ``stage_wall_s``, ``tokens`` (what this attempt trained: a resumed
  stage counts only the steps after its checkpoint, a cache hit 0) and ``tokens_total`` (what the artifact's
  training took, resumed steps included) as metrics, the trainer's per-step metrics, the input datasets (the
  world's splits it read, with their content digests, via ``log_inputs``: train/validation for training stages,
  the evaluated split for ``eval``), the manifest and a loss-curve plot as artifacts, and tags linking it to its
  artifact (URI + manifest sha256) and to the runs that produced its upstream artifacts. A stage served from a
  cache is tagged ``bitdistill.cached`` and linked to the run that produced the artifact
  (``bitdistill.produced_by_run_id``);
- ``FAILED`` (:meth:`Lineage.stage_failed`: the stage failed or was refused) with an ``error`` tag (one line),
  ``stage_wall_s`` and the ``tokens`` it trained before it failed;
- ``KILLED`` when its process died: closed by the flow's ``on_cancellation`` / ``on_crashed`` hook
  (:func:`close_flow_run`, at the time Prefect marked the state) or, for a SIGKILL that no hook saw, by the next
  run (:func:`close_stale`: the retry of the same flow run, or any later run once Prefect holds the old
  flow run as final), which ends it at its last sign of life (its last progress metric), not at the time it is
  found.

The parent run carries the final evaluation (``eval/*``) and the pipeline's wall time, and an ``error`` tag when
it ends ``FAILED`` or ``KILLED``. The final student is recorded as an external logged model once: a run whose
student already has a logged model (a cache hit) logs none.

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

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bitnet.config import redact_text, redact_uri, refuse_credentials
from tasks.artifacts import ArtifactRef, ArtifactStore, Manifest
from tasks.mlflow_records import attempt_tokens, log_config, log_stage_record, log_text, numeric
from tasks.progress import AttemptListener

if TYPE_CHECKING:
    from urllib.request import Request

    from mlflow import MlflowClient
    from mlflow.entities import Run

TAG = "bitdistill"


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


def default_tracking_uri(store: ArtifactStore, preset: str, create: bool = True) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment); sqlite next to a local artifact root, or under the
    data directory's ``runs/<preset>`` for a remote one (its directory made unless ``create`` is false)."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri, None
    if store.local:
        workdir = Path(store.root_path).parent.resolve()
    else:  # a remote root: the data directory, never the working directory (bitnet.io.data_home)
        from bitnet.io import data_home

        workdir = data_home() / "runs" / preset
    if create:
        workdir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{workdir / 'mlflow.db'}", (workdir / "mlartifacts").as_uri()


def one_line(text: str, limit: int = 1000) -> str:
    """An error message as one line (MLflow's ``error`` tag)."""
    return " ".join(str(text).split())[:limit]


@dataclass
class Attempt:
    """The open nested run of a stage's attempt that is running."""

    run_id: str
    started: float
    tokens: float = 0.0


def attempt_wall(attempt: Attempt, started: float, wall_s: float) -> float:
    """The wall time of ``attempt`` within a stage call that ran ``wall_s`` from ``started`` (retried attempts
    start later)."""
    return wall_s if attempt.started == started else max(0.0, started + wall_s - attempt.started)


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
        self.open: dict[str, Attempt] = {}
        self.attempt = str(attempt)
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
            if closed := close_stale(self.client, self.experiment_id, str(flow_run_id), is_stale):
                logger.info("MLflow: closed %d run(s) of killed flow runs as KILLED", len(closed))
            run = self.client.create_run(self.experiment_id, run_name=flow_run_name, tags={
                f"{TAG}.prefect_flow_run_id": str(flow_run_id), f"{TAG}.preset": preset,
                f"{TAG}.artifact_root": store.root_uri, f"{TAG}.attempt": str(attempt)})
            self.parent = run.info.run_id
            log_config(self.client, self.parent, params, {"preset": preset, "store.root": store.root_uri,
                                                          "reuse_only": params.get("reuse_only")})
            logger.info("MLflow: run %s in experiment %r at %s", self.parent, cfg.experiment, self.shown)
        except Exception as e:  # noqa: BLE001 — lineage must not stop the pipeline
            if cfg.required:
                raise TrackingError(f"MLflow tracking at {self.shown} failed: {self._why(e)}") from None
            self._disable(e)

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

    # ------------------------------------------------------------------------------------------- stages
    def begin(self, name: str, started: float) -> AttemptListener | None:
        """Open stage ``name``'s nested run (``RUNNING`` from ``started``, epoch seconds) before it runs, so that an
        attempt that dies still has a run; returns the listener that logs the attempt's progress to it."""
        if self.client is None or self.parent is None:
            return None
        try:
            self.open[name] = Attempt(self._stage_run(name, started), started)
        except Exception as e:  # noqa: BLE001
            self._disable(e)
            return None
        return functools.partial(self._progress, name)

    def retrying(self, name: str, error: str) -> None:
        """A failed attempt of stage ``name`` that Prefect retries: its run ends ``FAILED`` (:meth:`stage_failed`)
        and the next attempt gets a run of its own, from now."""
        if self.client is None or (attempt := self.open.get(name)) is None:
            return
        now = time.time()
        self.stage_failed(name, error, wall_s=now - attempt.started, started=attempt.started)
        try:
            self.open[name] = Attempt(self._stage_run(name, now), now)
        except Exception as e:  # noqa: BLE001
            self._disable(e)

    def _stage_run(self, name: str, started: float) -> str:
        assert self.client is not None and self.parent is not None
        tags = {"mlflow.parentRunId": self.parent, f"{TAG}.stage": name, f"{TAG}.attempt": self.attempt}
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags,
                                      start_time=int(started * 1000)).info.run_id

    def _progress(self, name: str, record: dict[str, float]) -> None:
        """A step of stage ``name``'s running attempt (from :class:`tasks.progress.TrainProgress`, its side
        thread)."""
        from mlflow.entities import Metric

        if self.client is None or (attempt := self.open.get(name)) is None:
            return
        attempt.tokens = float(record.get("tokens", attempt.tokens))
        now, step = int(time.time() * 1000), int(record.get("step", 0))
        try:
            self.client.log_batch(attempt.run_id, metrics=[Metric(f"progress/{k}", float(v), now, step)
                                                           for k, v in record.items()])
        except Exception as e:  # noqa: BLE001
            self._disable(e)

    def stage(self, name: str, ref: ArtifactRef, manifest: Manifest, *, cached: bool, wall_s: float,
              started: float | None = None) -> None:
        """Close stage ``name``'s nested run ``FINISHED``, spanning ``started`` (epoch seconds) to
        ``started + wall_s`` (a run :meth:`begin` did not open is created here)."""
        if self.client is None:
            return
        try:
            self._stage(name, ref, manifest, cached, wall_s, started if started is not None else time.time() - wall_s)
        except Exception as e:  # noqa: BLE001
            self._disable(e)

    def stage_failed(self, name: str, error: str, *, wall_s: float, started: float | None = None) -> None:
        """Close stage ``name``'s nested run ``FAILED``: ``error`` (one line) as its ``error`` tag, its wall time and
        the tokens it trained before it failed as metrics (a stage refused before it started gets a run too)."""
        if self.client is None or self.parent is None:
            return
        try:
            from mlflow.entities import Metric, RunStatus, RunTag

            start = started if started is not None else time.time() - wall_s
            if (attempt := self.open.pop(name, None)) is None:
                attempt = Attempt(self._stage_run(name, start), start)
            wall = attempt_wall(attempt, start, wall_s)
            now = int(time.time() * 1000)
            self.client.log_batch(attempt.run_id, tags=[RunTag("error", one_line(error))], metrics=[
                Metric("stage_wall_s", wall, now, 0), Metric("tokens", attempt.tokens, now, 0)])
            self.client.set_terminated(attempt.run_id, RunStatus.to_string(RunStatus.FAILED),
                                       end_time=int((attempt.started + wall) * 1000))
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
        from mlflow.entities import RunStatus, RunTag

        client = self.client
        assert client is not None and self.parent is not None
        tags = {f"{TAG}.artifact_uri": ref.uri, f"{TAG}.manifest_sha256": ref.sha256,
                f"{TAG}.cached": str(cached).lower(), f"{TAG}.code": manifest.code,
                f"{TAG}.prefect_task_run_id": str(manifest.producer.get("task_run_id"))}
        for up_name, up in manifest.upstream.items():
            tags[f"{TAG}.upstream.{up_name}"] = up.uri
            if (up_run := self.stage_runs.get(up.sha256) or self._producer_run(up)) is not None:
                tags[f"{TAG}.upstream_run.{up_name}"] = up_run
        if cached and (producer := self._producer_run(ref)) is not None:
            tags[f"{TAG}.produced_by_run_id"] = producer
        attempt = self.open.pop(name, None)
        if attempt is None:
            attempt = Attempt(self._stage_run(name, started), started)
        run_id, start_ms = attempt.run_id, int(attempt.started * 1000)
        wall_s = attempt_wall(attempt, started, wall_s)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.stage_runs[ref.sha256] = tags.get(f"{TAG}.produced_by_run_id", run_id)
        log_stage_record(client, self.store, run_id, name, ref, manifest, cached=cached, wall_s=wall_s,
                         tokens=0.0 if cached else attempt_tokens(manifest.metrics))
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED), end_time=start_ms + int(wall_s * 1000))

    # ------------------------------------------------------------------------------------------- finish
    def finish(
        self, summary: dict[str, Any], student: ArtifactRef | None, gguf: str | None, failed: bool = False,
        error: str | None = None,
    ) -> None:
        """Close the parent run: ``FINISHED``, or ``FAILED`` with ``error`` (one line) as its ``error`` tag."""
        if self.client is None or self.parent is None:
            return
        try:
            from mlflow.entities import Metric, RunStatus

            if error is not None:
                self.client.set_tag(self.parent, "error", one_line(error))
            if student is not None and not self._has_model(student):
                import mlflow

                mlflow.set_tracking_uri(self.uri)
                source_run = self.stage_runs.get(student.sha256, self.parent)
                mlflow.create_external_model(
                    name="bitdistill-student", source_run_id=source_run, experiment_id=self.experiment_id,
                    model_type="bitnet-student",
                    tags={f"{TAG}.artifact_uri": student.uri, f"{TAG}.manifest_sha256": student.sha256,
                          f"{TAG}.gguf": gguf or ""})
            now = int(time.time() * 1000)
            final = {f"eval/{k}": v for k, v in numeric(summary.get("evaluation") or {}).items()}
            final["pipeline_wall_s"] = time.time() - self.started
            final["stages_run"] = float(sum(r.get("status") == "completed" for r in summary.get("stages", [])))
            self.client.log_batch(self.parent, metrics=[Metric(k, v, now, 0) for k, v in final.items()])
            log_text(self.client, self.parent, "summary.json", json.dumps(summary, indent=2))
            status = RunStatus.FAILED if failed else RunStatus.FINISHED
            self.client.set_terminated(self.parent, RunStatus.to_string(status))
        except Exception as e:  # noqa: BLE001
            self._disable(e)

    def _has_model(self, student: ArtifactRef) -> bool:
        """Whether this experiment already has a logged model of this student (a cache hit logs none)."""
        assert self.client is not None
        return bool(self.client.search_logged_models(
            [self.experiment_id], filter_string=f"tags.`{TAG}.manifest_sha256` = '{student.sha256}'", max_results=1))


# ------------------------------------------------------------------------------------------- closing runs
def last_seen(client: MlflowClient, run: Run) -> int:
    """When ``run`` was last alive (epoch ms): its end, its last progress metric, or for a parent the last sign of
    life of its nested runs; at least its start."""
    times = [run.info.start_time or 0, run.info.end_time or 0]
    times += [m.timestamp for m in client.get_metric_history(run.info.run_id, "progress/step")]
    if f"{TAG}.prefect_flow_run_id" in run.data.tags:
        children = client.search_runs([run.info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        times += [last_seen(client, c) for c in children]
    return max(times)


def close_stale(client: MlflowClient, experiment_id: str, flow_run_id: str,
                is_stale: Callable[[str], bool] | None) -> list[str]:
    """Close the ``RUNNING`` runs that killed flow runs left behind as ``KILLED``: those of flow run
    ``flow_run_id``'s earlier attempts, and (with ``is_stale``) those of other flow runs that Prefect holds as final.
    Returns the closed run ids."""
    from mlflow.entities import RunStatus, ViewType

    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
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
            close_run(client, run, RunStatus.to_string(RunStatus.KILLED), last_seen(client, run),
                      "its flow run's process was killed")
            closed.append(run.info.run_id)
    return closed


def close_run(client: MlflowClient, run: Run, status: str, end_ms: int, error: str) -> None:
    """End ``run`` as ``status`` at ``end_ms`` with an ``error`` tag; a stage's run also gets its wall time and the
    tokens its attempt trained (its last ``progress/tokens``)."""
    from mlflow.entities import Metric, RunTag

    end_ms = max(end_ms, run.info.start_time or 0)
    metrics = []
    if f"{TAG}.stage" in run.data.tags:
        wall = (end_ms - (run.info.start_time or end_ms)) / 1000
        metrics = [Metric("stage_wall_s", wall, end_ms, 0),
                   Metric("tokens", float(run.data.metrics.get("progress/tokens", 0.0)), end_ms, 0)]
    client.log_batch(run.info.run_id, metrics=metrics, tags=[RunTag("error", one_line(error))])
    client.set_terminated(run.info.run_id, status, end_time=end_ms)


def close_flow_run(cfg: TrackingConfig, store: ArtifactStore, preset: str, flow_run_id: str, *, end_s: float,
                   error: str, status: str = "KILLED") -> list[str]:
    """Close the ``RUNNING`` MLflow runs of flow run ``flow_run_id`` (its parent and nested runs) as ``status`` at
    ``end_s`` (epoch seconds): the flow's on-cancellation / on-crashed hook. Returns the closed run ids; a
    tracking error is a :class:`TrackingError` of one line, credentials redacted."""
    if not cfg.enabled:
        return []
    uri = cfg.uri or default_tracking_uri(store, preset, create=False)[0]
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return []  # no run of this flow run was ever opened there
    if check_reachable(uri, cfg.connect_timeout_s) is not None:
        return []
    try:
        return _close_flow_run(uri, cfg.experiment, flow_run_id, int(end_s * 1000), error, status)
    except Exception as e:  # noqa: BLE001 — MLflow quotes request URLs: no credentials in the message
        raise TrackingError(redact_text(one_line(str(e), 300), uri)) from None


def _close_flow_run(uri: str, experiment: str, flow_run_id: str, end_ms: int, error: str, status: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    running = "attributes.status = 'RUNNING'"
    parents = client.search_runs([exp.experiment_id],
                                 filter_string=f"{running} and tags.`{TAG}.prefect_flow_run_id` = '{flow_run_id}'")
    runs = [r for p in parents for r in client.search_runs(
        [exp.experiment_id], filter_string=f"{running} and tags.`mlflow.parentRunId` = '{p.info.run_id}'")]
    for run in [*runs, *parents]:
        close_run(client, run, status, end_ms, error)
    return [r.info.run_id for r in [*runs, *parents]]


def _safe(fn: Callable[[str], bool], arg: str) -> bool:
    try:
        return fn(arg)
    except Exception:  # noqa: BLE001 — an unknown verdict leaves the run as it is
        return False



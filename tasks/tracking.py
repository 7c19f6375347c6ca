"""MLflow lineage of flow ``bitdistill``: a parent run per flow run, a nested run per stage.

Each stage's nested run carries the stage config as params, the trainer's per-step metrics, the input datasets
(the world's splits with their content digests, via ``log_inputs``), the manifest and a loss-curve plot as
artifacts, and tags linking it to its artifact (URI + manifest sha256) and to the runs that produced its
upstream artifacts. A stage served from a cache still gets a nested run (params, final metrics) tagged
``bitdistill.cached`` and linked to the run that produced the artifact (``bitdistill.produced_by_run_id``).
The final student is recorded as an external logged model (its weights stay in the artifact store).

Tracking URI: the pipeline's ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else sqlite under the work dir.
Lineage is secondary to training: an unreachable tracking server logs a warning and the flow goes on.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.artifacts import ArtifactRef, ArtifactStore, Manifest

if TYPE_CHECKING:
    from mlflow import MlflowClient

TAG = "bitdistill"


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    uri: str | None = Field(
        default=None, description="tracking URI; default MLFLOW_TRACKING_URI, else sqlite in the work dir"
    )
    experiment: str = "bitdistill"


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
                 flow_run_name: str | None, params: dict[str, Any], logger: logging.Logger | logging.LoggerAdapter):
        self.store, self.logger = store, logger
        self.client: MlflowClient | None = None
        self.parent: str | None = None
        self.stage_runs: dict[str, str] = {}
        if not cfg.enabled:
            return
        try:
            from mlflow import MlflowClient

            uri, artifact_location = (cfg.uri, None) if cfg.uri else default_tracking_uri(store, preset)
            self.uri = uri
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(cfg.experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
                cfg.experiment, artifact_location=artifact_location)
            run = self.client.create_run(self.experiment_id, run_name=flow_run_name, tags={
                f"{TAG}.prefect_flow_run_id": str(flow_run_id), f"{TAG}.preset": preset,
                f"{TAG}.artifact_root": store.root_uri})
            self.parent = run.info.run_id
            self._params(self.parent, params)
            logger.info("MLflow: run %s in experiment %r at %s", self.parent, cfg.experiment, uri)
        except Exception as e:  # noqa: BLE001 — lineage must not stop the pipeline
            self._disable(e)

    @property
    def location(self) -> str | None:
        """Where the parent run is: its UI link for an HTTP tracking server, else the store URI and run id."""
        if self.client is None or self.parent is None:
            return None
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.parent}"
        return f"{self.uri} (experiment {self.experiment_id}, run {self.parent})"

    def _disable(self, e: Exception) -> None:
        self.logger.warning("MLflow tracking disabled for this run: %s", " ".join(str(e).split())[:300])
        self.client = None

    def _params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        assert self.client is not None
        items = [Param(k[:250], v[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    # ------------------------------------------------------------------------------------------- stages
    def stage(self, name: str, ref: ArtifactRef, manifest: Manifest, *, cached: bool, wall_s: float) -> None:
        if self.client is None:
            return
        try:
            self._stage(name, ref, manifest, cached, wall_s)
        except Exception as e:  # noqa: BLE001
            self._disable(e)

    def _producer_run(self, ref: ArtifactRef) -> str | None:
        assert self.client is not None
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG}.manifest_sha256` = '{ref.sha256}' and tags.`{TAG}.cached` = 'false'",
            max_results=1, order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None

    def _stage(self, name: str, ref: ArtifactRef, manifest: Manifest, cached: bool, wall_s: float) -> None:
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
        run_id = client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        self.stage_runs[ref.sha256] = tags.get(f"{TAG}.produced_by_run_id", run_id)
        self._params(run_id, manifest.config)
        now = int(time.time() * 1000)
        final = {**_numeric(manifest.metrics), "stage_wall_s": wall_s}
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
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))

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
            from mlflow.entities import RunStatus

            if student is not None:
                import mlflow

                mlflow.set_tracking_uri(self.uri)
                source_run = self.stage_runs.get(student.sha256, self.parent)
                mlflow.create_external_model(
                    name="bitdistill-student", source_run_id=source_run, experiment_id=self.experiment_id,
                    model_type="bitnet-student",
                    tags={f"{TAG}.artifact_uri": student.uri, f"{TAG}.manifest_sha256": student.sha256,
                          f"{TAG}.gguf": gguf or ""})
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "summary.json").write_text(json.dumps(summary, indent=2))
                self.client.log_artifact(self.parent, str(Path(tmp) / "summary.json"))
            status = RunStatus.FAILED if failed else RunStatus.FINISHED
            self.client.set_terminated(self.parent, RunStatus.to_string(status))
        except Exception as e:  # noqa: BLE001
            self._disable(e)


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

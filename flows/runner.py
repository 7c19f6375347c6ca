"""Calls the stage tasks for the flow and keeps the run's summary table.

:meth:`StageRunner.stage` applies a stage's switch and retries, records its state (a cache hit shows as Prefect's
``Cached`` state), re-validates a cached ref against the artifact store (a corrupt or deleted artifact is
recomputed with ``refresh_cache``), and fails the flow with the stage's error when the task fails.
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from bitnet.stages import STAGES
from flows.config import PipelineConfig, StepOptions
from flows.report import RunSummary, StageRow, markdown, stage_numbers
from tasks.artifacts import ArtifactError, ArtifactRef, ArtifactStore
from tasks.compute import preflight
from tasks.stages import stage_task
from tasks.tracking import Lineage


class StageRunner:
    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.store = ArtifactStore.from_config(cfg.store)
        self.store.check()
        self.logger = get_run_logger()
        for name in cfg.stage_names():  # missing credentials of a remote backend: fail before any stage runs
            step = cfg.step(name)
            if step.enabled and step.compute.remote:
                preflight(step.compute, cfg.store)
        self.summary = RunSummary(preset=cfg.preset, flow_run=flow_run.name, root=self.store.root_uri)
        self.lineage = Lineage(cfg.tracking, self.store, cfg.preset, flow_run.id, flow_run.name,
                               cfg.model_dump(mode="json"), self.logger)
        self.summary.mlflow = self.lineage.location

    def stage(self, name: str, **inputs: ArtifactRef | None) -> ArtifactRef | None:
        """Run (or reuse) stage ``name`` on the given upstream outputs; ``None`` when it is switched off or a
        required upstream stage was (an optional input that is ``None`` is simply not passed)."""
        step = self.cfg.step(name)
        if not step.enabled:
            self.summary.stages.append(StageRow(stage=name, status="disabled"))
            return None
        st = STAGES[name]
        if missing := [k for k in st.inputs if inputs.get(k) is None]:
            self.skip(name, step, f"needs {', '.join(missing)}")
            return None
        t = stage_task.with_options(retries=step.retries, retry_delay_seconds=step.retry_delay_s, task_run_name=name)
        t0 = time.perf_counter()
        args: dict[str, Any] = {
            "name": name, "cfg": step.stage_config(), "inputs": {k: v for k, v in inputs.items() if v is not None},
            "store": self.cfg.store, "reuse_only": self.cfg.reuse_only and st.reuse_in_eval_only,
            "compute": step.compute,
        }
        state = t(**args, return_state=True)
        if state.is_completed() and state.name == "Cached" and not self._still_valid(name, state.result()):
            state = t.with_options(refresh_cache=True)(**args, return_state=True)
        wall = time.perf_counter() - t0
        if not state.is_completed():
            self.summary.stages.append(StageRow(stage=name, status="failed", state=state.name, wall_s=wall,
                                                note=str(state.message or "")[:200]))
            self.publish()
            self.lineage.finish(self.summary.model_dump(mode="json"), None, None, failed=True)
            state.result()  # raises the stage's exception: the flow run fails with it
            raise RuntimeError(f"stage {name} ended in state {state.name}")
        ref: ArtifactRef = state.result()
        manifest = self.store.read_manifest(ref)
        loss, ppl = stage_numbers(manifest.metrics)
        cached = state.name == "Cached"
        reused = not cached and str(manifest.producer.get("task_run_id")) != str(state.state_details.task_run_id)
        self.summary.stages.append(StageRow(
            stage=name, status="cached" if cached else "reused" if reused else "completed", state=state.name,
            cached=cached or reused, final_loss=loss, perplexity=ppl, wall_s=wall, uri=ref.uri,
            note="valid manifest" if reused else "",
        ))
        self.logger.info("%s: %s in %.1f s → %s", name, state.name, wall, ref.uri)
        self.lineage.stage(name, ref, manifest, cached=cached or reused, wall_s=wall)
        if name == "eval":
            self.summary.evaluation = {k: v for k, v in manifest.metrics.items() if k != "val_ppl"}
        return ref

    def _still_valid(self, name: str, ref: ArtifactRef) -> bool:
        try:
            self.store.verify(ref)
            return True
        except ArtifactError as e:
            self.logger.warning("%s: cached result %s is no longer valid (%s); recomputing", name, ref.uri, e)
            return False

    def skip(self, name: str, step: StepOptions, reason: str) -> None:
        """Record a stage that cannot run yet (returns ``None``, like a switched-off stage)."""
        self.summary.stages.append(StageRow(stage=name, status="skipped" if step.enabled else "disabled", note=reason))
        if step.enabled:
            self.logger.info("%s: skipped (%s)", name, reason)

    def publish(self) -> None:
        """Markdown artifact of the run + report.md / summary.json under ``{root}/runs/{flow run}/``."""
        base = f"{self.store.root_path}/runs/{self.summary.flow_run}"
        self.summary.report = f"{self.store.protocol}://{base}/report.md"
        text = markdown(self.summary)
        create_markdown_artifact(text, key="bitdistill-summary", description=f"bitdistill run {self.summary.flow_run}")
        try:
            self.store.fs.makedirs(base, exist_ok=True)
            self.store.fs.pipe_file(f"{base}/report.md", text.encode())
            self.store.fs.pipe_file(f"{base}/summary.json",
                                    json.dumps(self.summary.model_dump(mode="json"), indent=2).encode())
        except OSError as e:
            self.logger.warning("could not write the run report under %s: %s", base, e)
            self.summary.report = None
        self.logger.info("summary\n%s", text)

    def finish(self, student: ArtifactRef | None, gguf: ArtifactRef | None = None) -> RunSummary:
        self.summary.student = student.uri if student else None
        self.summary.gguf = f"{gguf.uri}/student.gguf" if gguf else None
        self.publish()
        self.lineage.finish(self.summary.model_dump(mode="json"), student, self.summary.gguf)
        return self.summary

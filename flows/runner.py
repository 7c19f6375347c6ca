"""Calls the stage tasks for the flow and keeps the run's summary table.

:meth:`StageRunner.stage` applies a stage's switch and retries, records its state (a cache hit shows as Prefect's
``Cached`` state), re-validates a cached ref against the artifact store (a corrupt or deleted artifact is
recomputed with ``refresh_cache``), and fails the flow with the stage's error when the task fails: the flow run
ends ``Failed`` with the stage's one-line message (the traceback is in the stage's own log, once).

A retried flow run (``prefect flow-run retry`` after a crash) first marks the task runs its killed attempt left
``Running`` as ``Crashed``; :class:`~tasks.tracking.Lineage` closes MLflow runs of killed attempts as ``KILLED``.

MLflow: each stage attempt's nested run is opened before the stage runs and hears its training steps
(:func:`tasks.progress.listening`); a failed stage closes it ``FAILED`` with the error, and the parent ``FAILED``
with the same ``error`` tag. :func:`close_lineage` is the flow's ``on_cancellation`` / ``on_crashed`` /
``on_failure`` hook: it closes what is still ``RUNNING`` when Prefect marks the state, at that state's time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.states import Failed, State

from bitnet.stages import STAGES
from flows.config import PipelineConfig, StepOptions, pipeline_config
from flows.report import RunSummary, StageRow, markdown, stage_numbers, stage_throughput
from tasks.artifacts import ArtifactError, ArtifactRef, ArtifactStore
from tasks.compute import preflight
from tasks.progress import listening
from tasks.stages import stage_task
from tasks.tracking import Lineage, TrackingError, close_flow_run

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.client.schemas.objects import FlowRun


class StageFailed(Exception):
    """A stage ended in a failed state; carries the flow run's final state."""

    def __init__(self, state: State) -> None:
        super().__init__(state.message)
        self.state = state


class StageRunner:
    @classmethod
    def execute(cls, pipeline: Callable[[StageRunner], RunSummary], cfg: PipelineConfig) -> RunSummary | State:
        """Run ``pipeline`` in this flow run; a failed stage ends the flow run ``Failed`` with its message."""
        try:
            return pipeline(cls(cfg.resolved()))
        except StageFailed as e:
            return e.state
        except TrackingError as e:  # tracking.required and no tracking server: refused before any stage
            get_run_logger().error("%s", e)
            return Failed(message=str(e), data=e)

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.store = ArtifactStore.from_config(cfg.store)
        self.store.check()
        self.logger = get_run_logger()
        if (flow_run.run_count or 1) > 1:
            crash_leftover_task_runs(flow_run.id, self.logger)
        for name in cfg.stage_names():  # missing credentials of a remote backend: fail before any stage runs
            step = cfg.step(name)
            if step.enabled and step.compute.remote:
                preflight(step.compute, cfg.store)
        self.summary = RunSummary(preset=cfg.preset, flow_run=flow_run.name, root=self.store.root_uri)
        self.lineage = Lineage(cfg.tracking, self.store, cfg.preset, flow_run.id, flow_run.name,
                               cfg.model_dump(mode="json"), self.logger, attempt=flow_run.run_count or 1,
                               is_stale=flow_run_is_over)
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
        stage_cfg = step.stage_config()
        if st.fingerprint is not None:  # e.g. the world's corpus listing: a bad source is one line, before the task
            t0, started = time.perf_counter(), time.time()
            try:
                st.fingerprint(stage_cfg)
            except Exception as e:  # noqa: BLE001 — any failure of the source is the stage's failure
                self.fail(name, f"{name}: {type(e).__name__}: {e}", e, wall_s=time.perf_counter() - t0,
                          started=started)
        t = stage_task.with_options(retries=step.retries, retry_delay_seconds=step.retry_delay_s, task_run_name=name,
                                    retry_condition_fn=self._retrying(name) if step.retries else None)
        t0, started = time.perf_counter(), time.time()
        args: dict[str, Any] = {
            "name": name, "cfg": stage_cfg, "inputs": {k: v for k, v in inputs.items() if v is not None},
            "store": self.cfg.store, "reuse_only": self.cfg.reuse_only and st.reuse_in_eval_only,
            "compute": step.compute,
        }
        with listening(self.lineage.begin(name, started)):
            state = t(**args, return_state=True)
            if state.is_completed() and state.name == "Cached" and not self._still_valid(name, state.result()):
                state = t.with_options(refresh_cache=True)(**args, return_state=True)
        wall = time.perf_counter() - t0
        if not state.is_completed():
            try:
                state.result()
                error: BaseException = RuntimeError(f"stage {name} ended in state {state.name}")
            except BaseException as e:  # noqa: BLE001 — the stage's own exception, already logged by its task run
                error = e
            self.fail(name, f"{name}: {type(error).__name__}: {error}", error, state=state.name, wall_s=wall,
                      started=started)
        ref: ArtifactRef = state.result()
        manifest = self.store.read_manifest(ref)
        loss, ppl = stage_numbers(manifest.metrics)
        cached = state.name == "Cached"
        reused = not cached and str(manifest.producer.get("task_run_id")) != str(state.state_details.task_run_id)
        self.summary.stages.append(StageRow(
            stage=name, status="cached" if cached else "reused" if reused else "completed", state=state.name,
            cached=cached or reused, final_loss=loss, perplexity=ppl, wall_s=wall, uri=ref.uri,
            note="valid manifest" if reused else "", **(speed := stage_throughput(manifest.metrics)),
        ))
        trained = (f" ({speed['tokens']:,} tokens, {speed['tokens_per_s'] or 0:.0f} tok/s, peak "
                   f"{speed['peak_gb'] or 0:.1f} GB)" if speed["tokens"] else "")
        self.logger.info("%s: %s in %.1f s%s → %s", name, state.name, wall, trained, ref.uri)
        self.lineage.stage(name, ref, manifest, cached=cached or reused, wall_s=wall, started=started)
        if name == "eval":
            self.summary.evaluation = {k: v for k, v in manifest.metrics.items() if k != "val_ppl"}
        return ref

    def fail(self, name: str, message: str, error: BaseException, state: str | None = None,
             wall_s: float = 0.0, started: float | None = None) -> None:
        """Record stage ``name`` as failed, close its nested run and the parent run ``FAILED`` with ``message`` as
        their ``error`` tag, and end the flow run ``Failed`` with ``message`` (raises :class:`StageFailed`;
        :meth:`execute` turns it into the flow run's state)."""
        message = " ".join(message.split())
        self.summary.stages.append(StageRow(stage=name, status="failed", state=state, wall_s=wall_s,
                                            note=message[:200]))
        self.publish()
        self.lineage.stage_failed(name, message, wall_s=wall_s, started=started)
        self.lineage.finish(self.summary.model_dump(mode="json"), None, None, failed=True,
                            error=f"stage {message}")
        self.logger.error("stage %s failed: %s", name, message)
        raise StageFailed(Failed(message=f"stage {message}", data=error))

    def _retrying(self, name: str) -> Callable[[Any, Any, State], bool]:
        """Prefect's ``retry_condition_fn`` for stage ``name``: called on each failed attempt that has a retry left,
        it records the attempt in MLflow (``FAILED``, its error) and lets Prefect retry."""

        def record(task: Any, task_run: Any, state: State) -> bool:
            error = state.data if isinstance(state.data, BaseException) else state.message
            why = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
            self.lineage.retrying(name, f"{name}: {why}")
            return True

        return record

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


# ------------------------------------------------------------------------------------------------ flow hooks
def close_lineage(flow: Flow[..., Any], flow_run: FlowRun, state: State) -> None:
    """Flow hook (``on_cancellation``, ``on_crashed``, ``on_failure``): close the flow run's MLflow runs that are
    still ``RUNNING`` at the time of ``state`` — ``KILLED`` for a cancelled or crashed run, ``FAILED`` for a failed
    one — with the state's message as their ``error`` tag. Runs in the flow's process, or in the runner's after it
    killed the process (Prefect passes ``flow``, ``flow_run`` and ``state``)."""
    from prefect.logging.loggers import flow_run_logger

    logger = flow_run_logger(flow_run, flow)
    params = flow_run.parameters or {}
    try:
        cfg = pipeline_config(params.get("config"), params.get("preset")).resolved()
    except Exception:  # noqa: BLE001 — a config refused before any run opened: nothing to close
        return
    status = "FAILED" if state.is_failed() else "KILLED"
    error = f"{state.name}: {state.message or 'flow run ' + state.name}"
    try:
        closed = close_flow_run(cfg.tracking, ArtifactStore.from_config(cfg.store),
                                cfg.preset, str(flow_run.id), end_s=state.timestamp.timestamp(), error=error,
                                status=status)
    except Exception as e:  # noqa: BLE001 — one line (redacted: TrackingError); the next run closes what is left
        logger.warning("MLflow: could not close the runs of this flow run: %s", " ".join(str(e).split())[:300])
        return
    if closed:
        logger.info("MLflow: closed %d run(s) as %s (%s)", len(closed), status, state.name)


# ------------------------------------------------------------------------------------------------ crash recovery
def flow_run_is_over(flow_run_id: str) -> bool:
    """Whether Prefect holds flow run ``flow_run_id`` in a final state (or not at all): its MLflow run is stale."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(flow_run_id)  # type: ignore[arg-type]
        except ObjectNotFound:
            return True
    return run.state is not None and run.state.is_final()


def crash_leftover_task_runs(flow_run_id: str, logger: Any) -> list[str]:
    """Mark the task runs of flow run ``flow_run_id`` that a killed attempt left in a non-final state ``Crashed``
    (so the UI does not draw a stage of a retried run as still running). Returns their names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import Crashed

    done: list[str] = []
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            for tr in runs:
                if tr.state is not None and not tr.state.is_final():
                    client.set_task_run_state(tr.id, Crashed(message="its flow run's process was killed"),
                                              force=True)
                    done.append(tr.name)
    except Exception as e:  # noqa: BLE001 — cosmetics of the UI must not stop the run
        logger.warning("could not mark the killed attempt's task runs as Crashed: %s", e)
    if done:
        logger.info("retry: task runs of the killed attempt marked Crashed: %s", ", ".join(done))
    return done

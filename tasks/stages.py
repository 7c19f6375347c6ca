"""The one Prefect task that runs any stage: stage name + config + upstream ``ArtifactRef``s in, an ``ArtifactRef`` out.

The task computes the stage's key (config, upstream *content* identities, code digest, the stage's own fingerprint
such as the world's corpus listing) and returns ``{stage}/{key}`` when it already holds a valid manifest (so results
survive the loss of Prefect's own result storage). Otherwise it builds a :class:`~tasks.execute.StageRequest`
and hands it to the stage's compute backend (``tasks/compute.py``: in-process by default, ``torchrun`` or SkyPilot
through ``python -m tasks.worker``), which runs ``STAGES[name]`` and commits the artifact (files first, manifest
last); a killed stage re-runs in the same directory and the trainer resumes from its checkpoints.

Caching: INPUTS (minus ``reuse_only``, ``compute`` and the upstream refs, which enter by content identity) +
TASK_SOURCE + the digest of the code the stage imports, results persisted as JSON. A recomputed upstream stage
whose output has the same content (tensor values, configs) leaves this key, and so this stage's output, as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from pydantic import BaseModel

from bitnet.stages import STAGES
from bitnet.stages.outputs import identity_config
from tasks.artifacts import ArtifactError, ArtifactRef, ArtifactStore, StoreConfig, stage_key
from tasks.caching import code_digest, stage_cache_policy, upstream_identity
from tasks.compute import ComputeConfig, LocalCompute, run_request
from tasks.execute import StageRequest
from tasks.progress import TrainProgress

TASK_OPTIONS: dict[str, Any] = {
    "persist_result": True,
    "result_serializer": "json",  # cached results are our small ArtifactRef, never pickles
    "retries": 0,
    "retry_delay_seconds": 10,
}


def _producer() -> dict[str, Any]:
    from prefect.runtime import flow_run, task_run

    return {"flow_run_id": flow_run.id, "flow_run_name": flow_run.name, "task_run_id": task_run.id}


def _train_progress(stage: str, work: Path, max_steps: int) -> TrainProgress:
    return TrainProgress(stage, work / "train" / "metrics.jsonl", max_steps, get_run_logger())


def stage_code(name: str) -> str:
    """Digest of the code stage ``name`` can run (its module's import closure in ``bitnet/`` and ``kernels/``)."""
    return code_digest((STAGES[name].module,))


def stage_material(name: str, cfg: BaseModel, inputs: dict[str, ArtifactRef], code: str) -> dict[str, Any]:
    """What the store key of a stage output hashes: its config identity (``identity_config``: the view ``stage.json``
    and Prefect's cache key take too), its upstream content identities, its code digest and fingerprint."""
    st = STAGES[name]
    return {"config": identity_config(cfg.model_dump(mode="json")), "upstream": upstream_identity(inputs),
            "code": code, **(st.fingerprint(cfg) if st.fingerprint else {})}


@task(name="stage", cache_policy=stage_cache_policy(), **TASK_OPTIONS)
def stage_task(
    name: str,
    cfg: BaseModel,
    inputs: dict[str, ArtifactRef],
    store: StoreConfig,
    reuse_only: bool = False,
    compute: ComputeConfig | None = None,
) -> ArtifactRef:
    """Return the finished output of stage ``name`` for these inputs, running it on ``compute`` when needed.

    ``reuse_only`` (eval-only runs): a stage that is not finished yet raises instead of computing. ``compute``
    picks the backend; it is not part of the cache key (where a stage ran does not change its output).
    """
    logger = get_run_logger()
    artifacts = ArtifactStore.from_config(store)
    code = stage_code(name)
    config = cfg.model_dump(mode="json")
    key = stage_key(name, stage_material(name, cfg, inputs, code))
    if (ref := artifacts.lookup(name, key)) is not None:
        logger.info("%s: %s holds a valid manifest; reusing it", name, ref.uri)
        return ref
    if reuse_only:
        raise ArtifactError(f"{name}: no finished artifact at {artifacts.uri(name, key)} and this run is reuse-only")
    req = StageRequest(stage=name, key=key, config=config, upstream=inputs, store=store, code=code,
                       producer=_producer())
    return run_request(compute or LocalCompute(), req, logger, progress=_train_progress)

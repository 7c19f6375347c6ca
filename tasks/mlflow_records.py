"""What a finished stage's MLflow run records (functions of an ``MlflowClient``; :class:`tasks.tracking.Lineage`
decides when): the stage config as ``config.json`` plus a few key params, the final and per-step metrics, the
input datasets with their digests, the manifest and a loss-curve plot."""

from __future__ import annotations

import io
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.artifacts import ArtifactRef, ArtifactStore, Manifest

if TYPE_CHECKING:
    from mlflow import MlflowClient

# a stage's few params; the whole config is the run's config.json artifact
KEY_PARAMS = ("pretrained", "tokenizer", "vocab_size", "seq_len", "train.max_steps", "train.lr", "train.warmup_steps",
              "train.grad_accum", "train.precision", "data.batch_size", "temperature", "alpha", "beta", "gamma",
              "lambda_warmup_steps", "rank", "split", "max_batches")


def key_params(config: dict[str, Any]) -> dict[str, str]:
    """The :data:`KEY_PARAMS` present in a stage config, flattened to dotted keys."""
    flat = flatten(config)
    return {k: flat[k] for k in KEY_PARAMS if k in flat and flat[k] not in ("None", "null")}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | dict) else str(v)
    return out


def numeric(d: dict[str, Any]) -> dict[str, float]:
    """The numbers of ``d`` as MLflow metrics (booleans are not)."""
    return {k: float(v) for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def attempt_tokens(metrics: dict[str, Any]) -> float:
    """The tokens the attempt that produced ``metrics`` trained: the trainer's own count of this attempt
    (``tokens_per_s`` × ``wall_s``), else the share of the steps after ``resumed_from``, else ``tokens``."""
    total = metrics.get("tokens") or 0
    rate, wall = metrics.get("tokens_per_s"), metrics.get("wall_s")
    if isinstance(rate, int | float) and isinstance(wall, int | float) and wall > 0:
        return float(round(rate * wall))
    steps, resumed = metrics.get("steps"), metrics.get("resumed_from")
    if isinstance(steps, int) and steps > 0 and isinstance(resumed, int):
        return float(total) * max(0, steps - resumed) / steps
    return float(total)


def log_text(client: MlflowClient, run_id: str, name: str, text: str, artifact_path: str | None = None) -> None:
    """``text`` as the run's artifact ``name``."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / name).write_text(text)
        client.log_artifact(run_id, str(Path(tmp) / name), artifact_path)


def log_config(client: MlflowClient, run_id: str, config: dict[str, Any], params: dict[str, Any]) -> None:
    """The whole config as the artifact ``config.json``, and a few key ``params``."""
    from mlflow.entities import Param

    items = [Param(k[:250], str(v)[:6000]) for k, v in params.items() if v is not None]
    if items:
        client.log_batch(run_id, params=items)
    log_text(client, run_id, "config.json", json.dumps(config, indent=2))


def log_stage_record(client: MlflowClient, store: ArtifactStore, run_id: str, name: str, ref: ArtifactRef,
                     manifest: Manifest, *, cached: bool, wall_s: float, tokens: float) -> None:
    """A finished stage's record on ``run_id``: config and key params; ``stage_wall_s``, ``tokens`` (this attempt's),
    ``tokens_total`` and the manifest's metrics; and, unless served from a cache, the per-step ``train/*`` metrics,
    the input datasets, ``manifest.json`` and ``plots/loss_curve.png``."""
    from mlflow.entities import Metric

    log_config(client, run_id, manifest.config, key_params(manifest.config))
    now = int(time.time() * 1000)
    final = {**numeric(manifest.metrics), "stage_wall_s": wall_s, "tokens": tokens,
             "tokens_total": float(manifest.metrics.get("tokens") or 0)}
    metrics = [Metric(k, v, now, 0) for k, v in final.items()]
    history = [] if cached else read_history(store, ref, manifest)
    for rec in history:
        step = int(rec.get("step", 0))
        metrics += [Metric(f"train/{k}", v, now, step) for k, v in numeric(rec).items() if k != "step"]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    if cached:
        return
    if inputs := dataset_inputs(store, manifest):
        client.log_inputs(run_id, datasets=inputs)
    log_text(client, run_id, "manifest.json", manifest.model_dump_json(indent=2))
    with tempfile.TemporaryDirectory() as tmp:
        if history and (png := loss_curve(name, history, Path(tmp))) is not None:
            client.log_artifact(run_id, str(png), "plots")


def read_history(store: ArtifactStore, ref: ArtifactRef, manifest: Manifest) -> list[dict[str, Any]]:
    """The trainer's per-step records of a stage artifact (``train/metrics.jsonl``; none for untrained stages)."""
    rel = "train/metrics.jsonl"
    if rel not in manifest.files:
        return []
    with store.fs.open(f"{store.path_of(ref.uri)}/{rel}", "rb") as f:
        return [json.loads(line) for line in io.TextIOWrapper(f) if line.strip()]


def splits_read(manifest: Manifest) -> tuple[tuple[str, str], ...]:
    """(world split, MLflow dataset context) of the splits a stage reads: the evaluated split for ``eval``, train
    and validation for the others."""
    if manifest.stage == "eval":
        return ((str(manifest.config.get("split", "test")), "evaluation"),)
    return (("train", "training"), ("validation", "validation"))


def dataset_inputs(store: ArtifactStore, manifest: Manifest) -> list[Any]:
    """The datasets a stage read, as MLflow ``DatasetInput``s: the corpus (world) or the world's packed splits,
    with their digests."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    found: list[tuple[str, str, str, str]] = []  # (name, source uri, digest, context)
    if manifest.stage == "world":
        src = manifest.config.get("source", {})
        uri = src.get("url") or src.get("path") or f"hf://{src.get('name')}"
        found.append(("corpus", uri if "://" in uri else Path(uri).resolve().as_uri(), manifest.key, "source"))
    elif (world := manifest.upstream.get("world")) is not None:
        splits = store.read_manifest(world).metrics.get("splits", {})
        for split, context in splits_read(manifest):
            if split in splits:
                found.append((f"world-{split}", f"{world.uri}/data/{split}", str(splits[split]["digest"]), context))
    inputs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, uri, digest, context in found:
            ds = MetaDataset(resolve_dataset_source(uri), name=name, digest=digest[:32])
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    return inputs


def loss_curve(stage: str, history: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """A PNG of the train (and validation) loss over steps, or ``None`` without losses."""
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

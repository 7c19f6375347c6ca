"""Held-out perplexity of causal LMs and of a unigram baseline on packed token blocks; lm-eval harness tasks and
the llama.cpp perplexity of a GGUF (``bitdistill eval``)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

if TYPE_CHECKING:
    from lm_eval.api.model import LM
    from transformers import PreTrainedTokenizerBase

    from bitnet.data import PackedDataset
    from bitnet.eval_data import EvalData


@torch.no_grad()
def perplexity(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device | None = None
) -> float:
    """Token-weighted perplexity: exp of the mean next-token cross-entropy over every predicted token."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for batch in batches:
        ids = batch["input_ids"].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = ids[:, 1:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"))
        count += target.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("perplexity needs at least one batch")
    return math.exp(nll / count)


@torch.no_grad()
def compare_to_teacher(
    model: nn.Module,
    teacher: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device | None = None,
) -> dict[str, float]:
    """Perplexity of ``model`` and its agreement with ``teacher`` on the same held-out blocks, in one pass.

    ``ppl``: as :func:`perplexity`. ``top1_agreement``: fraction of predicted positions where the argmax
    next token of ``model`` equals the teacher's. ``kl``: mean per-token KL(p_teacher ‖ p_model) in nats.
    """
    device = device or next(model.parameters()).device
    states = (model.training, teacher.training)
    model.eval()
    teacher.eval()
    nll = agree = kl = 0.0
    count = 0
    for batch in batches:
        ids = batch["input_ids"].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        t_logits = teacher(input_ids=ids).logits[:, :-1].float()
        target = ids[:, 1:]
        flat = logits.reshape(-1, logits.size(-1))
        t_flat = t_logits.reshape(-1, t_logits.size(-1))
        nll += float(F.cross_entropy(flat, target.reshape(-1), reduction="sum"))
        agree += float((flat.argmax(-1) == t_flat.argmax(-1)).sum())
        kl += float(
            F.kl_div(F.log_softmax(flat, -1), F.log_softmax(t_flat, -1), reduction="sum", log_target=True)
        )
        count += target.numel()
    model.train(states[0])
    teacher.train(states[1])
    if count == 0:
        raise ValueError("compare_to_teacher needs at least one batch")
    return {"ppl": math.exp(nll / count), "top1_agreement": agree / count, "kl": kl / count}


# ------------------------------------------------------------------------------------------------------------
# Evaluation of a model (BitNet student or plain HF causal LM) and of its GGUF: `bitdistill eval`.
#
# Three perplexities, each named by what computes it and on which text:
#   pytorch      our own loop (:func:`perplexity`) on the packed held-out blocks (first token of a block not scored)
#   llama.cpp    the GGUF through llama.cpp on exactly the same blocks (:func:`gguf_perplexity`)
#   lm-eval      lm-eval's ``loglikelihood_rolling`` on the decoded held-out documents (every token scored,
#                disjoint windows of the model's context, the first one after the prefix token)
# plus lm-eval harness tasks (local YAML tasks of ``bitnet/eval_tasks`` on files built from the same split, or any
# task name lm-eval knows) through its Python API on the in-memory model.
# ------------------------------------------------------------------------------------------------------------




class HarnessOptions(BaseModel):
    """The lm-eval tasks of an evaluation and how they run: the eval stage's ``harness`` section (which split and
    how many of its blocks are the stage's own ``split`` and ``max_batches``)."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(
        default_factory=lambda: ["bitdistill_heldout", "bitdistill_cloze"],
        description="lm-eval tasks: the local ones (bitnet/eval_tasks) or any name lm-eval knows (needs the hub)",
    )
    batch_size: int = Field(default=8, ge=1)
    limit: int | None = Field(default=None, ge=1, description="examples per lm-eval task")
    num_fewshot: int | None = Field(default=None, ge=0)
    max_docs: int | None = Field(default=None, ge=1, description="held-out documents for the local tasks")
    n_cloze: int = Field(default=200, ge=1, description="cloze items built for bitdistill_cloze")
    lm_eval_perplexity: bool = Field(default=True,
                                     description="also compute token perplexity with loglikelihood_rolling")
    seed: int = 0
    threads: int | None = Field(default=None, ge=1, description="llama.cpp threads for the GGUF")


class HarnessConfig(HarnessOptions):
    """What ``bitdistill eval`` runs: the harness options, and the world split and packed blocks it evaluates."""

    split: str = Field(default="test", description="world split the perplexities and local tasks are built from")
    max_blocks: int | None = Field(default=None, ge=1,
                                   description="packed blocks for the pytorch / llama.cpp perplexity")


@dataclass
class EvalResults:
    """Everything one evaluation measured; ``to_json`` / ``table`` for output."""

    model: str
    perplexity: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "perplexity": self.perplexity, "tasks": self.tasks, "info": self.info}

    def table(self) -> str:
        rows: list[tuple[str, str, str]] = [("perplexity", k, _fmt(v)) for k, v in self.perplexity.items()]
        for task, metrics in self.tasks.items():
            rows += [(task, k, _fmt(v)) for k, v in metrics.items()]
        head = ("evaluation", "metric", "value")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([f"# eval: {self.model}", "", line(head), sep, *map(line, rows)]) + "\n"


def _fmt(v: float) -> str:
    if float(v).is_integer() and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.4e}" if abs(v) >= 1e5 else f"{v:.4f}"


def load_model_for_eval(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A student directory (it has ``bitnet.json``) or a stage output holding one in ``model/`` as a BitNet student,
    anything else as a plain HF causal LM."""
    from bitnet.io import model_dir
    from bitnet.student import BITNET_CONFIG, load_student
    from bitnet.teacher import load_teacher

    local = model_dir(path)
    if (local / BITNET_CONFIG).is_file():
        return load_student(local, dtype=dtype)
    return load_teacher(path, dtype=dtype)


def hflm(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, batch_size: int = 8, max_length: int | None = None
) -> LM:
    """lm-eval's ``HFLM`` around an in-memory model; the tokenizer is passed so nothing is looked up on the hub."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def lm_eval_perplexity(lm: LM, texts: list[str]) -> dict[str, float]:
    """Token perplexity of ``texts`` from lm-eval's ``loglikelihood_rolling`` (every token of every text scored)."""
    from lm_eval.api.instance import Instance

    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i)
                for i, t in enumerate(texts)]
    lls = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    n_tokens = sum(len(lm.tok_encode(t)) for t in texts)
    if not n_tokens:
        raise ValueError("no tokens to score")
    return {"ppl": math.exp(-float(sum(lls)) / n_tokens), "tokens": float(n_tokens)}


def _metrics(entry: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ...}`` → ``{"acc": 0.5}``."""
    out = {}
    for key, value in entry.items():
        name, _, filt = key.partition(",")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if name == "alias" or name.endswith("_stderr") or not numeric:
            continue
        out[name if filt in ("", "none") else f"{name}[{filt}]"] = float(value)
    return out


def run_lm_eval(
    lm: LM,
    tasks: list[str],
    *,
    include_path: str | Path | None = None,
    local_tasks: tuple[str, ...] = (),
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """lm-eval's ``simple_evaluate`` on ``lm``; per task its numeric metrics (no bootstrap stderr).

    Only when a task is not one of ``local_tasks`` is lm-eval's own task index (≈ 14 700 YAMLs: 10 s to minutes to
    scan on 2 shared cores) added to the search path: those tasks need their dataset from the hub.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    needs_hub = any(t not in local_tasks for t in tasks)
    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=needs_hub)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    try:
        out = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            bootstrap_iters=0,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except OSError as e:  # ConnectionError / offline mode / missing dataset of a hub task
        if not needs_hub:
            raise
        hub = [t for t in tasks if t not in local_tasks]
        raise ValueError(f"lm-eval task(s) {', '.join(hub)} need their datasets from the hub: "
                         f"{str(e).splitlines()[0]}") from e
    if out is None:  # a non-zero rank
        return {}
    return {task: _metrics(entry) for task, entry in out["results"].items()}


def gguf_perplexity(
    path: str | Path, rows: torch.Tensor, *, lora: str | Path | None = None, n_threads: int | None = None
) -> float:
    """Perplexity of a GGUF through llama.cpp on token rows (scored as :func:`perplexity` scores the same blocks)."""
    from bitnet.export.llamacpp import llama_perplexity, load_llama

    llm = load_llama(path, lora=lora, n_ctx=max(int(rows.shape[1]), 8), n_threads=n_threads)
    try:
        return llama_perplexity(llm, rows.tolist())
    finally:
        llm.close()


def _blocks(dataset: PackedDataset, max_blocks: int | None) -> torch.Tensor:
    n = dataset.num_blocks if max_blocks is None else min(max_blocks, dataset.num_blocks)
    return dataset.get_batch(range(n))


def evaluate_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: PackedDataset,
    eval_dir: str | Path,
    cfg: HarnessOptions | None = None,
    *,
    name: str = "model",
    gguf: str | Path | None = None,
    lora: str | Path | None = None,
    max_blocks: int | None = None,
) -> EvalResults:
    """Perplexities (pytorch, llama.cpp when ``gguf`` is given, lm-eval rolling) and lm-eval tasks of ``model``.

    ``dataset`` is the held-out packed split; the local task files are built from it under ``eval_dir``; the
    pytorch / llama.cpp perplexities are over its first ``max_blocks`` blocks (None: all of them).
    """
    from bitnet.eval_data import LOCAL_TASKS, build_eval_data

    cfg = cfg or HarnessOptions()
    t0 = time.perf_counter()
    res = EvalResults(model=name, info={"config": cfg.model_dump(mode="json"), "split_digest": dataset.digest})
    rows = _blocks(dataset, max_blocks)
    batches = [{"input_ids": rows[i : i + cfg.batch_size]} for i in range(0, len(rows), cfg.batch_size)]
    res.perplexity["pytorch"] = perplexity(model, batches)
    res.info["blocks"] = [int(rows.shape[0]), int(rows.shape[1])]
    if gguf is not None:
        res.perplexity["llama.cpp"] = gguf_perplexity(gguf, rows, lora=lora, n_threads=cfg.threads)
        res.info["gguf"] = str(gguf)
    data: EvalData | None = None
    local = [t for t in cfg.tasks if t in LOCAL_TASKS]
    if local or cfg.lm_eval_perplexity:
        data = build_eval_data(dataset, tokenizer, eval_dir, n_cloze=cfg.n_cloze, max_docs=cfg.max_docs, seed=cfg.seed)
        built = {k: data.info[k] for k in ("documents", "characters", "cloze_items")}
        res.info["eval_data"] = {"dir": str(data.root), **built}
    if cfg.lm_eval_perplexity or cfg.tasks:
        lm = hflm(model, tokenizer, batch_size=cfg.batch_size)
        if cfg.lm_eval_perplexity and data is not None:
            texts = data.heldout_texts()[: cfg.limit] if cfg.limit else data.heldout_texts()
            rolling = lm_eval_perplexity(lm, texts)
            res.perplexity["lm-eval rolling"] = rolling["ppl"]
            res.info["lm_eval_rolling_tokens"] = int(rolling["tokens"])
        if cfg.tasks:
            res.tasks = run_lm_eval(
                lm, cfg.tasks, include_path=data.tasks_dir if data else None, local_tasks=LOCAL_TASKS,
                limit=cfg.limit, num_fewshot=cfg.num_fewshot, seed=cfg.seed,
            )
    res.info["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def write_results(results: EvalResults, path: str | Path) -> Path:
    """The results as JSON (atomically)."""
    from bitnet.io import write_json_atomic

    write_json_atomic(path, results.to_json())
    return Path(path)

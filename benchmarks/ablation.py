"""Quality ablation of the BitDistill stages on the tiny preset (a benchmark, not a test).

Every row starts from the same teacher (``WORKDIR/teacher/model``, as ``bitdistill demo`` builds it) and adds one
ingredient to the row above it. Trained rows get the same total optimizer-step budget ``--steps`` (split among
their stages) with the same batch, so they see the same number of training tokens; the ``+LRC`` row adds its own
small budget on top of the full BitDistill row and says so. Each row prints held-out **test** perplexity, top-1
next-token agreement with the teacher and KL(teacher ‖ student), the tokens it trained on and its training wall time
(the stages' own ``wall_s``; the whole run's wall time is printed last).

    python benchmarks/ablation.py --workdir runs/tiny --steps 300 [--markdown docs/ablation.md]
    python benchmarks/ablation.py --preset smollm2-135m --steps 24    # a real pretrained teacher (offline)

``--preset`` takes the world, teacher (a GGUF teacher is materialised once), batch, learning rate and LRC rank from
a pipeline preset; its teacher's own GGUF, when it came from one, is a row too (llama.cpp on the same test rows:
"what users run today").

Stage outputs go to ``WORKDIR/ablation/stages/<stage>-<key>``, keyed by the student a stage starts from and its
config: rows that share a prefix of stages train it once and count its tokens and training time each (the table states
what each row *costs*, not what this run spent). A finished stage is reused by a re-run (the stages resume from their
checkpoints), so an interrupted benchmark continues where it stopped; a finished row's metrics are stored next to its
student (``ablation-eval-<test batches>.json``), so adding a row re-evaluates only that row. ``--fresh`` starts over.
With ``--preset`` the KD rows use the preset's stage-3 weights (τ, β, γ); when they are not the paper's, a row with
the paper's weights is added.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from bitnet.data import iter_eval_batches
from bitnet.data.baseline import unigram_perplexity
from bitnet.evaluate import compare_to_teacher, gguf_perplexity
from bitnet.pretrained import SOURCE_FILE
from bitnet.stages.convert import ConvertConfig
from bitnet.stages.cpt import CPTConfig
from bitnet.stages.kd import KDConfig
from bitnet.stages.layerwise import LayerwiseConfig
from bitnet.stages.lrc import LRCConfig
from bitnet.stages.registry import run_stage, stage
from bitnet.stages.training import StageData
from bitnet.student import load_student
from bitnet.teacher import load_teacher
from bitnet.trainer import TrainConfig, share_schedule
from bitnet.world import World, open_world


@dataclass
class Row:
    name: str
    subln: str  # SubLN placement of the converted student
    stages: list[tuple[str, Any]] = field(default_factory=list)  # (directory name, stage config)
    base: str | None = None  # a row whose final student this one continues from
    convert: dict[str, Any] | None = None  # the convert stage's config (default: BitNet's per-tensor absmean, subln)

    def convert_config(self) -> ConvertConfig:
        return ConvertConfig.model_validate(self.convert or {"bitnet": {"subln": self.subln}})

    def student_name(self) -> str:
        """The converted student's directory: ``student-<subln>`` for the BitNet default (as before), else keyed by
        the convert config."""
        if self.convert is None:
            return f"student-{self.subln}"
        key = json.dumps(self.convert_config().model_dump(mode="json"), sort_keys=True)
        return f"student-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _train(steps: int, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(max_steps=steps, lr=lr, warmup_steps=max(1, steps // 20), weight_decay=0.0,
                       ckpt_every=max(1, steps // 4), log_every=10, seed=seed, progress=False)


PAPER_KD = {k: KDConfig.model_fields[k].default for k in ("temperature", "beta", "gamma")}  # BitDistill's τ, β, γ


def build_rows(total: int, batch_size: int, lr: float, lrc_rank: int, seed: int,
               kd_weights: dict[str, float] | None = None) -> list[Row]:
    """The ablation's rows. ``kd_weights`` (τ, β, γ of stage 3; default the paper's) come from ``--preset``: when
    they differ from the paper's, a row with the paper's weights is added for comparison."""
    kd_weights = kd_weights or PAPER_KD
    data = StageData(batch_size=batch_size, eval_batch_size=16, eval_max_batches=4)
    lw_steps, cpt_steps = max(1, total // 5), max(1, (2 * total) // 5)
    kd_steps = total - lw_steps - cpt_steps

    def cpt(steps: int, warmup: int) -> CPTConfig:
        return CPTConfig(lambda_warmup_steps=warmup, train=_train(steps, lr, seed), data=data)

    def layerwise() -> LayerwiseConfig:
        return LayerwiseConfig(train=_train(lw_steps, lr, seed), data=data)

    def kd(objective: str, weights: dict[str, float], steps: int = kd_steps) -> KDConfig:
        return KDConfig(objective=objective, **weights, train=_train(steps, lr, seed), data=data)

    def full(objective: str, weights: dict[str, float]) -> list[tuple[str, Any]]:
        return [("layerwise", layerwise()), ("cpt", cpt(cpt_steps, cpt_steps // 4)), ("kd", kd(objective, weights))]

    lrc_steps = max(1, total // 10)

    def lrc(init: str) -> LRCConfig:
        return LRCConfig(rank=lrc_rank, init=init, calib_batches=8, train=_train(lrc_steps, lr, seed), data=data)

    return [
        Row("naive ternary PTQ", "none"),
        Row("BitNet-SFT (QAT, CE only)", "none", [("cpt", cpt(total, 0))]),
        Row("+SubLN", "standard", [("cpt", cpt(total, 0))]),
        Row("+λ warm-up (stage 2)", "standard", [("cpt", cpt(total, total // 4))]),
        Row("+layer-wise distillation (1.9)", "standard",
            [("layerwise", layerwise()), ("cpt", cpt(total - lw_steps, (total - lw_steps) // 4))]),
        Row("+KD (BitDistill)", "standard", full("bitdistill", kd_weights)),
        *([Row("+KD (BitDistill), the paper's τ = 5, β = 10, γ = 1e5", "standard",
               full("bitdistill", PAPER_KD))] if kd_weights != PAPER_KD else []),
        Row("+KD (TCS)", "standard", full("tcs", kd_weights)),
        Row("+LRC, zero init (on +KD BitDistill)", "standard", [("lrc", lrc("zero"))], base="+KD (BitDistill)"),
        Row("+LRC, closed-form init (on +KD BitDistill)", "standard", [("lrc", lrc("closed_form"))],
            base="+KD (BitDistill)"),
        Row("PTQ + LRC, closed-form init (no QAT)", "none", [("lrc", lrc("closed_form"))], base="naive ternary PTQ"),
        Row("full pipeline without SubLN (λ warm-up + layer-wise + KD BitDistill)", "none",
            full("bitdistill", kd_weights)),
        Row("BitNet-SFT with the KD objective instead of CE (no SubLN, KD BitDistill for every step)", "none",
            [("kd", kd("bitdistill", kd_weights, total))]),
    ]


def lever_rows(total: int, batch_size: int, lr: float, seed: int,
               kd_weights: dict[str, float] | None = None) -> list[Row]:
    """The rows of issue #21: what a ternary start keeps of the teacher (0 tokens), then what ``total`` steps of QAT
    buy from each start — one lever per row (SubLN none: a fresh SubLN changes the teacher's function, so it would
    undo a calibrated start)."""
    data = StageData(batch_size=batch_size, eval_batch_size=16, eval_max_batches=4)

    def bitnet(rule: str, scale: str = "group") -> dict[str, Any]:
        return {"subln": "none", "weight_scale": scale, "scale_rule": rule}

    def calibrated(rule: str, scale: str = "group", **calibration: Any) -> dict[str, Any]:
        return {"bitnet": bitnet(rule, scale), "calibration": {"enabled": True, "blocks": 16, **calibration}}

    def ce(steps: int = total, rate: float = lr) -> list[tuple[str, Any]]:
        return [("cpt", CPTConfig(lambda_warmup_steps=0, train=_train(steps, rate, seed), data=data))]

    def kd(steps: int = total, rate: float = lr, train: TrainConfig | None = None, **change: float
           ) -> list[tuple[str, Any]]:
        weights = {**(kd_weights or PAPER_KD), **change}
        return [("kd", KDConfig(objective="bitdistill", **weights, train=train or _train(steps, rate, seed),
                                data=data))]

    split = total // 3  # stage 1.9's share of the budget in the rows that have one

    def stage19(target: str, train: TrainConfig | None = None) -> list[tuple[str, Any]]:
        return [("layerwise", LayerwiseConfig(target=target, train=train or _train(split, lr, seed), data=data))]

    # stage 1.9 then KD as windows of one schedule, with the warm-up a single stage of ``total`` steps would have
    first = _train(split, lr, seed).model_copy(update={"warmup_steps": _train(total, lr, seed).warmup_steps})
    shared = share_schedule([first, _train(total - split, lr, seed)])

    return [
        Row("PTQ, per-tensor absmean (BitNet)", "none"),
        Row("PTQ, per-group absmean", "none", convert={"bitnet": bitnet("absmean")}),
        Row("PTQ, per-group MSE-optimal scales", "none", convert={"bitnet": bitnet("mse")}),
        Row("calibrated start, per-tensor MSE scale (GPTQ)", "none", convert=calibrated("mse", "tensor")),
        Row("calibrated start, one full-precision pass a block", "none",
            convert=calibrated("mse", sequential=False, act_order=False)),
        Row("calibrated start, true sequential, columns in natural order", "none",
            convert=calibrated("mse", act_order=False)),
        Row("calibrated start (GPTQ, per-group MSE scales)", "none", convert=calibrated("mse")),
        Row("calibrated start, learned scales (= the row above at step 0)", "none", convert=calibrated("learned")),
        Row("calibrated start, 64 calibration blocks", "none", convert=calibrated("mse", blocks=64)),
        Row("calibrated + CE, fixed (recomputed MSE) scales", "none", ce(), convert=calibrated("mse")),
        Row("calibrated + CE, learned scales (LSQ)", "none", ce(), convert=calibrated("learned")),
        Row("calibrated + KD, learned scales", "none", kd(), convert=calibrated("learned")),
        Row("calibrated + KD, fixed (recomputed MSE) scales", "none", kd(), convert=calibrated("mse")),
        *[Row(f"calibrated + KD, learned scales, lr {lr * f:g}", "none", kd(rate=lr * f), convert=calibrated("learned"))
          for f in (2, 4, 8, 16, 32)],  # the LR sweep: lr … 32·lr
        # the KD weights around the preset's (τ 1, β 1, γ 1e3): one changed per row
        *[Row(f"calibrated + KD, learned scales, {name}", "none", kd(**change), convert=calibrated("learned"))
          for name, change in (("τ 2", {"temperature": 2.0}), ("γ 0 (logits only)", {"gamma": 0.0}),
                               ("γ 1e4", {"gamma": 1e4}), ("β 4", {"beta": 4.0}))],
        Row("absmean start + KD (the previous best row)", "none", kd()),
        Row(f"calibrated + layer-wise hidden states ({split} steps) + KD, learned scales", "none",
            stage19("hidden") + kd(total - split), convert=calibrated("learned")),
        Row(f"calibrated + block reconstruction ({split} steps) + KD, learned scales", "none",
            stage19("block") + kd(total - split), convert=calibrated("learned")),
        Row(f"calibrated + block by block from cached activations ({split} steps a block) + KD, learned scales",
            "none", stage19("block_sequential") + kd(total - split), convert=calibrated("learned")),
        *[Row(f"calibrated + block by block from cached activations only ({split} steps a block), lr {lr * f:g}",
              "none", [("layerwise", LayerwiseConfig(target="block_sequential", train=_train(split, lr * f, seed),
                                                     data=data))], convert=calibrated("learned"))
          for f in (1, 1 / 8)],  # what block fitting adds to the calibrated start, with no end-to-end step
        Row("calibrated + block reconstruction + KD, one LR schedule across both stages", "none",
            stage19("block", shared[0]) + kd(train=shared[1]), convert=calibrated("learned")),
    ]


class _CachedLogits(torch.nn.Module):
    """The teacher's logits of each eval batch, computed once for all rows (16 × 256 × 49,152 fp32 = 0.8 GB a batch
    for SmolLM2: cap the batches with ``--eval-batches``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        key = hashlib.sha256(input_ids.cpu().numpy().tobytes()).hexdigest()
        if key not in self.cache:
            with torch.no_grad():
                self.cache[key] = self.model(input_ids=input_ids).logits
        return SimpleNamespace(logits=self.cache[key])


def _stage_dir(root: Path, student_dir: Path, stage_name: str, cfg: Any) -> Path:
    """Where a stage run goes: named by what it starts from and its config, so rows that share a prefix of stages
    (the layer-wise stage of the last three rows, the CPT of both KD rows) train it once."""
    key = json.dumps([str(student_dir), stage_name, cfg.model_dump(mode="json")], sort_keys=True)
    return root / "stages" / f"{stage_name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def prepare_preset(args: argparse.Namespace) -> None:
    """World and teacher of a pipeline preset under WORKDIR (reused when built), and the preset's batch, lr, rank."""
    from flows.config import preset

    cfg = preset(args.preset)
    workdir = Path(args.workdir)
    if not (workdir / "world" / "world.json").is_file():
        run_stage("world", cfg.world.stage_config(), {}, workdir / "world")
    if not (workdir / "teacher" / "model" / "config.json").is_file():
        run_stage("teacher", cfg.teacher.stage_config(), {"world": workdir / "world"}, workdir / "teacher")
    args.batch_size, args.lrc_rank = cfg.cpt.data.batch_size, cfg.lrc.rank
    args.lr = args.lr if args.lr is not None else cfg.cpt.train.lr  # --lr moves the base of every row
    args.kd_weights = {"temperature": cfg.kd.temperature, "beta": cfg.kd.beta, "gamma": cfg.kd.gamma}


def bits_per_weight(model: torch.nn.Module) -> float:
    """Effective bits per ternary weight: log2(3) for the codes plus 16 bits per LRC adapter parameter (fp16)."""
    from bitnet.layers import bit_linears

    ternary = sum(m.weight.numel() for _, m in bit_linears(model))
    adapters = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("lrc_u", "lrc_v")))
    return math.log2(3) + 16 * adapters / max(ternary, 1)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    workdir = Path(args.workdir)
    if args.preset:
        prepare_preset(args)
    world: World = open_world(workdir / "world")
    teacher_dir = Path(args.teacher) if args.teacher else workdir / "teacher" / "model"
    if not (teacher_dir / "config.json").is_file():
        raise SystemExit(f"ablation: no teacher at {teacher_dir}: run `make demo` (or `bitdistill demo`) first")
    root = Path(args.out) if args.out else workdir / "ablation"
    if args.fresh and root.exists():
        shutil.rmtree(root)
    torch.manual_seed(args.seed)
    teacher = load_teacher(teacher_dir).eval()
    seq_len = world.info["config"]["seq_len"]
    test = world.dataset("test")

    cached_teacher = _CachedLogits(teacher)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return compare_to_teacher(model, cached_teacher, iter_eval_batches(test, 16, args.eval_batches))

    def evaluate_student(student_dir: Path) -> dict[str, float]:
        """Metrics and bits/weight of a finished student, computed once per test-row cap (next to the student, so a
        re-run with more rows evaluates only the new ones)."""
        cache = student_dir.parent / f"ablation-eval-{args.eval_batches or 'all'}.json"
        if cache.is_file():
            return json.loads(cache.read_text())
        student = load_student(student_dir).eval()
        metrics = {"bpw": bits_per_weight(student), **evaluate(student)}
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(metrics))
        tmp.replace(cache)
        return metrics

    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    results.append({"row": "teacher (full precision)", "tokens": 0, "train_s": 0.0, "bpw": 16.0, **evaluate(teacher)})
    print(_line(results[-1]), flush=True)
    train = world.dataset("train")
    test_rows = torch.cat([b["input_ids"] for b in iter_eval_batches(test, 16, args.eval_batches)]).numpy()
    unigram = unigram_perplexity(train.get_batch(range(train.num_blocks)).numpy().reshape(-1), test_rows,
                                 int(teacher.config.vocab_size))
    results.append({"row": "unigram (add-one, fit on the train split)", "tokens": 0, "ppl": unigram,
                    "top1_agreement": float("nan"), "kl": float("nan"), "train_s": 0.0, "stages": "—",
                    "bpw": float("nan")})
    print(_line(results[-1]), flush=True)
    source = teacher_dir / SOURCE_FILE
    if args.suite == "stages" and source.is_file() and Path(gguf := json.loads(source.read_text())["gguf"]).is_file():
        rows = torch.cat([b["input_ids"] for b in iter_eval_batches(test, 16, args.eval_batches)])
        ppl = gguf_perplexity(gguf, rows)
        results.append({"row": f"teacher's own GGUF ({Path(gguf).name}, llama.cpp)", "tokens": 0, "ppl": ppl,
                        "top1_agreement": float("nan"), "kl": float("nan"), "train_s": 0.0,
                        "stages": "—", "bpw": float("nan")})
        print(_line(results[-1]), flush=True)

    finals: dict[str, Path] = {}
    rows = (lever_rows(args.steps, args.batch_size, args.lr, args.seed, args.kd_weights) if args.suite == "levers"
            else build_rows(args.steps, args.batch_size, args.lr, args.lrc_rank, args.seed, args.kd_weights))
    for row in rows:
        if args.rows and not any(r.lower() in row.name.lower() for r in args.rows):
            continue
        if row.base is not None:
            base = results_by_row(results)[row.base]
            student_dir, tokens, train_s = finals[row.base], base["tokens"], base["train_s"]
        else:
            student_dir, tokens, train_s = root / row.student_name() / "model", 0, 0.0
            if not (student_dir / "bitnet.json").is_file():
                inputs = {"teacher": teacher_dir, "world": world.root}
                takes = (*stage("convert").inputs, *stage("convert").optional_inputs)
                run_stage("convert", row.convert_config(), {k: v for k, v in inputs.items() if k in takes},
                          student_dir.parent)
            convert_metrics = json.loads((student_dir.parent / "metrics.json").read_text())
            train_s = float(convert_metrics.get("calibration_seconds", 0.0))  # a calibrated start's cost
        for stage_name, cfg in row.stages:
            stage_out = _stage_dir(root, student_dir, stage_name, cfg)
            m = run_stage(stage_name, cfg, {"student": student_dir, "teacher": teacher_dir, "world": world.root},
                          stage_out)
            tokens += cfg.train.max_steps * cfg.data.batch_size * seq_len
            train_s += float(m.get("wall_s") or 0.0)  # the stage's own training time, also when reused
            shutil.rmtree(stage_out / "train" / "checkpoints", ignore_errors=True)  # resume state: 1.6 GB each (135M)
            student_dir = stage_out / "model"
        finals[row.name] = student_dir
        rec = {"row": row.name, "tokens": tokens, "train_s": train_s,
               "stages": "+".join(n for n, _ in row.stages) or "convert", **evaluate_student(student_dir)}
        results.append(rec)
        print(_line(rec), flush=True)
    print(f"ablation: {len(results)} rows in {time.perf_counter() - t0:.0f} s wall "
          f"({torch.get_num_threads()} torch threads)", flush=True)
    return results


def results_by_row(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["row"]: r for r in results}


def _line(r: dict[str, Any]) -> str:
    return (f"{r['row']:<34} ppl {r['ppl']:9.2f}  top1 {r['top1_agreement']:.3f}  kl {r['kl']:.3f}  "
            f"tokens {r['tokens']:>9,}  train {r['train_s']:7.1f}s")


def table(results: list[dict[str, Any]]) -> str:
    teacher_ppl = results[0]["ppl"]
    out = [
        "| row | stages | test ppl | ×teacher | top-1 agreement | KL(T‖S) | bits/weight | train tokens | train time |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        out.append(
            f"| {r['row']} | {r.get('stages', '—')} | {r['ppl']:.2f} | {r['ppl'] / teacher_ppl:.3f} | "
            f"{r['top1_agreement']:.3f} | {r['kl']:.3f} | {r.get('bpw', float('nan')):.2f} | {r['tokens']:,} | "
            f"{r['train_s']:.0f} s |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="a `bitdistill demo` work directory (world + teacher); default runs/tiny, or "
                   "runs/PRESET/ablation-base with --preset")
    p.add_argument("--preset", help="take world, teacher, batch, lr and LRC rank from this pipeline preset "
                   "(e.g. smollm2-135m: the real pretrained teacher)")
    p.add_argument("--teacher", help="teacher HF directory (default: WORKDIR/teacher/model)")
    p.add_argument("--out", help="where stage outputs go (default: WORKDIR/ablation)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of every trained row (split among stages)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="base learning rate of every row (default: the preset's "
                   "stage-2 lr, or 1e-3)")
    p.add_argument("--lrc-rank", type=int, default=32)
    p.add_argument("--eval-batches", type=int, default=None, help="cap on 16-block test batches (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="delete WORKDIR/ablation first")
    p.add_argument("--suite", choices=("stages", "levers"), default="stages",
                   help="stages: the BitDistill stage ablation; levers: the ternary start and QAT levers (issue #21)")
    p.add_argument("--rows", nargs="*", help="only the rows whose name contains one of these strings")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--markdown", help="write the table as markdown here")
    p.set_defaults(kd_weights=None)  # stage-3 τ, β, γ: the paper's, or the preset's (prepare_preset)
    args = p.parse_args(argv)
    args.workdir = args.workdir or (f"runs/{args.preset}/ablation-base" if args.preset else "runs/tiny")
    if not args.preset and args.lr is None:
        args.lr = 1e-3
    results = run(args)
    md = table(results)
    print("\n" + md)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

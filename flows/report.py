"""The per-run summary of flow ``bitdistill``: one row per stage, rendered as a markdown table."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Status = Literal["completed", "cached", "reused", "disabled", "skipped", "failed"]


class StageRow(BaseModel):
    stage: str
    status: Status
    state: str | None = Field(default=None, description="Prefect state name of the task run")
    cached: bool = False
    final_loss: float | None = None
    perplexity: float | None = None
    tokens: int | None = Field(default=None, description="training tokens of the stage (its manifest metrics)")
    tokens_per_s: float | None = None
    peak_gb: float | None = Field(default=None, description="peak memory of the run that made it: CUDA, else RSS")
    wall_s: float = 0.0
    uri: str | None = None
    note: str = ""


class RunSummary(BaseModel):
    preset: str
    flow_run: str | None = None
    root: str
    stages: list[StageRow] = Field(default_factory=list)
    student: str | None = Field(default=None, description="URI of the final student artifact")
    gguf: str | None = Field(default=None, description="URI of the exported GGUF")
    evaluation: dict[str, Any] | None = Field(default=None, description="metrics of the eval stage")
    report: str | None = Field(default=None, description="URI of report.md")
    mlflow: str | None = Field(default=None, description="the MLflow parent run of this flow run")

    def row(self, stage: str) -> StageRow:
        return next(r for r in self.stages if r.stage == stage)


def _fmt(v: float | None, digits: int = 4, style: str = "g") -> str:
    return "–" if v is None else f"{v:.{digits}{style}}"


def markdown(summary: RunSummary) -> str:
    lines = [
        f"# bitdistill · preset `{summary.preset}` · run `{summary.flow_run}`",
        "",
        "| stage | status | cached? | final loss | perplexity | tokens | tokens/s | peak memory | wall time "
        "| artifact |",
        "|---|---|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in summary.stages:
        status = r.status + (f" ({r.note})" if r.note else "")
        lines.append(
            f"| {r.stage} | {status} | {'yes' if r.cached else 'no'} | {_fmt(r.final_loss)} | {_fmt(r.perplexity)} "
            f"| {'–' if r.tokens is None else f'{r.tokens:,}'} | {_fmt(r.tokens_per_s, 0, 'f')} "
            f"| {'–' if r.peak_gb is None else f'{r.peak_gb:.1f} GB'} | {r.wall_s:.1f} s | {r.uri or '–'} |"
        )
    if ev := summary.evaluation:
        lines += ["", f"## held-out evaluation ({ev.get('split', '?')} split)", "",
                  "| model | perplexity | top-1 agreement with teacher | KL(teacher ‖ model) |", "|---|---|---|---|",
                  f"| teacher | {_fmt(ev.get('teacher_ppl'))} | – | – |"]
        for name, label in (("naive", "naive ternary (converted, untrained)"), ("student", "student")):
            agree = _fmt(ev.get(f"{name}_top1_agreement"), 3, "f")
            lines.append(f"| {label} | {_fmt(ev.get(f'{name}_ppl'))} | {agree} | {_fmt(ev.get(f'{name}_kl'), 3)} |")
    lines += ["", f"final student: `{summary.student or '–'}`", f"GGUF: `{summary.gguf or '–'}`",
              f"MLflow: `{summary.mlflow or '–'}`", f"artifact root: `{summary.root}`"]
    return "\n".join(lines) + "\n"


def _as_float(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def stage_numbers(metrics: dict[str, Any]) -> tuple[float | None, float | None]:
    """(final training loss, perplexity) from a stage's manifest metrics."""
    ppl = metrics.get("val_ppl", metrics.get("test_ppl", metrics.get("unigram_test_ppl")))
    return _as_float(metrics.get("train_loss")), _as_float(ppl)


def stage_throughput(metrics: dict[str, Any]) -> dict[str, Any]:
    """``tokens``, ``tokens_per_s`` and ``peak_gb`` (CUDA when measured, else RSS) of a training stage's metrics."""
    tokens = _as_float(metrics.get("tokens"))
    peak = _as_float(metrics.get("peak_cuda_gb")) or _as_float(metrics.get("peak_rss_gb"))
    return {"tokens": None if tokens is None else int(tokens), "tokens_per_s": _as_float(metrics.get("tokens_per_s")),
            "peak_gb": peak}

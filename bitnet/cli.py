"""``bitdistill`` command line: build the tiny world, train the teacher, convert, run the offline demo.

Every command takes ``--config FILE`` (YAML or JSON, validated) and a few flags that override it. Bad
input ends with a one-line ``bitdistill: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)

DEFAULT_WORKDIR = Path("runs/tiny")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def load_config(model: type[T], path: str | None, overrides: dict[str, Any] | None = None) -> T:
    """Validate a YAML/JSON config file (or the defaults) plus dotted overrides into ``model``."""
    data: dict[str, Any] = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise CLIError(f"config file {file} does not exist")
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as e:
            raise CLIError(f"config file {file} is not valid YAML/JSON: {str(e).splitlines()[0]}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise CLIError(f"config file {file} must hold a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    cfg = _validate(model, data)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if not overrides:
        return cfg
    # overrides apply on top of the validated config, so nested defaults (e.g. a stage's train schedule) survive
    full = cfg.model_dump(mode="json", exclude_unset=False)
    for dotted, value in overrides.items():
        node = full
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return _validate(model, full)


def _validate(model: type[T], data: dict[str, Any]) -> T:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "<root>"
        raise CLIError(f"invalid {model.__name__}: {loc}: {first['msg']} ({e.error_count()} error(s))") from e


# ----------------------------------------------------------------------------------------------- commands
def cmd_world_build(args: argparse.Namespace) -> int:
    from bitnet.world import WorldConfig, build_world

    overrides: dict[str, Any] = {"vocab_size": args.vocab_size, "seq_len": args.seq_len, "tokenizer": args.tokenizer}
    if args.source_dir:
        overrides["source"] = {"kind": "dir", "path": args.source_dir, "glob": args.glob}
    cfg = load_config(WorldConfig, args.config, overrides)
    world = build_world(cfg, args.out, force=args.force)
    print(json.dumps({"world": str(world.root), **_world_summary(world.info)}, indent=2))
    return 0


def cmd_teacher_train(args: argparse.Namespace) -> int:
    from bitnet.stages import TeacherStageConfig, train_teacher
    from bitnet.world import open_world

    cfg = load_config(
        TeacherStageConfig,
        args.config,
        {"train.max_steps": args.steps, "batch_size": args.batch_size, "train.lr": args.lr, "train.progress": args.progress},
    )
    metrics = train_teacher(cfg, open_world(args.world), args.out)
    if metrics.get("test_ppl") is not None:
        print(json.dumps(metrics, indent=2))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from bitnet.stages import ConvertStageConfig, convert_teacher

    cfg = load_config(ConvertStageConfig, args.config, {"bitnet.subln": args.subln})
    print(json.dumps(convert_teacher(cfg, args.teacher, args.out), indent=2))
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from bitnet.stages import STUDENT_STAGES, run_student_stage
    from bitnet.world import open_world

    cfg = load_config(STUDENT_STAGES[args.name], args.config, {"train.max_steps": args.steps, "train.progress": args.progress})
    metrics = run_student_stage(cfg, args.student, args.teacher, open_world(args.world), args.out)
    if metrics.get("val_ppl") is not None:
        print(json.dumps(metrics, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from bitnet.stages import TeacherStageConfig, train_teacher
    from bitnet.world import WorldConfig, build_world

    workdir = Path(args.workdir)
    t0 = time.perf_counter()
    world = build_world(load_config(WorldConfig, None), workdir / "world")
    t_world = time.perf_counter() - t0
    cfg = load_config(TeacherStageConfig, args.teacher_config, {"train.max_steps": args.steps})
    metrics = train_teacher(cfg, world, workdir / "teacher")
    report = _demo_report(world.info, metrics, t_world, workdir)
    (workdir / "report.md").write_text(report)
    print(report)
    return 0


def _world_summary(info: dict[str, Any]) -> dict[str, Any]:
    return {
        "vocab_size": info["vocab_size"],
        "splits": info["splits"],
        "unigram_test_ppl": round(info["unigram_test_ppl"], 2),
    }


def _demo_report(info: dict[str, Any], m: dict[str, Any], t_world: float, workdir: Path) -> str:
    s = info["splits"]
    mb = sum(v["bytes"] for v in s.values()) / 1e6
    rows = [
        ("corpus", f"{sum(v['documents'] for v in s.values())} documents, {mb:.1f} MB"),
        ("tokens train / val / test", " / ".join(f"{s[k]['tokens']:,}" for k in ("train", "validation", "test") if k in s)),
        ("tokenizer", f"byte-level BPE, {info['vocab_size']} tokens"),
        ("world build", f"{t_world:.0f} s"),
        ("teacher", f"Llama, {m['parameters']:,} parameters"),
        ("teacher training", f"{m['steps']} steps, {m['tokens']:,} tokens, {m['wall_s']:.0f} s"),
        ("teacher val / test perplexity", f"{m['val_ppl']:.2f} / {m['test_ppl']:.2f}"),
        ("unigram test perplexity", f"{m['unigram_test_ppl']:.2f}"),
        ("teacher checkpoint", str(workdir / "teacher" / "model")),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["# bitdistill tiny world", "", f"| {'what'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitdistill",
        description="Distil full-precision causal LMs into 1.58-bit BitNet students.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    world = sub.add_parser("world", help="the offline tiny world (corpus, tokenizer, packed data)")
    wsub = world.add_subparsers(dest="world_command", required=True, metavar="ACTION")
    wb = wsub.add_parser("build", help="split the corpus, train the BPE tokenizer, pack token blocks")
    wb.add_argument("--out", default=str(DEFAULT_WORKDIR / "world"), help="world directory (default: %(default)s)")
    wb.add_argument("--config", help="WorldConfig as YAML/JSON")
    wb.add_argument("--source-dir", help="use the text files of this directory as the corpus")
    wb.add_argument("--glob", default="**/*.txt", help="file pattern with --source-dir (default: %(default)s)")
    wb.add_argument("--vocab-size", type=int, help="BPE vocabulary size")
    wb.add_argument("--tokenizer", help="use this HF tokenizer (dir or hub id) instead of training one")
    wb.add_argument("--seq-len", type=int, help="tokens per packed block")
    wb.add_argument("--force", action="store_true", help="rebuild even if an up-to-date world exists")
    wb.set_defaults(func=cmd_world_build)

    teacher = sub.add_parser("teacher", help="the tiny Llama teacher")
    tsub = teacher.add_subparsers(dest="teacher_command", required=True, metavar="ACTION")
    tt = tsub.add_parser("train", help="pretrain the tiny teacher on a world (resumes from its checkpoints)")
    tt.add_argument("--world", default=str(DEFAULT_WORKDIR / "world"), help="built world (default: %(default)s)")
    tt.add_argument("--out", default=str(DEFAULT_WORKDIR / "teacher"), help="output directory (default: %(default)s)")
    tt.add_argument("--config", help="TeacherStageConfig as YAML/JSON")
    tt.add_argument("--steps", type=int, help="optimizer steps")
    tt.add_argument("--batch-size", type=int, help="blocks per micro-batch per process")
    tt.add_argument("--lr", type=float, help="peak learning rate")
    tt.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    tt.set_defaults(func=cmd_teacher_train)

    cv = sub.add_parser("convert", help="stage 1: teacher → BitNet student (BitLinear + SubLN)")
    cv.add_argument("--teacher", required=True, help="HF model directory or hub id")
    cv.add_argument("--out", required=True, help="student directory")
    cv.add_argument("--config", help="ConvertStageConfig as YAML/JSON")
    cv.add_argument("--subln", choices=["standard", "all", "none"], help="SubLN placement")
    cv.set_defaults(func=cmd_convert)

    st = sub.add_parser("stage", help="run one student stage: layerwise (1.9), cpt (2), kd (3) or lrc")
    st.add_argument("name", choices=["layerwise", "cpt", "kd", "lrc"], help="the stage")
    st.add_argument("--student", required=True, help="input student directory (from `convert` or a previous stage)")
    st.add_argument("--teacher", required=True, help="teacher: HF model directory or hub id")
    st.add_argument("--world", default=str(DEFAULT_WORKDIR / "world"), help="built world (default: %(default)s)")
    st.add_argument("--out", required=True, help="output directory (student in OUT/model, checkpoints in OUT/train)")
    st.add_argument("--config", help="the stage's config as YAML/JSON")
    st.add_argument("--steps", type=int, help="optimizer steps")
    st.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    st.set_defaults(func=cmd_stage)

    demo = sub.add_parser("demo", help="offline tiny pipeline: build the world and train the teacher")
    demo.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help="work directory (default: %(default)s)")
    demo.add_argument("--teacher-config", help="TeacherStageConfig as YAML/JSON")
    demo.add_argument("--steps", type=int, help="teacher optimizer steps")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from bitnet.data import DataError
    from bitnet.convert import UnsupportedArchitectureError
    from bitnet.student import CheckpointError
    from bitnet.trainer import NonFiniteLossError

    try:
        return args.func(args)
    except (CLIError, DataError, CheckpointError, UnsupportedArchitectureError, NonFiniteLossError,
            FileNotFoundError, FileExistsError, ValueError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"bitdistill: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

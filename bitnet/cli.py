"""``bitdistill`` command line: build the tiny world, train the teacher, convert, run the offline demo,
export GGUF for llama.cpp and serve it.

Every command takes ``--config FILE`` (YAML or JSON, validated) and a few flags that override it. Bad
input ends with a one-line ``bitdistill: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from bitnet.config import ConfigError
from bitnet.families import graph_names

DEFAULT_WORKDIR = Path("runs/tiny")
INPUT_FLAGS = ("world", "teacher", "student", "naive", "model")  # `bitdistill stage NAME --<input> DIR`


class CLIError(ConfigError):
    """A user-facing error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------- stages
def run_stage_command(
    name: str, args: argparse.Namespace, inputs: dict[str, str | None], overrides: dict[str, Any]
) -> dict[str, Any]:
    """Every stage command: the stage's config (defaults, ``--config``, the command's flags, ``--set``) → run."""
    from bitnet.config import load_config
    from bitnet.stages.registry import run_stage, stage

    st = stage(name)
    cfg = load_config(st.config, getattr(args, "config", None), overrides, sets=getattr(args, "set", None))
    return run_stage(name, cfg, {k: Path(v) for k, v in inputs.items() if v is not None}, Path(args.out))


def cmd_stage(args: argparse.Namespace) -> int:
    inputs = {k: getattr(args, k) for k in INPUT_FLAGS}
    overrides = {"train.max_steps": args.steps, "train.progress": args.progress}
    from bitnet.stages import STAGES

    if "train" not in STAGES[args.name].config.model_fields:
        overrides = {}
    metrics = run_stage_command(args.name, args, inputs, overrides)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_world_build(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {"vocab_size": args.vocab_size, "seq_len": args.seq_len, "tokenizer": args.tokenizer}
    if args.source_dir:
        overrides["source"] = {"kind": "dir", "path": args.source_dir, "glob": args.glob}
    if args.force:  # a finished world of the same config is reused; forget that it is finished (it stays in place
        from bitnet.stages.outputs import forget_output  # until the new one replaces it)

        forget_output(Path(args.out))
    metrics = run_stage_command("world", args, {}, _source_override(overrides))
    print(json.dumps({"world": str(args.out), **_world_summary(metrics)}, indent=2))
    return 0


def _source_override(overrides: dict[str, Any]) -> dict[str, Any]:
    """A ``source`` mapping replaces the configured one as a whole (not key by key)."""
    src = overrides.pop("source", None)
    return {**overrides, **({"source": src} if src else {})}


def cmd_teacher_train(args: argparse.Namespace) -> int:
    overrides = {"train.max_steps": args.steps, "data.batch_size": args.batch_size, "train.lr": args.lr,
                 "train.progress": args.progress}
    metrics = run_stage_command("teacher", args, {"world": args.world}, overrides)
    if metrics.get("test_ppl") is not None:
        print(json.dumps(metrics, indent=2))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    print(json.dumps(run_stage_command("convert", args, {"teacher": args.teacher}, {"bitnet.subln": args.subln}),
                     indent=2))
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    overrides = {"influence.keep_fraction": args.keep, "max_candidates": args.max_candidates}
    stats = run_stage_command("select", args, {"model": args.model, "world": args.world}, overrides)
    keep = ("n_candidates", "n_kept", "score_kept_mean", "seconds")
    print(json.dumps({"out": args.out, **{k: stats[k] for k in keep}}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from bitnet.config import load_config
    from bitnet.stages.registry import run_stage
    from bitnet.stages.teacher import TeacherConfig
    from bitnet.world import WorldConfig, open_world

    workdir = Path(args.workdir)
    t0 = time.perf_counter()
    run_stage("world", WorldConfig(), {}, workdir / "world")
    world = open_world(workdir / "world")
    t_world = time.perf_counter() - t0
    cfg = load_config(TeacherConfig, args.teacher_config, {"train.max_steps": args.steps})
    metrics = run_stage("teacher", cfg, {"world": workdir / "world"}, workdir / "teacher")
    report = _demo_report(world.info, metrics, t_world, workdir)
    (workdir / "report.md").write_text(report)
    print(report)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bitnet.export import export_gguf
    from bitnet.export.plan import plan_export
    from bitnet.io import model_dir
    from bitnet.student import load_student

    student = model_dir(args.student)  # a stage output or its model/
    if not student.is_dir():
        raise CLIError(f"student directory {student} does not exist")
    options = {"weight_type": args.type, "embedding_type": args.embedding_type, "delta": args.delta,
               "fallback": args.fallback, "arch": args.arch}
    if args.plan:  # the per-tensor type plan; nothing is written
        print(plan_export(load_student(student), **options).table())
        return 0
    if not args.out:
        raise CLIError("export needs --out FILE.gguf (or --plan)")
    out = Path(args.out)
    if out.suffix != ".gguf" or out.is_dir():
        raise CLIError(f"--out must name a .gguf file, got {'the directory ' if out.is_dir() else ''}{out}")
    lora_out = Path(args.lora_out) if args.lora_out else out.with_name(out.stem + ".lrc.gguf")
    for flag, path in (("--out", out), ("--lora-out", lora_out)):
        check_replaceable_file(path, flag, is_gguf, "a GGUF file")
    result = export_gguf(student, out, tokenizer=export_tokenizer(args.tokenizer, student),
                         tokenizer_pre=args.tokenizer_pre, lora_out=lora_out, **options)
    summary = {
        "gguf": str(result.path),
        "arch": result.arch,
        "type": result.weight_type,
        "bytes": result.file_bytes,
        "tensors": result.n_tensors,
        "ternary_bits_per_weight": round(result.bits_per_ternary_weight, 4),
        "lora_adapter": str(result.lora_path) if result.lora_path else None,
    }
    if args.hf_out:  # also a checkpoint transformers loads: its own `bitnet` type where it fits, else remote code
        from bitnet.data.tokenizer import load_tokenizer
        from bitnet.export.hf_student import save_hf

        tok_dir = args.tokenizer or (str(student) if (student / "tokenizer_config.json").is_file() else None)
        tok = load_tokenizer(tok_dir) if tok_dir else None
        path, form = save_hf(load_student(student), args.hf_out, tok)
        summary["hf_checkpoint"], summary["hf_form"] = str(path), form
    print(json.dumps(summary, indent=2))
    return 0


def export_tokenizer(flag: str | None, student: Path) -> Any:
    """``--tokenizer``, else the student directory's own tokenizer, loaded here so that a malformed one is a one-line
    error; None when the student directory has no tokenizer files (the export then says what to pass)."""
    from bitnet.data.tokenizer import VOCAB_FILES, load_tokenizer

    if flag:
        return load_tokenizer(flag)
    return load_tokenizer(student) if any((student / f).is_file() for f in VOCAB_FILES) else None


def cmd_serve(args: argparse.Namespace) -> int:
    from bitnet.serve import ServerUnavailableError, serve

    model, lora = export_files(args.model, args.lora)
    if not model.is_file():
        raise CLIError(f"model file {args.model} does not exist")
    try:
        serve(model, host=args.host, port=args.port, lora=lora, n_ctx=args.n_ctx, n_threads=args.threads)
    except ServerUnavailableError as e:
        raise CLIError(str(e)) from e
    return 0


def export_files(model: str | Path, lora: str | Path | None) -> tuple[Path, Path | None]:
    """An export stage's output directory → its GGUF and (unless ``lora`` is given) its LRC adapter, when it has one;
    files are returned as they are."""
    from bitnet.stages.export import GGUF_NAME, LORA_NAME

    model = Path(model)
    if model.is_dir() and (model / GGUF_NAME).is_file():
        if lora is None and (model / LORA_NAME).is_file():
            lora = model / LORA_NAME
        model = model / GGUF_NAME
    if lora is not None and Path(lora).is_dir() and (Path(lora) / LORA_NAME).is_file():
        lora = Path(lora) / LORA_NAME
    return model, Path(lora) if lora is not None else None


def cmd_eval(args: argparse.Namespace) -> int:
    from bitnet.config import load_config
    from bitnet.data.tokenizer import load_tokenizer
    from bitnet.evaluate import HarnessConfig, evaluate_model, load_model_for_eval, write_results
    from bitnet.io import model_dir as stage_model_dir
    from bitnet.world import open_world

    tasks = [t for t in args.tasks.split(",") if t] if args.tasks is not None else None
    cfg = load_config(
        HarnessConfig,
        args.config,
        {"tasks": tasks, "limit": args.limit, "max_blocks": args.max_blocks, "batch_size": args.batch_size,
         "num_fewshot": args.num_fewshot, "threads": args.threads, "n_cloze": args.n_cloze},
    )
    if args.gguf:  # an export stage's output directory: its GGUF and LRC adapter
        gguf_file, lora_file = export_files(args.gguf, args.lora)
        args.gguf, args.lora = str(gguf_file), (str(lora_file) if lora_file else None)
    for flag, file in (("--gguf", args.gguf), ("--lora", args.lora)):
        if file and not Path(file).is_file():
            raise CLIError(f"{flag} file {file} does not exist")
    if args.out:  # before the (long) evaluation, not after
        check_replaceable_file(Path(args.out), "--out", is_results_json, "an eval results JSON")
    world = open_world(args.world)
    model = load_model_for_eval(args.model)
    model_dir = stage_model_dir(args.model)  # a stage output's model/ (the README: --model takes either)
    own_tokenizer = (model_dir / "tokenizer_config.json").is_file()
    tok_source = args.tokenizer or (str(model_dir) if own_tokenizer else str(world.tokenizer_dir))
    tokenizer = load_tokenizer(tok_source)
    eval_dir = Path(args.eval_dir) if args.eval_dir else Path(args.world).resolve().parent / "eval"
    results = evaluate_model(model, tokenizer, world.dataset(cfg.split), eval_dir / f"data-{cfg.split}", cfg,
                             name=str(args.model), gguf=args.gguf, lora=args.lora, max_blocks=cfg.max_blocks)
    out = Path(args.out) if args.out else eval_dir / f"results-{Path(args.model).name or 'model'}.json"
    check_replaceable_file(out, "--out", is_results_json, "an eval results JSON")
    write_results(results, out)
    print(results.table())
    print(f"results: {out}")
    return 0


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def is_results_json(path: Path) -> bool:
    """A file ``write_results`` wrote (its four top-level keys)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and {"model", "perplexity", "tasks", "info"} <= set(obj)


def check_replaceable_file(path: Path, flag: str, same_kind: Any, kind: str) -> None:
    """An output file may replace only an earlier output of its own kind, never a directory or another file."""
    if path.is_dir():
        raise CLIError(f"{flag} {path} is a directory; name the output file")
    if path.exists() and not same_kind(path):
        raise CLIError(f"refusing to overwrite {path} with {flag}: it exists and is not {kind}")
    check_writable_dir(path.parent)


def check_writable_dir(d: Path) -> None:
    """Create ``d`` and a probe file in it: an unwritable output location fails before the work, not after."""
    import tempfile

    from bitnet.io import temp_name

    d.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=d, prefix=temp_name("bitdistill-probe")):  # a killed one's is swept
        pass


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
        ("tokens train / val / test",
         " / ".join(f"{s[k]['tokens']:,}" for k in ("train", "validation", "test") if k in s)),
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
class Subcommands(Protocol):
    """What ``ArgumentParser.add_subparsers()`` returns, as far as the command builders use it."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


def new_parser() -> tuple[argparse.ArgumentParser, Subcommands]:
    """The bare ``bitdistill`` parser and its subcommand group, to which :func:`add_commands` (and ``flows.cli``,
    for ``plan`` and ``run``) add the commands."""
    parser = argparse.ArgumentParser(
        prog="bitdistill",
        description="Distil full-precision causal LMs into 1.58-bit BitNet students.",
    )
    return parser, parser.add_subparsers(dest="command", required=True, metavar="COMMAND")


def _config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="the stage's config as YAML/JSON (merged over its defaults)")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                   help="override one config value, e.g. --set train.lr=1e-4 (repeatable; applied last)")


def _add_world(sub: Subcommands) -> None:
    world = sub.add_parser("world", help="the offline tiny world (corpus, tokenizer, packed data)")
    wsub = world.add_subparsers(dest="world_command", required=True, metavar="ACTION")
    wb = wsub.add_parser("build", help="split the corpus, train the BPE tokenizer, pack token blocks")
    wb.add_argument("--out", default=str(DEFAULT_WORKDIR / "world"), help="world directory (default: %(default)s)")
    _config_flags(wb)
    wb.add_argument("--source-dir", help="use the text files of this directory as the corpus")
    wb.add_argument("--glob", default="**/*.txt", help="file pattern with --source-dir (default: %(default)s)")
    wb.add_argument("--vocab-size", type=int, help="BPE vocabulary size")
    wb.add_argument("--tokenizer", help="use this HF tokenizer (dir or hub id) instead of training one")
    wb.add_argument("--seq-len", type=int, help="tokens per packed block")
    wb.add_argument("--force", action="store_true", help="rebuild even if an up-to-date world exists")
    wb.set_defaults(func=cmd_world_build)


def _add_teacher(sub: Subcommands) -> None:
    teacher = sub.add_parser("teacher", help="the tiny Llama teacher")
    tsub = teacher.add_subparsers(dest="teacher_command", required=True, metavar="ACTION")
    tt = tsub.add_parser("train", help="pretrain the tiny teacher on a world (resumes from its checkpoints)")
    tt.add_argument("--world", default=str(DEFAULT_WORKDIR / "world"), help="built world (default: %(default)s)")
    tt.add_argument("--out", default=str(DEFAULT_WORKDIR / "teacher"), help="output directory (default: %(default)s)")
    _config_flags(tt)
    tt.add_argument("--steps", type=int, help="optimizer steps")
    tt.add_argument("--batch-size", type=int, help="blocks per micro-batch per process")
    tt.add_argument("--lr", type=float, help="peak learning rate")
    tt.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    tt.set_defaults(func=cmd_teacher_train)


def _add_convert(sub: Subcommands) -> None:
    cv = sub.add_parser("convert", help="stage 1: teacher → BitNet student (BitLinear + SubLN)")
    cv.add_argument("--teacher", required=True, help="HF model directory or hub id")
    cv.add_argument("--out", required=True, help="output directory (the student in OUT/model)")
    _config_flags(cv)
    cv.add_argument("--subln", choices=["standard", "all", "none"], help="SubLN placement")
    cv.set_defaults(func=cmd_convert)


def _add_stage(sub: Subcommands) -> None:
    from bitnet.stages import STAGES

    st = sub.add_parser("stage", help="run any stage by name: " + ", ".join(STAGES))
    st.add_argument("name", choices=list(STAGES), help="the stage")
    for name in INPUT_FLAGS:
        st.add_argument(f"--{name}", help=f"input `{name}`: a directory from an earlier stage (the teacher may "
                        "also be an HF hub id); which inputs a stage reads: docs/stages.md")
    st.add_argument("--out", required=True, help="output directory (a student in OUT/model, checkpoints in OUT/train)")
    st.add_argument("--steps", type=int, help="optimizer steps (training stages)")
    st.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    _config_flags(st)
    st.set_defaults(func=cmd_stage)


def _add_export(sub: Subcommands) -> None:
    from bitnet.export.quants import DELTA_MODES, EMBEDDING_TYPES, FALLBACKS, WEIGHT_TYPES

    ex = sub.add_parser("export", help="write a student as a llama.cpp GGUF (bitnet or its native graph; exact "
                        "ternary types per tensor)")
    ex.add_argument("--student", required=True, help="student directory (from `convert` or a stage's output)")
    ex.add_argument("--out", help="output .gguf file (not needed with --plan)")
    ex.add_argument("--plan", action="store_true", help="print the per-tensor type plan (tensor, shape, type, bits) "
                    "and exit; nothing is written")
    ex.add_argument("--type", choices=WEIGHT_TYPES, default="tq2_0",
                    help="preferred type of the ternary matrices (default: %(default)s)")
    ex.add_argument("--fallback", choices=FALLBACKS, default="auto",
                    help="exact type for rows TQ2_0/TQ1_0 cannot hold (default: %(default)s = q4_0, measured faster)")
    ex.add_argument("--embedding-type", choices=EMBEDDING_TYPES, default="f16",
                    help="token embedding / output matrix (default: %(default)s)")
    ex.add_argument("--arch", choices=["auto", *graph_names()], default="auto",
                    help="llama.cpp graph (default: bitnet for SubLN students, the native graph for --subln none)")
    ex.add_argument("--delta", choices=DELTA_MODES, default="auto",
                    help="Δ as an exact .scale tensor or folded into the block scales (default: %(default)s)")
    ex.add_argument("--tokenizer", help="HF tokenizer directory (default: the student directory)")
    ex.add_argument("--tokenizer-pre", help="llama.cpp pre-tokenizer name when it cannot be inferred")
    ex.add_argument("--lora-out", help="LRC adapter GGUF for LRC students (default: OUT with .lrc.gguf)")
    ex.add_argument("--hf-out", help="also save a Hugging Face checkpoint (transformers' bitnet type, else remote "
                    "code) here")
    ex.set_defaults(func=cmd_export)


def _add_serve(sub: Subcommands) -> None:
    sv = sub.add_parser("serve", help="serve a GGUF with llama.cpp's OpenAI-compatible HTTP server")
    sv.add_argument("model", help="the .gguf file, or an export stage output (its student.gguf and lrc-lora.gguf)")
    sv.add_argument("--host", default="127.0.0.1", help="listen address (default: %(default)s)")
    sv.add_argument("--port", type=int, default=8000, help="listen port (default: %(default)s)")
    sv.add_argument("--lora", help="LoRA adapter GGUF to apply (the LRC adapter of an LRC student)")
    sv.add_argument("--n-ctx", type=int, default=1024, help="context size (default: %(default)s)")
    sv.add_argument("--threads", type=int, help="CPU threads (default: llama-cpp-python's)")
    sv.set_defaults(func=cmd_serve)


def _add_eval(sub: Subcommands) -> None:
    ev = sub.add_parser("eval", help="perplexity (PyTorch, lm-eval rolling, llama.cpp) and lm-eval tasks of a model")
    ev.add_argument("--model", required=True,
                    help="student directory or a stage output holding one, or an HF model directory / hub id "
                    "(e.g. the teacher)")
    ev.add_argument("--world", default=str(DEFAULT_WORKDIR / "world"), help="built world (default: %(default)s)")
    ev.add_argument("--gguf", help="also evaluate this GGUF (or an export stage output) through llama.cpp "
                    "(perplexity on the same blocks)")
    ev.add_argument("--lora", help="LoRA/LRC adapter GGUF applied with --gguf")
    ev.add_argument("--tasks",
                    help="comma-separated lm-eval tasks (default: bitdistill_heldout,bitdistill_cloze; '' for none)")
    ev.add_argument("--config", help="HarnessConfig as YAML/JSON")
    ev.add_argument("--tokenizer", help="HF tokenizer (default: the model directory's, else the world's)")
    ev.add_argument("--limit", type=int, help="examples per lm-eval task")
    ev.add_argument("--num-fewshot", type=int, help="few-shot examples for lm-eval tasks")
    ev.add_argument("--max-blocks", type=int, help="held-out blocks for the PyTorch / llama.cpp perplexity")
    ev.add_argument("--n-cloze", type=int, help="items of the local cloze task")
    ev.add_argument("--batch-size", type=int, help="batch size")
    ev.add_argument("--threads", type=int, help="llama.cpp threads")
    ev.add_argument("--eval-dir", help="where the local task data is built (default: WORLD/../eval)")
    ev.add_argument("--out", help="results JSON (default: EVAL_DIR/results-<model dir name>.json)")
    ev.set_defaults(func=cmd_eval)


def _add_select(sub: Subcommands) -> None:
    se = sub.add_parser("select", help="influence-based data selection: keep the train blocks most like a target split")
    se.add_argument("--model", required=True, help="model whose gradients score the data (student or HF directory)")
    se.add_argument("--world", default=str(DEFAULT_WORKDIR / "world"), help="built world (default: %(default)s)")
    se.add_argument("--out", required=True, help="output packed dataset (train a stage on it with data.train_data)")
    _config_flags(se)
    se.add_argument("--keep", type=float, help="fraction of the candidates to keep")
    se.add_argument("--max-candidates", type=int, help="score only the first N train blocks")
    se.set_defaults(func=cmd_select)


def _add_demo(sub: Subcommands) -> None:
    demo = sub.add_parser("demo", help="offline tiny pipeline: build the world and train the teacher")
    demo.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help="work directory (default: %(default)s)")
    demo.add_argument("--teacher-config", help="TeacherConfig as YAML/JSON")
    demo.add_argument("--steps", type=int, help="teacher optimizer steps")
    demo.set_defaults(func=cmd_demo)


COMMANDS = (_add_world, _add_teacher, _add_convert, _add_stage, _add_export, _add_serve, _add_eval, _add_select,
            _add_demo)
"""The library's command builders, in ``bitdistill --help`` order."""


def add_commands(sub: Subcommands) -> None:
    """Add the library's commands to ``sub`` (from :func:`new_parser`)."""
    for add in COMMANDS:
        add(sub)


def build_parser() -> argparse.ArgumentParser:
    """The library's commands alone (``python -m bitnet.cli``). The ``bitdistill`` entry point, ``flows.cli``, builds
    its parser from :func:`new_parser` and :func:`add_commands` and adds ``plan`` and ``run``; nothing here calls
    into it."""
    parser, sub = new_parser()
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_parsed(build_parser().parse_args(argv))


def run_parsed(args: argparse.Namespace) -> int:
    """Run a parsed library command; known errors become one line on stderr and exit code 2."""
    try:
        return args.func(args)
    except Exception as e:
        if (status := error_status(e)) is None:
            raise
        return status


def error_status(e: Exception) -> int | None:
    """A user-facing error (bad input, a refused or unwritable output, ...) → one line on stderr and exit code 2;
    None for anything else (a bug: the caller re-raises it with its traceback)."""
    from bitnet.convert import UnsupportedArchitectureError
    from bitnet.data import DataError
    from bitnet.io import DiskFullError, LockBusyError
    from bitnet.student import CheckpointError
    from bitnet.trainer import NonFiniteLossError

    if isinstance(e, (CLIError, DataError, CheckpointError, UnsupportedArchitectureError, NonFiniteLossError,
                      FileNotFoundError, FileExistsError, ValueError, LockBusyError, DiskFullError)):
        return _one_line(str(e) or type(e).__name__)
    if isinstance(e, OSError):  # a read-only or full output location, a permission problem: no traceback
        return _one_line(os_error_message(e))
    return None


def os_error_message(e: OSError) -> str:
    """``[Errno 30] Read-only file system: 'x'`` → ``cannot write x: read-only file system``."""
    import errno

    what = e.filename or ""
    reason = (e.strerror or str(e)).lower()
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT):
        return f"cannot write {what}: {reason}" if what else f"cannot write the output: {reason}"
    return f"{what}: {reason}" if what else str(e)


def _one_line(message: str) -> int:
    print(f"bitdistill: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

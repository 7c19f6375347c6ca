"""The ``bitdistill`` entry point: the library's commands (``bitnet.cli``) plus ``plan`` and ``run``, the Prefect flow.

Calls go one way: this module builds the parser from ``bitnet.cli``'s builders (:func:`bitnet.cli.new_parser`,
:func:`bitnet.cli.add_commands`), adds its own commands and runs the parsed one itself; ``bitnet.cli`` never calls
back into it. ``bitdistill run`` uses Prefect's local ephemeral API unless ``PREFECT_API_URL`` points at a server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bitnet.cli import CLIError, add_commands, error_status, new_parser
from flows.config import PRESETS


def run_command(args: argparse.Namespace) -> int:
    # without PREFECT_API_URL Prefect starts a temporary local server, and gives up after 20 s: too short on a
    # busy 2-core machine (it takes ~12 s idle)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.bitdistill import bitdistill
    from flows.config import pipeline_config
    from flows.preflight import preflight
    from tasks.artifacts import ArtifactError, ArtifactStore
    from tasks.compute import ComputeError
    from tasks.tracking import TrackingError

    cfg = pipeline_config(None, args.preset, file=args.config, sets=args.set, root=args.root)
    if args.print_config:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    try:
        ArtifactStore.from_config(cfg.resolved().store).check()  # an unusable root: one line, before Prefect starts
        preflight(cfg)  # e.g. a student no llama.cpp graph takes: one line, before any stage (and Prefect)
        summary = bitdistill(config=cfg)
    except (ArtifactError, ComputeError, TrackingError) as e:
        raise CLIError(str(e)) from e
    width = max(len(r.stage) for r in summary.stages)
    for r in summary.stages:
        print(f"{r.stage.ljust(width)}  {r.status:<9}  {r.uri or r.note}")
    print(json.dumps({"flow_run": summary.flow_run, "student": summary.student, "gguf": summary.gguf,
                      "report": summary.report, "mlflow": summary.mlflow, "artifact_root": summary.root}, indent=2))
    return 0


def plan_command(args: argparse.Namespace) -> int:
    """Per-GPU memory of the preset's largest stage (KD: student + teacher) from the model config alone."""
    from bitnet.plan import MODEL_SHAPES, plan_for
    from flows.config import preset

    cfg = preset(args.preset)
    if args.preset not in MODEL_SHAPES:
        raise CLIError(f"no model shape for preset {args.preset!r}; plannable: {', '.join(MODEL_SHAPES)}")
    micro_batch = args.micro_batch or cfg.kd.data.batch_size
    plan = plan_for(args.preset, accelerators=args.accelerators, nodes=args.nodes, micro_batch=micro_batch,
                    seq_len=args.seq_len or cfg.world.seq_len)
    print(plan.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """``bitdistill``: the library's commands, then ``plan`` and ``run``."""
    parser, sub = new_parser()
    add_commands(sub)
    plan = sub.add_parser("plan", help="per-GPU memory plan of a preset: parallel mode and micro-batch that fit")
    plan.add_argument("--preset", required=True,
                      help="a preset with a real model: qwen2.5-0.5b, qwen3-4b, llama-3.1-8b")
    plan.add_argument("--accelerators", default="H100:8", help="GPU type and count per node (default: %(default)s)")
    plan.add_argument("--nodes", type=int, default=1, help="nodes (default: %(default)s)")
    plan.add_argument("--micro-batch", type=int, help="sequences per GPU (default: the preset's)")
    plan.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's)")
    plan.set_defaults(func=plan_command)
    run = sub.add_parser("run", help="run the Prefect flow `bitdistill` (all stages, cached and resumable)")
    run.add_argument("--preset", help=f"pipeline preset: {', '.join(PRESETS)} (default: the config's `preset`, "
                     "else tiny)")
    run.add_argument("--config", help="PipelineConfig (YAML/JSON) merged over the preset")
    run.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                     help="override one config value, e.g. --set kd.train.max_steps=10 (repeatable)")
    run.add_argument("--root", help="artifact root: a local path, s3:// or gs:// URL")
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    run.set_defaults(func=run_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse and run one command; a user-facing error is one line on stderr and exit code 2 (``error_status``)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if (status := error_status(e)) is None:
            raise
        return status


if __name__ == "__main__":
    sys.exit(main())

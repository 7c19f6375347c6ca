"""The ``bitdistill`` entry point: the library's commands (``bitnet.cli``) plus ``run``, the Prefect flow.

``bitdistill run`` uses Prefect's local ephemeral API unless ``PREFECT_API_URL`` points at a server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bitnet.cli import CLIError, run_parsed
from bitnet.cli import build_parser as library_parser
from flows.config import PRESETS


def run_command(args: argparse.Namespace) -> int:
    # without PREFECT_API_URL Prefect starts a temporary local server, and gives up after 20 s: too short on a
    # busy 2-core machine (it takes ~12 s idle)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.bitdistill import bitdistill
    from flows.config import pipeline_config
    from tasks.artifacts import ArtifactError
    from tasks.compute import ComputeError

    cfg = pipeline_config(None, args.preset, file=args.config, sets=args.set, root=args.root)
    if args.print_config:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    try:
        summary = bitdistill(config=cfg)
    except (ArtifactError, ComputeError) as e:
        raise CLIError(str(e)) from e
    width = max(len(r.stage) for r in summary.stages)
    for r in summary.stages:
        print(f"{r.stage.ljust(width)}  {r.status:<9}  {r.uri or r.note}")
    print(json.dumps({"flow_run": summary.flow_run, "student": summary.student, "gguf": summary.gguf,
                      "report": summary.report, "mlflow": summary.mlflow, "artifact_root": summary.root}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = library_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
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
    return run_parsed(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

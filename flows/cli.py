"""``bitdistill run``: run flow ``bitdistill`` on a preset plus an optional config file, print where outputs are.

Prefect's local ephemeral API is used unless ``PREFECT_API_URL`` points at a server.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from flows.config import PipelineConfig, deep_merge, preset


def build_config(preset_name: str, config_file: str | None, root: str | None = None) -> PipelineConfig:
    from bitnet.cli import CLIError, read_config_file, validate_config

    try:
        data: dict[str, Any] = preset(preset_name).model_dump(mode="json")
    except ValueError as e:
        raise CLIError(str(e)) from e
    if config_file:
        data = deep_merge(data, read_config_file(config_file))
    if root:
        data["store"]["root"] = root
    return validate_config(PipelineConfig, data)


def run_command(args: argparse.Namespace) -> int:
    from bitnet.cli import CLIError
    from flows.bitdistill import bitdistill

    cfg = build_config(args.preset, args.config, args.root)
    if args.print_config:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    from tasks.artifacts import ArtifactError
    from tasks.compute import ComputeError

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

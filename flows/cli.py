"""``bitdistill run``: run flow ``bitdistill`` on a preset plus an optional config file, print where outputs are.

Prefect's local ephemeral API is used unless ``PREFECT_API_URL`` points at a server.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from flows.config import PipelineConfig, deep_merge, preset


def build_config(preset_name: str, config_file: str | None, root: str | None = None) -> PipelineConfig:
    from bitnet.cli import CLIError

    try:
        data: dict[str, Any] = preset(preset_name).model_dump(mode="json")
    except ValueError as e:
        raise CLIError(str(e)) from e
    if config_file:
        file = Path(config_file)
        if not file.is_file():
            raise CLIError(f"config file {file} does not exist")
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise CLIError(f"config file {file} is not valid YAML/JSON: {str(e).splitlines()[0]}") from e
        if not isinstance(loaded, dict):
            raise CLIError(f"config file {file} must hold a mapping, got {type(loaded).__name__}")
        data = deep_merge(data, loaded)
    if root:
        data["store"]["root"] = root
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "<root>"
        raise CLIError(f"invalid PipelineConfig: {loc}: {first['msg']} ({e.error_count()} error(s))") from e


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

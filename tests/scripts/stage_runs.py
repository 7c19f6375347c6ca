"""Run ``bitdistill stage`` commands one after another in this process (used by tests/test_determinism.py).

Usage: python -m tests.scripts.stage_runs SPEC.json RESULTS.json --rng-seed N

SPEC maps a name to the arguments of one ``bitdistill stage ...`` command. Before each command the global RNGs
(torch, ``random``, numpy) are seeded with N, which no stage may depend on. RESULTS maps each name to the command's
exit code (1 for an unexpected exception, whose traceback goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

from bitnet.cli import main as bitdistill


def run(argv: list[str], rng_seed: int) -> int:
    torch.manual_seed(rng_seed)
    random.seed(rng_seed)
    np.random.seed(rng_seed)
    try:
        return bitdistill(argv)
    except Exception:  # noqa: BLE001 — reported per command, the others still run
        traceback.print_exc()
        return 1


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("spec", type=Path)
    p.add_argument("results", type=Path)
    p.add_argument("--rng-seed", type=int, required=True)
    args = p.parse_args()
    spec: dict[str, list[str]] = json.loads(args.spec.read_text())
    results = {name: run(argv, args.rng_seed) for name, argv in spec.items()}
    args.results.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

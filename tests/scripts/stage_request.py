"""One run of a stage through the flow's path on a cache miss (used by tests/test_safety.py): what
``tasks.stages.stage_task`` does, a store lookup, then ``tasks.compute.run_request`` on the local backend.

Usage: python -m tests.scripts.stage_request REQUEST.json [--after FILE]

REQUEST is a :class:`tasks.execute.StageRequest`. ``--after``: start only once FILE exists (e.g. the stage record that
another run writes when it holds the stage's lock and computes). Logs to stdout; the last line is the ref (JSON).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import bitnet.stages.registry  # noqa: F401 — before the race: the stages' imports take seconds
from tasks.artifacts import ArtifactStore
from tasks.compute import LocalCompute, run_request
from tasks.execute import StageRequest


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("request", type=Path)
    p.add_argument("--after", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
    log = logging.getLogger("stage_request")
    req = StageRequest.model_validate_json(args.request.read_text())
    while args.after is not None and not args.after.exists():
        time.sleep(0.02)
    store = ArtifactStore.from_config(req.store)
    ref = store.lookup(req.stage, req.key)
    if ref is None:
        ref = run_request(LocalCompute(), req, log)
    else:
        log.info("%s: %s holds a valid manifest; reusing it", req.stage, ref.uri)
    print(ref.model_dump_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

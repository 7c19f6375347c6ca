"""Save a PNG of a finished `bitdistill` flow run as the Prefect UI shows it, via headless Chromium.

Usage (against a server: PREFECT_API_URL=http://127.0.0.1:4200/api):

    python deployments/ui_screenshot.py [--flow-run ID] [--out docs/prefect-flow-run.png]

Without ``--flow-run`` it picks the latest *finished* run of flow ``bitdistill`` (the one that ended last in a
final state: Completed, Failed, Crashed or Cancelled; never a Scheduled or Running one). Needs Debian's
``chromium``. A server on a port other than 4200 must be started with
``PREFECT_UI_API_URL=http://127.0.0.1:PORT/api``: otherwise the UI it serves talks to port 4200 and shows "Can't
connect to Server API".
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

FINISHED = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


async def latest_run_id(flow: str = "bitdistill") -> str:
    """The id of the run of ``flow`` that finished last."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    finished = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
        any_=[StateType(t) for t in FINISHED])))
    async with get_client() as client:
        runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
                                           flow_run_filter=finished, sort=FlowRunSort.END_TIME_DESC, limit=1)
    if not runs:
        raise SystemExit(f"no finished run of flow {flow!r} on this server")
    return str(runs[0].id)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flow-run", help="flow run id (default: the latest finished bitdistill run)")
    ap.add_argument("--out", default="docs/prefect-flow-run.png")
    ap.add_argument("--size", default="1600,1000", help="window size W,H")
    ap.add_argument("--wait-ms", type=int, default=15000, help="virtual time for the UI to load")
    args = ap.parse_args()

    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        raise SystemExit("set PREFECT_API_URL to the server's API (e.g. http://127.0.0.1:4200/api)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    run_id = args.flow_run or asyncio.run(latest_run_id())
    url = f"{api.rstrip('/').removesuffix('/api')}/runs/flow-run/{run_id}"
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-dev-shm-usage",
           f"--window-size={args.size}", f"--virtual-time-budget={args.wait_ms}", f"--screenshot={out}", url]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    print(f"{url} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Set up the bitdistill deployments on a Prefect server, idempotently: the process work pool, the automations of
``deployments/automations.yaml`` (crashed-run detection), then ``prefect deploy --all``.

Usage, from the repository root, against a server (``PREFECT_API_URL``)::

    python deployments/setup_server.py [--pool bitdistill-process] [--no-deploy]

Run it again after editing ``prefect.yaml`` or ``automations.yaml``: an automation of the same name is replaced.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
POOL = "bitdistill-process"


def load_automations(path: Path = HERE / "automations.yaml") -> list[Any]:
    """The automations in ``path``, validated as Prefect ``AutomationCore`` objects."""
    from prefect.events.schemas.automations import AutomationCore

    data = yaml.safe_load(path.read_text())
    return [AutomationCore.model_validate(a) for a in data["automations"]]


async def ensure_automations(automations: list[Any]) -> list[str]:
    """Create each automation, replacing any of the same name; returns their ids."""
    from prefect.client.orchestration import get_client

    ids = []
    async with get_client() as client:
        for automation in automations:
            for old in await client.read_automations_by_name(automation.name):
                await client.delete_automation(old.id)
            ids.append(str(await client.create_automation(automation)))
    return ids


async def ensure_pool(name: str) -> bool:
    """Create process work pool ``name`` unless it exists; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            await client.read_work_pool(name)
            return False
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", default=POOL, help="process work pool of the deployments (the one prefect.yaml names)")
    ap.add_argument("--no-deploy", action="store_true", help="only the work pool and the automations")
    args = ap.parse_args(argv)

    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise SystemExit("set PREFECT_API_URL to the server's API (e.g. http://127.0.0.1:4200/api)")
    created = asyncio.run(ensure_pool(args.pool))
    print(f"work pool {args.pool}: {'created' if created else 'exists'}")
    automations = load_automations()
    for automation, automation_id in zip(automations, asyncio.run(ensure_automations(automations)), strict=True):
        print(f"automation {automation.name}: {automation_id}")
    if not args.no_deploy:
        prefect = Path(sys.executable).with_name("prefect")
        cmd = [str(prefect) if prefect.exists() else "prefect", "--no-prompt", "deploy", "--all",
               "--prefect-file", str(HERE / "prefect.yaml")]
        return subprocess.run(cmd, cwd=HERE.parent).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton reads this flag when it is first
# imported, and other modules (prefect, torch's inductor hooks) import it early: set it before any of them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The data directory (default artifact roots, output locks) of every test and the processes it starts: a temporary
# directory, never the user's ~/.local/share/bitdistill (set at import: session fixtures write before any test runs).
_HOME = tempfile.mkdtemp(prefix="bitdistill-test-home-")
os.environ["BITDISTILL_HOME"] = _HOME


@pytest.fixture(scope="session", autouse=True)
def _data_home():
    yield _HOME
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


from pathlib import Path

from bitnet.data import PYTHON_DOCS_DIR, python_docs_available


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory):
    """A world built from 40 files of the Python docs corpus (vocab 512, 64-token blocks)."""
    from bitnet.data import TextSource
    from bitnet.world import WorldConfig, build_world

    if not python_docs_available():
        pytest.fail("the corpus package python3.11-doc is missing: run `make test` (it installs it)")
    src = tmp_path_factory.mktemp("corpus")
    files = sorted(Path(PYTHON_DOCS_DIR).glob("library/*.rst.txt"))[:40]
    for f in files:
        shutil.copy(f, src / f.name)
    cfg = WorldConfig(
        source=TextSource(kind="dir", path=str(src), glob="*.rst.txt"),
        split_fractions=(0.8, 0.1, 0.1),
        vocab_size=512,
        seq_len=64,
    )
    return build_world(cfg, tmp_path_factory.mktemp("world") / "w")

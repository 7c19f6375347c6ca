"""Every stage is deterministic given its config and inputs, seeds included (issue 22, item 6).

Every stage of :data:`bitnet.stages.STAGES` (LRC with both inits, eval with and without lm-eval tasks) runs twice as
``bitdistill stage NAME``, with identical configs and inputs, in two processes that differ in everything a stage must
not depend on: their global RNG states (torch, ``random``, numpy), their string-hash seeds (``PYTHONHASHSEED``: set
and dict-of-set iteration orders) and where the inputs live (the second run reads copies at other paths, as another
root or a remote root's local cache would). Both outputs are committed to an artifact store; every file of the
manifest must have the same sha256, except the run records that :data:`bitnet.io.CONTENT_EXCLUDE` keeps out of the
content identity (``metrics.json``, ``stage.json``, ``train/*``), whose only differences may be the fields named in
:data:`RUN_SPECIFIC`. So a recomputed stage writes the same bytes under the same key, and everything downstream of it
stays cached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from bitnet.io import content_files
from bitnet.stages import STAGES
from bitnet.stages.registry import run_stage
from tasks.artifacts import ArtifactRef, ArtifactStore, Manifest

PROJECT = Path(__file__).resolve().parents[1]
RUN_SPECIFIC = frozenset({
    "wall_s", "tokens_per_s", "peak_rss_gb", "peak_cuda_gb",  # training stages
    "seconds", "seconds_targets", "seconds_candidates", "examples_per_s",  # select
    "harness_seconds",  # eval with lm-eval tasks
})
"""Fields of the run records (never of content files) that measure the run rather than its result."""

TRAIN = {"max_steps": 2, "lr": 2e-3, "warmup_steps": 1, "log_every": 1, "ckpt_every": 1}
DATA = {"batch_size": 2, "eval_batch_size": 4, "eval_max_batches": 1}
TEACHER = {"model": {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "max_position_embeddings": 128}, "train": TRAIN, "data": DATA}
HARNESS = {"tasks": ["bitdistill_cloze"], "limit": 4, "max_docs": 4, "n_cloze": 4,
           "lm_eval_perplexity": False}


@dataclass(frozen=True)
class Case:
    id: str
    stage: str
    config: dict[str, Any]
    inputs: tuple[tuple[str, str], ...] = ()  # (the stage's input, which upstream directory)


STUDENT = (("student", "student"), ("teacher", "teacher"), ("world", "world"))
EVAL = (("teacher", "teacher"), ("world", "world"), ("student", "lrc"), ("naive", "student"))
CASES = [
    Case("world", "world", {}),  # its config (the corpus) is the small world's
    Case("teacher", "teacher", TEACHER, (("world", "world"),)),
    Case("convert", "convert", {}, (("teacher", "teacher"),)),
    Case("layerwise", "layerwise", {"train": TRAIN, "data": DATA}, STUDENT),
    Case("cpt", "cpt", {"lambda_warmup_steps": 1, "train": TRAIN, "data": DATA}, STUDENT),
    Case("kd", "kd", {"split_heads": 4, "train": TRAIN, "data": DATA}, STUDENT),
    Case("lrc-closed_form", "lrc", {"rank": 4, "init": "closed_form", "calib_batches": 1, "train": TRAIN,
                                    "data": DATA}, STUDENT),
    Case("lrc-zero", "lrc", {"rank": 4, "init": "zero", "train": TRAIN, "data": DATA}, STUDENT),
    Case("select", "select", {"influence": {"proj_dim": 16, "keep_fraction": 0.25, "batch_size": 4},
                              "max_candidates": 16, "max_targets": 4}, (("model", "student"), ("world", "world"))),
    Case("export", "export", {}, (("student", "lrc"),)),  # a student with LRC: the GGUF and the LoRA GGUF
    Case("eval", "eval", {"batch_size": 4, "max_batches": 1}, EVAL),
    Case("eval-harness", "eval", {"batch_size": 4, "max_batches": 1, "harness": HARNESS}, EVAL),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls on a shared 2-core box: one intra-op thread is faster (see tests/test_lrc.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def upstream(small_world, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The inputs of every stage, built once by the stages themselves: a 2-step tiny teacher, its converted student
    and a 1-step LRC student (so that export writes a LoRA adapter too)."""
    root = tmp_path_factory.mktemp("determinism-inputs")
    run_stage("teacher", STAGES["teacher"].config.model_validate(TEACHER), {"world": small_world.root},
              root / "teacher")
    run_stage("convert", STAGES["convert"].config(), {"teacher": root / "teacher"}, root / "student")
    student = {"student": root / "student", "teacher": root / "teacher", "world": small_world.root}
    lrc = {"rank": 4, "init": "zero", "train": {**TRAIN, "max_steps": 1}, "data": DATA}
    run_stage("lrc", STAGES["lrc"].config.model_validate(lrc), student, root / "lrc")
    return {**student, "lrc": root / "lrc"}


def _argv(case: Case, inputs: dict[str, Path], out: Path, config: dict[str, Any]) -> list[str]:
    config_file = out.parent / f"{case.id}.json"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(config))
    flags = [x for name, source in case.inputs for x in (f"--{name}", str(inputs[source]))]
    return ["stage", case.stage, *flags, "--out", str(out), "--config", str(config_file), "--no-progress"]


def _copies(upstream: dict[str, Path], where: Path) -> dict[str, Path]:
    """The same inputs at other paths: where an input lives is not part of what a stage computes."""
    return {name: Path(shutil.copytree(path, where / name)) for name, path in upstream.items()}


@pytest.fixture(scope="module")
def runs(upstream, small_world, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Every case run in two processes at once (RNG seed and PYTHONHASHSEED 1 and 2; the second on copies of the
    inputs): case id → the two output directories, each ``{store root}/{stage}/{case id}``."""
    root = tmp_path_factory.mktemp("determinism-runs")
    sides = {"a": upstream, "b": _copies(upstream, root / "inputs-b")}
    procs = {}
    for seed, (side, inputs) in enumerate(sides.items(), start=1):
        spec = {c.id: _argv(c, inputs, root / side / c.stage / c.id,
                            small_world.info["config"] if c.stage == "world" else c.config) for c in CASES}
        (root / f"{side}.json").write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONHASHSEED": str(seed), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "tests.scripts.stage_runs", str(root / f"{side}.json"),
               str(root / f"{side}-results.json"), "--rng-seed", str(seed)]
        procs[side] = subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    for side, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
        failed = {k: rc for k, rc in json.loads((root / f"{side}-results.json").read_text()).items() if rc}
        assert not failed, f"run {side}: {failed}\n{out[-4000:]}"
    return {c.id: (root / "a" / c.stage / c.id, root / "b" / c.stage / c.id) for c in CASES}


# --------------------------------------------------------------------------------------------- comparison
def commit(out: Path) -> tuple[ArtifactRef, Manifest]:
    """Commit ``out`` (``{root}/{stage}/{key}``) as the flow would: its ref and manifest."""
    store = ArtifactStore(str(out.parents[1]))
    ref = store.commit(out.parent.name, out.name, out)
    return ref, store.read_manifest(ref)


def _without_run_specific(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_run_specific(v) for k, v in obj.items() if k not in RUN_SPECIFIC}
    if isinstance(obj, list):
        return [_without_run_specific(v) for v in obj]
    return obj


def _record(path: Path) -> Any:
    lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
    return [_without_run_specific(json.loads(line)) for line in lines]


def differences(a: Path, b: Path) -> list[str]:
    """What differs between two committed outputs of the same stage: files missing on one side, content files whose
    sha256 differs, run records that differ in more than :data:`RUN_SPECIFIC`, and the content identity."""
    (ref_a, man_a), (ref_b, man_b) = commit(a), commit(b)
    found = sorted(f"only in one run: {rel}" for rel in set(man_a.files) ^ set(man_b.files))
    content = set(content_files(a))
    for rel in sorted(set(man_a.files) & set(man_b.files)):
        if rel in content and man_a.files[rel] != man_b.files[rel]:
            found.append(rel)
        elif rel not in content and _record(a / rel) != _record(b / rel):
            found.append(f"run record {rel}")
    if ref_a.content != ref_b.content:
        found.append("content identity")
    return found


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_two_identical_runs_write_byte_identical_artifacts(case: Case, runs) -> None:
    a, b = runs[case.id]
    assert differences(a, b) == []


def test_every_stage_is_covered() -> None:
    assert {c.stage for c in CASES} == set(STAGES)


def test_the_comparison_sees_a_stage_that_reads_the_callers_rng(upstream, tmp_path: Path, monkeypatch) -> None:
    """The operator's finding (two `stage lrc` runs, 28 tensors differ): zero-init adapters drawn from the caller's
    RNG instead of the stage's seed are reported, in the student's weights and its content identity."""
    import bitnet.stages.lrc as lrc

    seeded = lrc.add_lrc
    monkeypatch.setattr(lrc, "add_lrc", lambda model, rank, seed=0: seeded(model, rank, int(torch.randint(99, ()))))
    cfg = lrc.LRCConfig.model_validate({"rank": 4, "init": "zero", "train": {**TRAIN, "max_steps": 1}, "data": DATA})
    inputs = {k: upstream[v] for k, v in STUDENT}
    for side, rng in (("a", 1), ("b", 2)):
        torch.manual_seed(rng)
        run_stage("lrc", cfg, inputs, tmp_path / side / "lrc" / "k")
    found = differences(tmp_path / "a" / "lrc" / "k", tmp_path / "b" / "lrc" / "k")
    assert {"model/model.safetensors", "content identity"} <= set(found), found


def test_safetensors_metadata_is_written_in_one_order(tmp_path: Path) -> None:
    """safetensors serialises its metadata from a Rust HashMap, in an order seeded per call; sorted afterwards, the
    same tensors and metadata are the same bytes, and the file reads back as it was written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from bitnet.io import sort_safetensors_metadata

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.int8)}
    meta = {f"key{i}": f"value{i}" for i in range(8)}
    files = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for f in files:
        save_file(tensors, str(f), metadata=meta)
        sort_safetensors_metadata(f)
    assert len({f.read_bytes() for f in files}) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == meta and all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())

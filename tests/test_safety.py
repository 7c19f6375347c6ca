"""Nothing lost, nothing stale, nothing retrained twice (issue 14): content-addressed keys, outputs that a failure or
a wrong path cannot destroy, checked inputs, one-line errors, locks, secrets and stale temporaries."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from bitnet.io import LockBusyError, content_digest, file_lock, sha256_file
from bitnet.stages.convert import ConvertConfig
from bitnet.stages.registry import run_stage
from bitnet.stages.teacher import TeacherConfig
from bitnet.teacher import TinyTeacherConfig
from flows.cli import main

RO = Path("/sys/bitdistill-read-only")  # sysfs: writes fail (EACCES/EPERM/EROFS) even for root


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def play(small_world, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny teacher (2 steps) and its converted student on the small world."""
    root = tmp_path_factory.mktemp("safety")
    cfg = TeacherConfig.model_validate({
        "model": TinyTeacherConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128).model_dump(),
        "train": {"max_steps": 2, "warmup_steps": 1, "ckpt_every": 1, "progress": False},
        "data": {"batch_size": 4, "eval_max_batches": 1},
    })
    run_stage("teacher", cfg, {"world": small_world.root}, root / "teacher")
    run_stage("convert", ConvertConfig(), {"teacher": root / "teacher" / "model"}, root / "student")
    return {"root": root, "world": small_world.root, "teacher": root / "teacher" / "model",
            "student": root / "student"}


def snapshot(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


def one_line_error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err, err
    assert err[-1].startswith("bitdistill: error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


def kd(play: dict[str, Path], out: Path, **over: str) -> list[str]:
    args = {"student": str(play["student"]), "teacher": str(play["teacher"]), "world": str(play["world"]), **over}
    return ["stage", "kd", *[x for k, v in args.items() for x in (f"--{k}", v)], "--out", str(out), "--steps", "1",
            "--set", "train.warmup_steps=0", "--no-progress"]


# ---------------------------------------------------------------------------------- 1. content identity
def _raw_safetensors(path: Path, tensors: dict[str, torch.Tensor], order: list[str], meta: dict[str, str]) -> None:
    """A safetensors file whose header lists the tensors in ``order`` (what different writers do)."""
    header: dict[str, object] = {"__metadata__": meta}
    blobs, offset = [], 0
    for name in order:
        b = tensors[name].contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_content_identity_is_tensor_values_not_bytes(tmp_path: Path) -> None:
    from tasks.artifacts import ArtifactStore

    t = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.weight": torch.ones(4)}
    a, b = tmp_path / "a", tmp_path / "b"
    for d, order, meta, wall in ((a, ["a.weight", "b.weight"], {"format": "pt"}, 1.0),
                                 (b, ["b.weight", "a.weight"], {"writer": "x"}, 2.0)):
        (d / "model").mkdir(parents=True)
        _raw_safetensors(d / "model" / "model.safetensors", t, order, meta)
        (d / "model" / "config.json").write_text(json.dumps({"x": 1, "y": 2}, sort_keys=d == a))
        (d / "metrics.json").write_text(json.dumps({"wall_s": wall}))
        (d / "train").mkdir()
        (d / "train" / "metrics.jsonl").write_text(f'{{"t": {wall}}}\n')
    assert sha256_file(a / "model" / "model.safetensors") != sha256_file(b / "model" / "model.safetensors")
    assert content_digest(a) == content_digest(b)
    store = ArtifactStore(str(tmp_path / "root"))
    ra = store.commit("cpt", "k1", a, metrics={"wall_s": 1.0})
    rb = store.commit("cpt", "k2", b, metrics={"wall_s": 2.0})
    assert ra.sha256 != rb.sha256 and ra.content == rb.content == content_digest(a) and ra.identity == rb.identity
    assert store.lookup("cpt", "k1").identity == ra.identity  # noqa: PLR2004 — refs from the store carry it too
    t["a.weight"][0, 0] = 0.5  # one value changes: another content
    _raw_safetensors(b / "model" / "model.safetensors", t, ["a.weight", "b.weight"], {})
    assert content_digest(b) != content_digest(a)


# ------------------------------------------------------------------------------------ 2. safe outputs
def test_failed_world_build_keeps_the_existing_world(tmp_path: Path, small_world, capsys) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in sorted(Path(small_world.info["config"]["source"]["path"]).glob("*.rst.txt"))[:12]:
        shutil.copy(f, corpus / f.name)
    out = tmp_path / "world"
    base = ["world", "build", "--out", str(out), "--source-dir", str(corpus), "--glob", "*.rst.txt",
            "--vocab-size", "300"]
    assert main([*base, "--seq-len", "64"]) == 0
    before = snapshot(out)
    capsys.readouterr()
    # a block length longer than the validation split: the build fails after tokenizing (before: world.json,
    # tokenizer/ and data/train were gone)
    err = one_line_error(capsys, main([*base, "--seq-len", "60000"]))
    assert "bitdistill: error:" in err and snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_eval_out_never_overwrites_a_non_results_file(play, tmp_path: Path, capsys) -> None:
    victim = tmp_path / "model.safetensors"
    shutil.copy(play["teacher"] / "model.safetensors", victim)
    digest = sha256_file(victim)
    rc = main(["eval", "--model", str(play["teacher"]), "--world", str(play["world"]), "--tasks", "",
               "--max-blocks", "1", "--out", str(victim)])
    assert "is not an eval results JSON" in one_line_error(capsys, rc) and sha256_file(victim) == digest
    rc = main(["eval", "--model", str(play["teacher"]), "--world", str(play["world"]), "--tasks", "",
               "--max-blocks", "1", "--out", str(tmp_path)])
    assert "is a directory" in one_line_error(capsys, rc)


def test_stage_out_of_another_run_is_refused_and_a_finished_one_reused(play, tmp_path: Path, capsys) -> None:
    out = tmp_path / "kd"
    assert main(kd(play, out)) == 0
    first = snapshot(out)
    assert json.loads((out / "stage.json").read_text())["finished"] is True
    capsys.readouterr()
    assert main(kd(play, out)) == 0  # same config and inputs: the finished output is reused, not retrained
    assert snapshot(out) == first
    capsys.readouterr()
    # another config into the same --out (before: resumed the old run's checkpoints, rc 0)
    err = one_line_error(capsys, main([*kd(play, out), "--set", "temperature=2.0"]))
    assert "refusing to resume stage kd" in err and "config" in err and snapshot(out) == first
    # another student
    other = tmp_path / "other-student"
    run_stage("convert", ConvertConfig.model_validate({"bitnet": {"subln": "none"}}), {"teacher": play["teacher"]},
              other)
    err = one_line_error(capsys, main(kd(play, out, student=str(other))))
    assert "input.student" in err and snapshot(out) == first
    # the output of another stage, a user's directory, a plain file
    for target, why in ((play["student"], "holds the output of stage 'convert'"),
                        (play["teacher"], "is not a stage output"),
                        (play["teacher"] / "config.json", "it is a file")):
        before = snapshot(target) if target.is_dir() else sha256_file(target)
        err = one_line_error(capsys, main(kd(play, target)))
        assert why in err, err
        assert (snapshot(target) if target.is_dir() else sha256_file(target)) == before


def test_failing_stage_leaves_its_previous_output(play, tmp_path: Path, monkeypatch) -> None:
    import dataclasses

    from bitnet.stages import STAGES
    from bitnet.stages.outputs import forget_output

    out = tmp_path / "student"
    run_stage("convert", ConvertConfig(), {"teacher": play["teacher"]}, out)
    before = snapshot(out)
    real = STAGES["convert"]

    def broken(cfg, inputs, o):
        (o / "model").mkdir()
        (o / "model" / "half-written").write_text("x")
        raise RuntimeError("simulated failure mid-write")

    monkeypatch.setitem(STAGES, "convert", dataclasses.replace(real, run=broken))
    forget_output(out)  # make the next run recompute
    before = snapshot(out)
    with pytest.raises(RuntimeError, match="simulated"):
        run_stage("convert", ConvertConfig(), {"teacher": play["teacher"]}, out)
    assert snapshot(out) == before and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_stale_temporaries_are_swept_on_start(play, tmp_path: Path) -> None:
    out = tmp_path / "student"
    run_stage("convert", ConvertConfig(), {"teacher": play["teacher"]}, out)
    stale = [out / ".model.tmp-abc123", tmp_path / ".student.tmp-def456", out / "model" / ".keep.tmp-x"]
    for d in stale:
        d.mkdir()
        (d / "junk").write_text("x")
    run_stage("convert", ConvertConfig(), {"teacher": play["teacher"]}, out)
    assert not stale[0].exists() and not stale[1].exists()
    assert stale[2].exists()  # only the output's own level and its siblings: the trainer sweeps train/


# ------------------------------------------------------------------------------------------ 5. data checks
def test_world_of_another_tokenizer_with_equal_vocab_is_refused(play, small_world, tmp_path: Path, capsys) -> None:
    from bitnet.data import TextSource
    from bitnet.world import WorldConfig, build_world

    assert small_world.info["tokenizer_digest"]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in sorted(Path(small_world.info["config"]["source"]["path"]).glob("*.rst.txt"))[-12:]:
        shutil.copy(f, corpus / f.name)
    other = build_world(WorldConfig(source=TextSource(kind="dir", path=str(corpus), glob="*.rst.txt"),
                                    split_fractions=(0.8, 0.1, 0.1), vocab_size=512, seq_len=64), tmp_path / "w2")
    assert other.info["vocab_size"] == small_world.info["vocab_size"]
    assert other.info["tokenizer_digest"] != small_world.info["tokenizer_digest"]
    err = one_line_error(capsys, main(kd(play, tmp_path / "kd", world=str(other.root))))
    assert "tokenized with another tokenizer" in err
    assert not (tmp_path / "kd" / "train").exists()  # refused before any training


def test_binary_files_are_skipped_and_counted(tmp_path: Path) -> None:
    from bitnet.data import DataError, TextSource, iter_documents

    d = tmp_path / "c"
    d.mkdir()
    (d / "a.txt").write_text("plain prose " * 10)
    (d / "b.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + os.urandom(2000))
    (d / "c.txt").write_bytes(os.urandom(3000).replace(b"\0", b"\1"))  # no NUL, but mostly not UTF-8
    skipped: list[str] = []
    docs = list(iter_documents(TextSource(kind="dir", path=str(d)), skipped=skipped))
    assert [x.id for x in docs] == ["a.txt"] and skipped == ["b.txt", "c.txt"]
    (d / "a.txt").unlink()
    with pytest.raises(DataError, match="2 binary or undecodable file"):
        list(iter_documents(TextSource(kind="dir", path=str(d))))


def test_tokenizer_training_on_5mb_without_whitespace_is_bounded(tmp_path: Path) -> None:
    """Before: one 5 MB pre-token made the BPE trainer run for more than 400 s; the cut pieces take ~20 s here."""
    script = tmp_path / "train.py"
    script.write_text(
        "import random, sys\n"
        "from bitnet.data.tokenizer import train_bpe_tokenizer\n"
        "random.seed(0)\n"
        "text = ''.join(random.choice('abcdefghijklmnopqrstuvwxyz{}:,') for _ in range(5_000_000))\n"
        f"tok = train_bpe_tokenizer([text, 'hello world ' * 50], 300, {str(tmp_path / 'tok')!r})\n"
        "assert tok.decode(tok('hello world')['input_ids']) == 'hello world'\n")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(script)], check=True, timeout=150,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    print(f"BPE training on 5 MB without whitespace: {time.perf_counter() - t0:.1f} s")


# ------------------------------------------------------------------------------------- 6. one-line errors
def test_gpt2_truncated_and_pickle_teachers_are_one_line_errors(play, tmp_path: Path, capsys) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=512, n_positions=128)).save_pretrained(gpt2)
    err = one_line_error(capsys, main(kd(play, tmp_path / "o1", teacher=str(gpt2))))
    assert "'gpt2' model" in err and "llama" in err

    trunc = tmp_path / "trunc"
    shutil.copytree(play["teacher"], trunc)
    w = trunc / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert "truncated safetensors" in one_line_error(capsys, main(kd(play, tmp_path / "o2", teacher=str(trunc))))

    class Boom:  # unpickling this would run a command
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'unpickled'}",))

    pkl = tmp_path / "pickle"
    pkl.mkdir()
    shutil.copy(play["teacher"] / "config.json", pkl)
    (pkl / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Boom()}))
    err = one_line_error(capsys, main(kd(play, tmp_path / "o3", teacher=str(pkl))))
    assert "only pickle weights" in err and not (tmp_path / "unpickled").exists()


def test_read_only_out_is_a_one_line_error_for_every_command(play, tmp_path: Path, capsys) -> None:
    w, t, s = str(play["world"]), str(play["teacher"]), str(play["student"])
    commands = [
        ["world", "build", "--out", f"{RO}/world"],
        ["teacher", "train", "--world", w, "--out", f"{RO}/teacher", "--steps", "20"],
        ["convert", "--teacher", t, "--out", f"{RO}/student"],
        kd(play, RO / "kd"),
        ["select", "--model", t, "--world", w, "--out", f"{RO}/sel"],
        ["export", "--student", f"{s}/model", "--out", f"{RO}/x.gguf"],
        ["eval", "--model", t, "--world", w, "--tasks", "", "--max-blocks", "1", "--out", f"{RO}/r.json"],
        ["demo", "--workdir", str(RO)],
    ]
    for argv in commands:
        err = one_line_error(capsys, main(argv))
        assert str(RO) in err or "cannot write" in err, (argv, err)


def test_export_out_dir_and_non_gguf_are_one_line_errors(play, tmp_path: Path, capsys) -> None:
    d = tmp_path / "d.gguf"
    d.mkdir()
    for out, why in ((tmp_path, "must name a .gguf file"), (d, "the directory")):
        err = one_line_error(capsys, main(["export", "--student", str(play["student"] / "model"), "--out", str(out)]))
        assert why in err, err
    victim = tmp_path / "notes.gguf"
    victim.write_text("my notes")
    err = one_line_error(capsys, main(["export", "--student", str(play["student"] / "model"), "--out", str(victim)]))
    assert "is not a GGUF file" in err and victim.read_text() == "my notes"


def test_unknown_config_key_is_named_unknown(play, tmp_path: Path, capsys) -> None:
    err = one_line_error(capsys, main([*kd(play, tmp_path / "k"), "--set", "train.max_stepz=3"]))
    assert "max_stepz" in err and "unknown" in err and "Field required" not in err


# ---------------------------------------------------------------------------- 7. locks, secrets, sweeping
def test_output_lock_is_exclusive_and_named(tmp_path: Path) -> None:
    with file_lock(tmp_path / ".x.lock", what="runs/kd/abc"):
        with pytest.raises(LockBusyError, match=r"runs/kd/abc is being written by another process \(pid"):
            with file_lock(tmp_path / ".x.lock", what="runs/kd/abc"):
                pass
    with file_lock(tmp_path / ".x.lock", what="runs/kd/abc"):  # released
        pass


def test_concurrent_run_of_the_same_stage_key_waits_then_reuses(tmp_path: Path, monkeypatch) -> None:
    """Two runs on one root: the second waits for the first's lock and reuses its result (before: it recomputed
    into the same directory and one died with 'manifest.json changed (sha256 mismatch)')."""
    import bitnet.stages.registry as registry
    from tasks.artifacts import ArtifactStore, StoreConfig
    from tasks.execute import StageRequest, execute

    store_cfg = StoreConfig(root=str(tmp_path / "root"))
    store = ArtifactStore.from_config(store_cfg)
    req = StageRequest(stage="eval", key="k" * 20, store=store_cfg)
    monkeypatch.setattr(registry, "run_stage", lambda *a, **k: pytest.fail("the second run must not compute"))
    held = threading.Event()

    def first() -> None:
        with store.lock("eval", req.key):
            held.set()
            time.sleep(1.5)
            work = store.work_dir("eval", req.key)
            (work / "metrics.json").write_text("{}")
            store.commit("eval", req.key, work)

    th = threading.Thread(target=first)
    th.start()
    held.wait(10)
    t0 = time.perf_counter()
    ref = execute(req)
    th.join()
    assert ref is not None and ref.key == req.key and time.perf_counter() - t0 > 1.0


def _in_store(store, stage: str, src: Path):
    """``src`` copied into ``store`` as a finished ``{stage}/up`` artifact."""
    work = store.work_dir(stage, "up")
    shutil.copytree(src, work, dirs_exist_ok=True)
    return store.commit(stage, "up", work)


def test_two_processes_on_one_root_compute_once_and_share_the_manifest(play, tmp_path: Path) -> None:
    """Two runs of the flow's stage path (store lookup, then ``run_request`` on the local backend) in two processes
    on one root; the second starts while the first holds the lock and computes. It waits, then reuses the first's
    artifact: one computation, one manifest, never rewritten (before: the flow's task passed check_existing=False,
    so the waiting run recomputed, removing the manifest the first run had handed to its next stage, which failed
    with 'no manifest.json (unfinished or deleted)')."""
    from bitnet.stages.cpt import CPTConfig
    from tasks.artifacts import ArtifactRef, ArtifactStore, StoreConfig
    from tasks.execute import StageRequest

    store_cfg = StoreConfig(root=str(tmp_path / "root"))
    store = ArtifactStore.from_config(store_cfg)
    upstream = {"student": _in_store(store, "convert", play["student"]),
                "teacher": _in_store(store, "teacher", play["teacher"].parent),
                "world": _in_store(store, "world", play["world"])}
    cfg = CPTConfig.model_validate({"train": {"max_steps": 12, "warmup_steps": 1, "progress": False},
                                    "data": {"batch_size": 4, "eval_max_batches": 1}})
    procs = {}
    for run, after in (("first", None), ("second", store.work_dir("cpt", "k" * 20) / "stage.json")):
        req = StageRequest(stage="cpt", key="k" * 20, config=cfg.model_dump(mode="json"), upstream=upstream,
                           store=store_cfg, producer={"run": run})
        (tmp_path / f"{run}.json").write_text(req.model_dump_json())
        cmd = [sys.executable, "-m", "tests.scripts.stage_request", str(tmp_path / f"{run}.json")]
        procs[run] = subprocess.Popen([*cmd, *(["--after", str(after)] if after else [])],
                                      cwd=Path(__file__).resolve().parents[1], text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = {run: p.communicate(timeout=300)[0] for run, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), out
    refs = {run: ArtifactRef.model_validate_json(text.strip().splitlines()[-1]) for run, text in out.items()}
    assert refs["first"] == refs["second"]
    assert "computing into" in out["first"] and "computing into" not in out["second"], out["second"]
    assert "waiting" in out["second"] and "finished by another run; reusing it" in out["second"], out["second"]
    manifest = store.verify(refs["first"])  # the manifest the first run handed on: still there, never rewritten
    assert manifest.producer["run"] == "first"


def test_secret_looking_storage_options_are_refused() -> None:
    from pydantic import ValidationError

    from tasks.artifacts import StoreConfig

    StoreConfig(root="s3://b/r", storage_options={"endpoint_url": "http://127.0.0.1:9000", "anon": False})
    StoreConfig(root="gs://b/r", storage_options={"token": "google_default", "project": "p"})
    for opts in ({"key": "AKIA", "secret": "s"}, {"client_kwargs": {"aws_secret_access_key": "s"}},
                 {"token": "t"}, {"password": "p"}):
        with pytest.raises(ValidationError, match="must not hold credentials"):
            StoreConfig(root="s3://b/r", storage_options=opts)

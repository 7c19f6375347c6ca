"""Operating it unattended (issue 22, items 1-3): artifacts go to a data directory outside the code; a refused or
failed command leaves every existing path as it was (a symbolic link ``--out`` is written through, never replaced; no
lock file next to an output; temporaries of killed writers swept by the next writer); a full disk is one line naming
the output, the space it needs and the space free, with the previous output intact."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet.io import data_home, host_tag, output_lock, sha256_file
from bitnet.stages.convert import ConvertConfig
from bitnet.stages.registry import run_stage
from flows.cli import main

PROJECT = Path(__file__).resolve().parents[1]


def one_line_error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err, err
    assert err[-1].startswith("bitdistill: error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


def snapshot(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


def hidden(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: the PID runs no more
    return proc.pid


@pytest.fixture(scope="module")
def kit(small_world, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untrained tiny teacher (an HF checkpoint with the world's tokenizer) and its converted student."""
    from bitnet.teacher import TinyTeacherConfig, build_tiny_teacher

    root = tmp_path_factory.mktemp("unattended")
    tok = small_world.tokenizer()
    cfg = TinyTeacherConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=128)
    teacher = build_tiny_teacher(cfg, len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    run_stage("convert", ConvertConfig(), {"teacher": root / "teacher"}, root / "student")
    return {"world": small_world.root, "teacher": root / "teacher", "student": root / "student"}


# ------------------------------------------------------------------------------- 1. artifacts outside the code
def test_default_artifact_root_is_absolute_under_the_data_home_not_the_checkout(tmp_path: Path, monkeypatch) -> None:
    from flows.config import PRESETS, pipeline_config
    from tasks.artifacts import ArtifactStore

    home = tmp_path / "home"
    monkeypatch.setenv("BITDISTILL_HOME", str(home))
    monkeypatch.chdir(PROJECT)  # run from the checkout, as a deployment's worker does
    for name in PRESETS:
        cfg = pipeline_config(None, name)
        if cfg.store.root is not None:  # the GPU presets name a bucket
            assert cfg.store.root.startswith("gs://"), (name, cfg.store.root)
            continue
        assert cfg.model_dump(mode="json")["store"]["root"] is None  # what the flow run stores: no machine's path
        root = Path(ArtifactStore.from_config(cfg.resolved().store).root_path)
        assert root.is_absolute() and root == home / "runs" / name / "artifacts", root
        assert not root.is_relative_to(PROJECT) and not root.is_relative_to(Path.cwd())
    # an explicit root still wins: a relative one against the working directory, URLs as given
    assert pipeline_config(None, "tiny", root="rel/a").resolved().store.root == f"file://{PROJECT}/rel/a"
    assert pipeline_config(None, "tiny", root="s3://b/r").resolved().store.root == "s3://b/r"
    # without BITDISTILL_HOME: XDG_DATA_HOME/bitdistill, else ~/.local/share/bitdistill
    monkeypatch.delenv("BITDISTILL_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_home() == tmp_path / "xdg" / "bitdistill"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert data_home() == tmp_path / "user" / ".local" / "share" / "bitdistill"
    assert pipeline_config(None, "smoke").resolved().store.root == \
        f"file://{tmp_path}/user/.local/share/bitdistill/runs/smoke/artifacts"


def test_the_store_key_and_stage_identity_do_not_hold_the_root(kit, tmp_path: Path, monkeypatch) -> None:
    """The key of a stage output and its ``stage.json`` identity are the same whatever the data directory."""
    from bitnet.stages.outputs import run_identity
    from flows.config import pipeline_config
    from tasks.artifacts import stage_key
    from tasks.stages import stage_code, stage_material

    keys, identities = set(), set()
    for home in ("a", "b"):
        monkeypatch.setenv("BITDISTILL_HOME", str(tmp_path / home))
        cfg = pipeline_config(None, "tiny").resolved()
        assert str(tmp_path / home) in cfg.store.root
        material = stage_material("convert", cfg.convert.stage_config(), {}, stage_code("convert"))
        assert str(tmp_path) not in str(material)
        keys.add(stage_key("convert", material))
        out = tmp_path / home / "student"
        run_stage("convert", cfg.convert.stage_config(), {"teacher": kit["teacher"]}, out)
        identities.add(str(run_identity(out)))
    assert len(keys) == 1 and len(identities) == 1


# ---------------------------------------------------------------------------- 2. nothing lost, nothing left
def test_symlinked_stage_out_is_written_through_and_stays_a_link(kit, tmp_path: Path, capsys) -> None:
    target = tmp_path / "elsewhere" / "student"
    target.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(target)
    argv = ["stage", "convert", "--teacher", str(kit["teacher"]), "--out", str(link)]
    assert main(argv) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)  # before: renamed away, a real directory instead
    assert (target / "stage.json").is_file() and (target / "model" / "model.safetensors").is_file()
    assert hidden(tmp_path) == [] and hidden(target.parent) == []  # no lock, no temporary, no .link.old-PID
    before = snapshot(target)
    assert main(argv) == 0 and snapshot(target) == before  # a finished output of the same run: reused
    # a refused run (another config) leaves the link, its target and the directory as they were
    capsys.readouterr()
    err = one_line_error(capsys, main([*argv, "--set", "bitnet.subln=none"]))
    assert "refusing to resume stage convert" in err
    assert link.is_symlink() and snapshot(target) == before and hidden(tmp_path) == []


def test_symlinked_export_outs_are_written_through_or_refused(kit, tmp_path: Path, capsys) -> None:
    student = str(kit["student"])
    # --out: a link to a file (dangling until written) → the file at its target; the link stays
    (tmp_path / "models").mkdir()
    gguf_link = tmp_path / "student.gguf"
    gguf_link.symlink_to(tmp_path / "models" / "v1.gguf")
    hf_target = tmp_path / "models" / "hf"
    hf_target.mkdir()
    hf_link = tmp_path / "hf"
    hf_link.symlink_to(hf_target)
    assert main(["export", "--student", student, "--out", str(gguf_link), "--hf-out", str(hf_link)]) == 0
    assert gguf_link.is_symlink() and (tmp_path / "models" / "v1.gguf").read_bytes()[:4] == b"GGUF"
    assert hf_link.is_symlink() and (hf_target / "config.json").is_file()
    assert hidden(tmp_path) == [] and hidden(tmp_path / "models") == []
    # --out: a link to a directory → refused in one line, the link and the directory untouched
    d = tmp_path / "dir"
    d.mkdir()
    for name in ("dirlink", "dirlink.gguf"):
        (tmp_path / name).symlink_to(d)
        err = one_line_error(capsys, main(["export", "--student", student, "--out", str(tmp_path / name)]))
        assert "must name a .gguf file" in err, err
        assert (tmp_path / name).is_symlink() and list(d.iterdir()) == []


def test_no_lock_file_is_left_by_a_refused_or_finished_command(kit, tmp_path: Path, capsys) -> None:
    locks = data_home() / "locks"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    argv = ["stage", "convert", "--teacher", str(kit["teacher"]), "--out", str(mine)]
    assert "not a stage output" in one_line_error(capsys, main(argv))  # before: left .mine.out-lock
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"] and snapshot(mine) == {"notes.txt": sha256_file(
        mine / "notes.txt")}
    out = tmp_path / "student"
    assert main(["stage", "convert", "--teacher", str(kit["teacher"]), "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "student"]
    assert not locks.exists() or list(locks.iterdir()) == []  # removed on release too
    # the lock still excludes a second writer of the same output, and is gone afterwards
    capsys.readouterr()
    with output_lock(out):
        err = one_line_error(capsys, main(["stage", "convert", "--teacher", str(kit["teacher"]), "--out", str(out)]))
        assert "is being written by another process" in err
    assert list(locks.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "student"]


KILLED_WRITERS = """
import os, signal, sys
from pathlib import Path
from bitnet.export.writer import atomic_gguf_write
from bitnet.io import atomic_dir

d = Path(sys.argv[2])
if sys.argv[1] == "gguf":  # killed while writing the tensors: a temporary the size of what it had written
    def fill(w):
        Path(w.path).write_bytes(b"x" * (1 << 20))
        os.kill(os.getpid(), signal.SIGKILL)
    atomic_gguf_write(d / "student.gguf", fill, arch="llama")
else:  # killed as a world build starts: an empty temporary directory
    with atomic_dir(d / "world", marker="world.json"):
        os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_writer(kind: str, d: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITERS, kind, str(d)], cwd=PROJECT, check=False)
    assert proc.returncode == -signal.SIGKILL


def test_temporaries_of_killed_writers_are_swept_by_the_next_writer(kit, small_world, tmp_path: Path) -> None:
    _killed_writer("gguf", tmp_path)
    left = hidden(tmp_path)  # before: a full-size .student.gguf.*.tmp, never swept
    assert len(left) == 1 and left[0].startswith(".student.gguf.tmp-"), left
    assert (tmp_path / left[0]).stat().st_size == 1 << 20
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = tmp_path / f".other.gguf.tmp-{sleeper.pid}@{host_tag()}.abc123"  # a writer that still runs
        remote = tmp_path / f".x.gguf.tmp-{dead_pid()}@another-host.abc123"  # not ours to judge
        mine = tmp_path / f".notes.tmp-{dead_pid()}"  # not our naming: a user's file
        for p in (live, remote, mine):
            p.write_text("x")
        assert main(["export", "--student", str(kit["student"]), "--out", str(tmp_path / "student.gguf")]) == 0
        assert hidden(tmp_path) == sorted(p.name for p in (live, remote, mine))  # the killed writers' are gone
        # the next world build sweeps a killed world build's temporaries (before: an empty directory, never swept)
        _killed_writer("world", tmp_path)
        assert len(hidden(tmp_path)) == 4 and (tmp_path / "world").exists() is False
        src = small_world.info["config"]["source"]
        assert main(["world", "build", "--out", str(tmp_path / "world"), "--source-dir", src["path"], "--glob",
                     src["glob"], "--vocab-size", "300", "--seq-len", "64"]) == 0
        assert hidden(tmp_path) == sorted(p.name for p in (live, remote, mine))
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------------------------------- 3. disk full
FULL = r"no space left on device writing {}: needs (~|more than )[\d.]+ MB, [\d.]+ MB free$"


def test_disk_full_export_is_one_line_and_keeps_the_previous_gguf(kit, tmp_path: Path, capsys, monkeypatch) -> None:
    import re

    import gguf

    out = tmp_path / "student.gguf"
    assert main(["export", "--student", str(kit["student"]), "--out", str(out)]) == 0
    digest = sha256_file(out)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    capsys.readouterr()
    err = one_line_error(capsys, main(["export", "--student", str(kit["student"]), "--out", str(out)]))
    assert re.search(FULL.format(re.escape(str(out))), err) and "needs ~" in err, err
    assert sha256_file(out) == digest and hidden(tmp_path) == []


def test_disk_full_student_write_is_one_line_and_keeps_the_previous_output(kit, tmp_path: Path, capsys,
                                                                          monkeypatch) -> None:
    import re

    import bitnet.student
    from bitnet.stages.outputs import forget_output

    out = tmp_path / "student"
    argv = ["stage", "convert", "--teacher", str(kit["teacher"]), "--out", str(out)]
    assert main(argv) == 0
    forget_output(out)  # the next run recomputes it
    before = snapshot(out)

    def full(*args, **kwargs):  # what safetensors raises: no errno, the OS error in its text
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(bitnet.student, "save_model", full)
    capsys.readouterr()
    err = one_line_error(capsys, main(argv))
    assert re.search(FULL.format(re.escape(str(out))), err), err  # the output, not an inner temporary
    assert snapshot(out) == before and hidden(tmp_path) == []


def test_disk_full_trainer_checkpoint_is_one_line_and_keeps_earlier_checkpoints(kit, tmp_path: Path, capsys,
                                                                               monkeypatch) -> None:
    """CPT's checkpoints (the trainer's) go through the same one-line error; the partial checkpoint is removed."""
    import re

    import bitnet.checkpoints

    real, calls = bitnet.checkpoints.save_model, []

    def full_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(bitnet.checkpoints, "save_model", full_on_second)
    out = tmp_path / "cpt"
    inputs = [x for k in ("student", "teacher", "world") for x in (f"--{k}", str(kit[k]))]
    err = one_line_error(capsys, main([
        "stage", "cpt", *inputs, "--out", str(out), "--steps", "2", "--set", "train.ckpt_every=1",
        "--set", "train.warmup_steps=0", "--set", "train.eval_every=0", "--no-progress"]))
    ckpts = out / "train" / "checkpoints"
    assert re.search(FULL.format(re.escape(str(ckpts / "step-00000002"))), err), err
    assert "needs ~" in err  # estimated from the checkpoint before it
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000001"]  # no .step-00000002.tmp left

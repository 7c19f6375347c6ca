"""Refused before training, in one line (issue 22, item 8): a world whose blocks are longer than the models'
positions, and every malformed tokenizer (wrong-shape JSON, truncated JSON, missing files) wherever a tokenizer is read
from a user's path."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from tests.test_safety import kd, one_line_error, play

__all__ = ["play"]  # the fixture this module uses


def _with_positions(src: Path, dst: Path, positions: int) -> Path:
    """A copy of the model directory ``src`` whose config.json declares ``positions`` positions (RoPE: the
    weights do not depend on it, so the model loads and would train as before)."""
    shutil.copytree(src, dst)
    config = next(p for p in (dst / "model" / "config.json", dst / "config.json") if p.is_file())
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_position_embeddings": positions}))
    return dst


def _no_training(out: Path) -> None:
    assert not list(out.rglob("step-*")) and not (out / "model").exists(), sorted(out.rglob("*"))


# ------------------------------------------------------------------------------------------ positions
def test_seq_len_beyond_the_teachers_positions_is_refused_before_training(play, tmp_path: Path, capsys) -> None:
    """Before: ``stage kd`` with a 64-token world and a 32-position teacher trained and exited 0."""
    teacher = _with_positions(play["teacher"], tmp_path / "teacher32", 32)
    err = one_line_error(capsys, main(kd(play, tmp_path / "o1", teacher=str(teacher))))
    assert "seq_len (64) exceeds the teacher" in err and "max_position_embeddings (32)" in err, err
    assert "--seq-len 32" in err
    _no_training(tmp_path / "o1")

    student = _with_positions(play["student"], tmp_path / "student32", 32)
    err = one_line_error(capsys, main(kd(play, tmp_path / "o2", student=str(student))))
    assert "seq_len (64) exceeds the student" in err and "(32)" in err, err
    _no_training(tmp_path / "o2")


def test_seq_len_beyond_the_tiny_teachers_positions_is_refused(play, tmp_path: Path, capsys) -> None:
    out = tmp_path / "teacher"
    err = one_line_error(capsys, main(["teacher", "train", "--world", str(play["world"]), "--out", str(out),
                                       "--steps", "1", "--set", "model.max_position_embeddings=32"]))
    assert "seq_len (64) exceeds the tiny teacher's max_position_embeddings (32)" in err, err
    _no_training(out)


def test_seq_len_check_needs_no_weights() -> None:
    """The check a pre-flight makes from a config alone (flows/preflight.py's teacher config)."""
    from transformers import LlamaConfig

    from bitnet.data import DataError
    from bitnet.world import check_seq_len_fits

    check_seq_len_fits(2048, LlamaConfig(max_position_embeddings=2048), "teacher")
    check_seq_len_fits(4096, object(), "teacher")  # no max_position_embeddings: nothing to check
    with pytest.raises(DataError, match=r"seq_len \(4096\) exceeds the teacher 'x''s max_position_embeddings \(2048"):
        check_seq_len_fits(4096, LlamaConfig(max_position_embeddings=2048), "teacher 'x'")


# ------------------------------------------------------------------------------------------ tokenizers
def _truncate(d: Path) -> None:
    data = (d / "tokenizer.json").read_bytes()
    (d / "tokenizer.json").write_bytes(data[: len(data) // 2])


def _inner_type(d: Path) -> None:  # valid JSON, right keys, a value of the wrong type inside: tokenizers' own error
    spec = json.loads((d / "tokenizer.json").read_text())
    (d / "tokenizer.json").write_text(json.dumps({**spec, "model": {**spec["model"], "vocab": 3}}))


BROKEN: dict[str, tuple[Callable[[Path], object], str]] = {  # how to break a tokenizer dir → what the error says
    "wrong shape": (lambda d: (d / "tokenizer.json").write_text('{"foo": 1}'),
                    "tokenizer.json is not a tokenizers file: it needs a 'model' object and an 'added_tokens' list"),
    "a JSON list": (lambda d: (d / "tokenizer.json").write_text("[1, 2, 3]"),
                    "tokenizer.json must hold a JSON object, not a list"),
    "truncated": (_truncate, "tokenizer.json is not valid JSON (truncated or corrupt?)"),
    "truncated config": (lambda d: (d / "tokenizer_config.json").write_text('{"tokenizer_class": "Pre'),
                         "tokenizer_config.json is not valid JSON"),
    "missing file": (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer files (tokenizer.json"),
    "empty directory": (lambda d: [p.unlink() for p in d.iterdir()], "no tokenizer files (tokenizer.json"),
    "inner type": (_inner_type, "invalid type: integer `3`, expected a map"),
}


@pytest.fixture(scope="module")
def broken_tokenizers(play, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The world's (valid) tokenizer directory, broken in each way of :data:`BROKEN`."""
    root = tmp_path_factory.mktemp("broken-tokenizers")
    out = {}
    for i, (name, (breaker, _)) in enumerate(BROKEN.items()):
        d = root / f"t{i}"
        shutil.copytree(play["world"] / "tokenizer", d)
        breaker(d)
        out[name] = d
    return out


def test_malformed_tokenizers_are_one_line_errors_for_every_command(play, broken_tokenizers, tmp_path: Path,
                                                                    capsys) -> None:
    """Before: the wrong-shape tokenizer.json was a KeyError traceback (exit 1), a JSON list a TypeError traceback,
    tokenizers' own errors a bare Exception traceback; a truncated one a line without the file's name; a missing
    tokenizer.json a ValueError of six lines squeezed into one."""
    from bitnet.data.tokenizer import TokenizerError
    from bitnet.pretrained import load_teacher_tokenizer

    world_cfg = dict(json.loads((play["world"] / "world.json").read_text())["config"])
    w, t, s = str(play["world"]), str(play["teacher"]), str(play["student"] / "model")
    for name, d in broken_tokenizers.items():
        says = BROKEN[name][1]
        cfg = tmp_path / f"world-{d.name}.yaml"
        cfg.write_text(yaml.safe_dump({**world_cfg, "tokenizer": str(d)}))
        commands = {
            "world build": ["world", "build", "--config", str(cfg), "--out", str(tmp_path / "w" / d.name)],
            "eval": ["eval", "--model", t, "--world", w, "--tokenizer", str(d), "--tasks", "", "--max-blocks", "1",
                     "--out", str(tmp_path / f"r-{d.name}.json")],
            "export": ["export", "--student", s, "--out", str(tmp_path / f"{d.name}.gguf"), "--tokenizer", str(d)],
        }
        for command, argv in commands.items():
            err = one_line_error(capsys, main(argv))
            assert says in err and str(d) in err, (name, command, err)
        with pytest.raises(TokenizerError, match=r"\S"):
            load_teacher_tokenizer(d)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob("w/*/world.json"))  # nothing was written


def test_a_model_or_world_with_a_malformed_tokenizer_is_refused_before_training(play, tmp_path: Path,
                                                                                 capsys) -> None:
    """The tokenizer inside a teacher directory (convert, the student stages) and inside a world (the student
    stages, which before read it only to save the student, after training)."""
    teacher = tmp_path / "teacher"
    shutil.copytree(play["teacher"], teacher)
    (teacher / "tokenizer.json").write_text('{"foo": 1}')
    for argv in (["stage", "convert", "--teacher", str(teacher), "--out", str(tmp_path / "c")],
                 kd(play, tmp_path / "k1", teacher=str(teacher))):
        err = one_line_error(capsys, main(argv))
        assert f"{teacher}/tokenizer.json is not a tokenizers file" in err, err
    world = tmp_path / "world"
    shutil.copytree(play["world"], world)
    _truncate(world / "tokenizer")
    err = one_line_error(capsys, main(kd(play, tmp_path / "k2", world=str(world))))
    assert f"{world}/tokenizer/tokenizer.json is not valid JSON" in err, err
    for out in ("c", "k1", "k2"):
        _no_training(tmp_path / out)

"""Save / load of students: identical module tree and logits, safetensors only, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bitnet.convert import BitNetConfig, add_lrc, convert_to_bitnet
from bitnet.student import CheckpointError, load_student, save_student
from tests.test_layers_convert import TINY, tiny_model


def _train_a_little(model: torch.nn.Module) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("arch,subln,lrc", [("llama", "standard", 0), ("qwen2", "all", 0), ("llama", "standard", 4),
                                            ("qwen3", "none", 0)])
def test_round_trip_identical_logits(tmp_path: Path, arch: str, subln: str, lrc: int) -> None:
    model = convert_to_bitnet(tiny_model(arch), BitNetConfig(subln=subln, quant_lambda=0.5))
    if lrc:
        add_lrc(model, lrc)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    _train_a_little(model)
    save_student(model, tmp_path / "s")
    assert not list((tmp_path / "s").glob("*.bin")) and not list((tmp_path / "s").glob("*.pt"))
    loaded = load_student(tmp_path / "s")
    assert repr(loaded) == repr(model.eval())
    assert loaded.bitnet_config == model.bitnet_config
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_checkpoint_of_another_model_is_rejected(tmp_path: Path) -> None:
    small = convert_to_bitnet(tiny_model("llama"))
    save_student(small, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["hidden_size"] = 128
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_student(tmp_path / "a")


def test_missing_and_corrupt_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_student(tmp_path / "nope")
    model = convert_to_bitnet(tiny_model("llama"))
    save_student(model, tmp_path / "s")
    (tmp_path / "s" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_student(tmp_path / "s")
    (tmp_path / "s" / "bitnet.json").write_text('{"subln": "sideways"}')
    with pytest.raises(CheckpointError, match="malformed BitNet config"):
        load_student(tmp_path / "s")


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = convert_to_bitnet(tiny_model("llama"))
    save_student(model, tmp_path / "s")
    before = (tmp_path / "s" / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("bitnet.student.save_model", boom)
    with pytest.raises(OSError):
        save_student(model, tmp_path / "s")
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_save_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    from bitnet.io import OverwriteRefusedError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(OverwriteRefusedError, match="refusing to overwrite"):
        save_student(convert_to_bitnet(tiny_model("llama")), mine)
    assert (mine / "thesis.tex").read_text() == "years of work"

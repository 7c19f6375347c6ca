"""The tiny world, the teacher stage and the CLI, including bad input (one-line error, exit 2, nothing lost)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from bitnet.stages.registry import run_stage
from bitnet.stages.teacher import TeacherConfig
from bitnet.stages.training import StageData
from bitnet.student import load_student
from bitnet.teacher import TinyTeacherConfig
from bitnet.trainer import TrainConfig
from bitnet.world import WorldConfig, build_world
from flows.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("bitdistill: error: ")]
    assert len(lines) == 1, proc.stderr
    assert pattern in lines[0], lines[0]


def tiny_teacher_cfg(steps: int) -> TeacherConfig:
    return TeacherConfig(
        model=TinyTeacherConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=128),
        train=TrainConfig(max_steps=steps, lr=5e-3, warmup_steps=10, ckpt_every=50, progress=False),
        data=StageData(batch_size=16, eval_max_batches=20),
    )


def train_teacher(cfg: TeacherConfig, world, out: Path) -> dict:
    return run_stage("teacher", cfg, {"world": world.root}, out)


def test_every_command_has_help() -> None:
    parser = build_parser()
    for argv in (["--help"], ["world", "--help"], ["world", "build", "--help"], ["teacher", "--help"],
                 ["teacher", "train", "--help"], ["convert", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 0


def test_world_has_disjoint_splits_and_is_reused(small_world) -> None:
    info = small_world.info
    assert set(info["splits"]) == {"train", "validation", "test"}
    assert info["unigram_test_ppl"] > 10
    tok = small_world.tokenizer()
    assert len(tok) == 512 and tok.eos_token_id is not None
    assert tok.decode(tok("The quick brown fox.")["input_ids"]) == "The quick brown fox."
    tokens = small_world.root / "data" / "train" / "tokens.npy"
    mtime = tokens.stat().st_mtime_ns
    again = build_world(WorldConfig.model_validate(info["config"]), small_world.root)
    assert again.info["key"] == info["key"] and tokens.stat().st_mtime_ns == mtime


def test_teacher_stage_beats_unigram_and_loads_in_transformers(small_world, tmp_path: Path) -> None:
    metrics = train_teacher(tiny_teacher_cfg(150), small_world, tmp_path / "teacher")
    assert metrics["test_ppl"] < 0.6 * metrics["unigram_test_ppl"], metrics
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher" / "model")
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(tmp_path / "teacher" / "model")
    assert len(tok) == model.config.vocab_size
    on_disk = json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    assert on_disk["test_ppl"] == pytest.approx(metrics["test_ppl"])

    # stage 1 on the real teacher through the CLI: the student reloads
    assert main(["convert", "--teacher", str(tmp_path / "teacher" / "model"), "--out", str(tmp_path / "student")]) == 0
    student = load_student(tmp_path / "student")
    ids = torch.tensor([tok("def f(x): return x")["input_ids"]])
    assert torch.isfinite(student(input_ids=ids).logits).all()
    assert (tmp_path / "student" / "model" / "tokenizer.json").is_file()

    # changing the model but keeping the output directory: the old checkpoint is refused, not overwritten
    cfg = tiny_teacher_cfg(80)
    cfg.model.num_hidden_layers = 2
    cfg_file = tmp_path / "teacher.yaml"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")))
    before = (tmp_path / "teacher" / "model" / "model.safetensors").read_bytes()
    proc = run_cli("teacher", "train", "--world", str(small_world.root), "--out", str(tmp_path / "teacher"),
                   "--config", str(cfg_file))
    assert_one_line_error(proc, "refusing to resume stage teacher")  # another config: refused before training
    assert (tmp_path / "teacher" / "model" / "model.safetensors").read_bytes() == before


def cli_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run the CLI in-process; it must fail with exit code 2 and exactly one `bitdistill: error:` line."""
    capsys.readouterr()
    assert main(list(args)) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("bitdistill: error: ")]
    assert len(err) == 1
    return err[0]


def test_bad_input_is_one_line_error(tmp_path: Path, small_world, capsys: pytest.CaptureFixture[str]) -> None:
    # one real process: exit status and stderr as a shell sees them
    assert_one_line_error(run_cli("world", "build", "--source-dir", str(tmp_path / "missing"), "--out",
                                  str(tmp_path / "w")), "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no documents" in cli_error(capsys, "world", "build", "--source-dir", str(empty),
                                       "--out", str(tmp_path / "w"))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("vocab_size: [unclosed\n")
    assert "not valid YAML" in cli_error(capsys, "world", "build", "--config", str(bad_yaml))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("vocab_sise: 100\n")
    assert "vocab_sise" in cli_error(capsys, "world", "build", "--config", str(unknown))
    assert "seq_len" in cli_error(capsys, "world", "build", "--out", str(small_world.root), "--seq-len", "-3")
    assert (small_world.root / "world.json").is_file()  # the existing world was not touched
    assert "not a built world" in cli_error(capsys, "teacher", "train", "--world", str(tmp_path / "nowhere"),
                                            "--out", str(tmp_path / "t"))
    assert "nowhere" in cli_error(capsys, "convert", "--teacher", str(tmp_path / "nowhere"),
                                  "--out", str(tmp_path / "s"))
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)
                    ).save_pretrained(gpt2)
    msg = cli_error(capsys, "convert", "--teacher", str(gpt2), "--out", str(tmp_path / "s"))
    assert "supported: llama, mistral, qwen2, qwen3" in msg
    assert not (tmp_path / "s").exists()

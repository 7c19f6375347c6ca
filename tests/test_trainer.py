"""The one trainer: schedule, guard, checkpoints (safetensors + JSON), exact resume after SIGKILL, DDP."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitnet.data import BlockLoader, iter_eval_batches
from bitnet.io import sha256_file, sha256_json
from bitnet.student import CheckpointError
from bitnet.teacher import TinyTeacherConfig, build_tiny_teacher
from bitnet.trainer import NonFiniteLossError, TrainConfig, Trainer, lr_lambda

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train_tiny.py"
BIN = Path(sys.executable).parent


def tiny_lm(vocab: int, hidden: int = 256, layers: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = TinyTeacherConfig(hidden_size=hidden, intermediate_size=256, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return build_tiny_teacher(cfg, vocab, bos_token_id=0, eos_token_id=0)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT)
    e["OMP_NUM_THREADS"] = "1"
    return e


def run_script(world: Path, out: Path, *extra: str, torchrun: bool = False, timeout: int = 300) -> str:
    cmd = [sys.executable, str(SCRIPT), str(world), str(out), *extra]
    if torchrun:
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(SCRIPT), str(world), str(out), *extra]
    proc = subprocess.run(cmd, check=False, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_lr_schedule_warmup_then_cosine() -> None:
    cfg = TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)
    # issue 14: the warm-up is clamped to the step budget (a 2-step run with the 15-step default is valid)
    short = TrainConfig(max_steps=2, warmup_steps=15)
    assert short.effective_warmup == 2
    g = lr_lambda(short)
    assert g(0) == pytest.approx(0.5) and g(1) == pytest.approx(1.0)


def test_training_lowers_validation_loss(small_world, tmp_path: Path) -> None:
    model = tiny_lm(small_world.info["vocab_size"])
    train, val = small_world.dataset("train"), small_world.dataset("validation")
    cfg = TrainConfig(max_steps=30, lr=3e-3, warmup_steps=3, log_every=5, progress=False)
    trainer = Trainer(model, BlockLoader(train, 8), cfg, tmp_path, val_batches=lambda: iter_eval_batches(val, 4, 4))
    before = trainer.evaluate()
    result = trainer.fit()
    assert result.steps == 30 and result.tokens == 30 * 8 * 64
    # 30 steps from a random init (loss ≈ ln 512 = 6.24) must learn well beyond chance
    assert result.val_loss < before - 0.8, (before, result.val_loss)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and '"val_loss"' in lines[-1]


def test_grad_accumulation_matches_big_batch(small_world, tmp_path: Path) -> None:
    train = small_world.dataset("train")
    finals = []
    for bs, accum in ((8, 1), (4, 2)):
        model = tiny_lm(small_world.info["vocab_size"])
        loader = BlockLoader(train, bs, seed=3, shuffle=False)
        cfg = TrainConfig(max_steps=3, lr=1e-3, grad_accum=accum, clip_grad=None, progress=False)
        Trainer(model, loader, cfg, tmp_path / f"{bs}").fit()
        finals.append(model.state_dict())
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-4, atol=1e-5)


def test_non_finite_loss_stops_with_clear_error(small_world, tmp_path: Path) -> None:
    model = tiny_lm(small_world.info["vocab_size"])

    def nan_loss(m, batch):
        out = m(input_ids=batch["input_ids"], labels=batch["input_ids"])
        return out.loss * float("nan"), {}

    trainer = Trainer(model, BlockLoader(small_world.dataset("train"), 2), TrainConfig(max_steps=2, progress=False),
                      tmp_path, loss_fn=nan_loss)
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* at step 0"):
        trainer.fit()


def test_checkpoints_are_safetensors_and_json(small_world, tmp_path: Path) -> None:
    model = tiny_lm(small_world.info["vocab_size"])
    cfg = TrainConfig(max_steps=4, ckpt_every=2, keep_checkpoints=1, progress=False)
    trainer = Trainer(model, BlockLoader(small_world.dataset("train"), 2), cfg, tmp_path)
    trainer.fit()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-00000004"]  # keep_checkpoints=1 pruned step 2; the final step is kept
    files = sorted(p.name for p in (tmp_path / "checkpoints" / ckpts[0]).iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json"]
    opt = load_file(str(tmp_path / "checkpoints" / ckpts[0] / "optimizer.safetensors"))
    assert any(k.endswith("exp_avg_sq") for k in opt)
    # a finished run restarted is a no-op that reports where it resumed
    again = Trainer(
        tiny_lm(small_world.info["vocab_size"]), BlockLoader(small_world.dataset("train"), 2), cfg, tmp_path
    )
    result = again.fit()
    assert result.resumed_from == 4 and result.steps == 4
    for k, v in model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v)


def test_checkpoint_from_another_model_is_rejected(small_world, tmp_path: Path) -> None:
    cfg = TrainConfig(max_steps=2, ckpt_every=1, progress=False)
    loader = BlockLoader(small_world.dataset("train"), 2)
    Trainer(tiny_lm(small_world.info["vocab_size"]), loader, cfg, tmp_path).fit()
    other = tiny_lm(small_world.info["vocab_size"], layers=2)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        Trainer(
            other, BlockLoader(small_world.dataset("train"), 2), cfg.model_copy(update={"max_steps": 4}), tmp_path
        ).fit()


def test_exact_resume_after_sigkill(small_world, tmp_path: Path) -> None:
    steps = ["--steps", "8", "--ckpt-every", "2", "--dropout", "0.1"]
    run_script(small_world.root, tmp_path / "straight", *steps)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(small_world.root), str(killed), *steps, "--sleep", "0.4"],
        env=env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    target = killed / "checkpoints" / "step-00000004"
    deadline = time.time() + 240
    try:
        while not target.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final.safetensors").exists()
    latest = max(int(p.name.split("-")[1]) for p in (killed / "checkpoints").glob("step-*"))
    assert 4 <= latest < 8

    out = run_script(small_world.root, killed, *steps)
    assert f"resumed_from={latest}" in out
    a = load_file(str(tmp_path / "straight" / "final.safetensors"))
    b = load_file(str(killed / "final.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics log of the resumed run is the uninterrupted run's log
    log_killed = (killed / "metrics.jsonl").read_text().splitlines()
    log_straight = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    assert len(log_killed) == len(log_straight) == 8


def test_ddp_two_processes_match_single_process(small_world, tmp_path: Path) -> None:
    out = run_script(
        small_world.root, tmp_path / "ddp", "--steps", "4", "--batch-size", "2", "--ckpt-every", "2", torchrun=True
    )
    assert "RESULT steps=4" in out
    run_script(small_world.root, tmp_path / "single", "--steps", "4", "--batch-size", "4")
    ddp = load_file(str(tmp_path / "ddp" / "final.safetensors"))
    single = load_file(str(tmp_path / "single" / "final.safetensors"))
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5)
    # both ranks' RNG states went into the checkpoint
    rng = load_file(str(tmp_path / "ddp" / "checkpoints" / "step-00000004" / "rng.safetensors"))
    assert {"rank0.torch", "rank1.torch"} <= rng.keys()


# ---------------------------------------------------------------------- issue 14: checkpoints that can be trusted
def _four_steps(small_world, out: Path, identity: dict[str, str] | None = None, **kw) -> tuple[Trainer, object]:
    cfg = TrainConfig(max_steps=4, ckpt_every=2, keep_checkpoints=2, progress=False, **kw)
    trainer = Trainer(
        tiny_lm(small_world.info["vocab_size"]),
        BlockLoader(small_world.dataset("train"), 2),
        cfg,
        out,
        identity=identity,
    )
    return trainer, trainer.fit()


def _rewrite_checksums(ckpt: Path) -> None:
    """Make a tampered checkpoint look intact: recompute its recorded sha256s and the trainer.json digest."""
    meta = json.loads((ckpt / "trainer.json").read_text())
    meta["files"] = {name: sha256_file(ckpt / name) for name in meta["files"]}
    meta.pop("digest")
    meta["digest"] = sha256_json(meta)
    (ckpt / "trainer.json").write_text(json.dumps(meta))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(small_world, tmp_path: Path, caplog) -> None:
    first, _ = _four_steps(small_world, tmp_path)
    want = {k: v.clone() for k, v in first.model.state_dict().items()}
    ckpt4 = tmp_path / "checkpoints" / "step-00000004"
    data = bytearray((ckpt4 / "model.safetensors").read_bytes())
    data[-100] ^= 0x01  # one flipped bit in a weight
    (ckpt4 / "model.safetensors").write_bytes(bytes(data))
    stale = [tmp_path / "checkpoints" / n for n in (".step-00000006.tmp-x1y2", ".step-00000004.old")]
    for d in stale:
        d.mkdir()
    with caplog.at_level(logging.WARNING, logger="bitnet.trainer"):
        again, result = _four_steps(small_world, tmp_path)
    assert result.resumed_from == 2 and result.steps == 4
    assert result.tokens_this_run * 2 == result.tokens  # steps 3-4 of 4: tokens/s counts this attempt's tokens
    assert result.skipped_checkpoints == ["step-00000004: checksum mismatch in model.safetensors"]
    assert "skipping checkpoint" in caplog.text and "stale temporary" in caplog.text
    assert not any(d.exists() for d in stale)
    for k, v in want.items():  # steps 3-4 retrained from the intact step 2 reach the same weights (exact resume)
        assert torch.equal(again.model.state_dict()[k], v), k
    assert math.isfinite(result.train_loss)


def test_no_intact_checkpoint_is_refused(small_world, tmp_path: Path) -> None:
    _four_steps(small_world, tmp_path)
    for ckpt in (tmp_path / "checkpoints").iterdir():
        (ckpt / "trainer.json").write_text("{")  # truncated
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*unreadable trainer.json.*delete it") as e:
        _four_steps(small_world, tmp_path)
    assert "\n" not in str(e.value)


def test_checkpoint_with_non_finite_weights_is_skipped_and_nan_model_refused(small_world, tmp_path: Path) -> None:
    _four_steps(small_world, tmp_path / "run")
    ckpt4 = tmp_path / "run" / "checkpoints" / "step-00000004"
    weights = load_file(str(ckpt4 / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name][0, 0] = float("nan")
    save_file(weights, str(ckpt4 / "model.safetensors"))
    _rewrite_checksums(ckpt4)  # intact by checksum, yet non-finite: a recompute must not build on it
    _, result = _four_steps(small_world, tmp_path / "run")
    assert result.resumed_from == 2 and result.skipped_checkpoints == [f"step-00000004: non-finite values in {name}"]

    model = tiny_lm(small_world.info["vocab_size"])
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    trainer = Trainer(
        model,
        BlockLoader(small_world.dataset("train"), 2),
        TrainConfig(max_steps=2, ckpt_every=1, progress=False),
        tmp_path / "nan",
    )
    with pytest.raises(NonFiniteLossError, match="non-finite values in model.norm.weight"):
        trainer.fit()
    assert not (tmp_path / "nan" / "checkpoints").exists()


def test_checkpoints_of_another_run_are_refused(small_world, tmp_path: Path) -> None:
    ident = {"student": "a" * 64, "config": "c" * 64}
    _four_steps(small_world, tmp_path, identity=ident)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    other = {"student": "b" * 64, "config": "c" * 64}
    with pytest.raises(CheckpointError, match=r"checkpoints of another run \(student aaaaaaaaaaaa vs bbbbbbbbbbbb\)"):
        _four_steps(small_world, tmp_path, identity=other)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    _, result = _four_steps(small_world, tmp_path, identity=ident)  # the same run resumes
    assert result.resumed_from == 4


def test_two_step_run_with_longer_default_warmup(small_world, tmp_path: Path) -> None:
    cfg = TrainConfig(max_steps=2, warmup_steps=15, progress=False, log_every=1)
    result = Trainer(
        tiny_lm(small_world.info["vocab_size"]), BlockLoader(small_world.dataset("train"), 2), cfg, tmp_path
    ).fit()
    assert result.steps == 2 and [r["lr"] for r in result.history] == pytest.approx([1.5e-4, 3e-4])


def test_shared_schedule_windows_equal_one_schedule() -> None:
    """``lr_schedule: shared``: layer-wise, CPT and KD take consecutive windows of one warm-up + cosine schedule, so
    the LR over the three stages is exactly the LR of one run of their summed steps (no restart at a stage start)."""
    from flows.config import pipeline_config

    stages_on = ["layerwise.enabled=true", "cpt.enabled=true"]  # the preset itself trains KD only
    cfg = pipeline_config(preset_name="smollm2-135m", sets=["lr_schedule=shared", *stages_on])
    stages = [cfg.step(n).train for n in ("layerwise", "cpt", "kd")]
    total = sum(t.max_steps for t in stages)
    whole = lr_lambda(stages[0].model_copy(update={"max_steps": total, "schedule_start": 0, "schedule_steps": None}))
    windows = [lr_lambda(t)(i) for t in stages for i in range(t.max_steps)]
    assert windows == [whole(i) for i in range(total)]
    per_stage = pipeline_config(preset_name="smollm2-135m", sets=stages_on)
    assert lr_lambda(per_stage.cpt.train)(0) < lr_lambda(per_stage.cpt.train)(per_stage.cpt.train.warmup_steps)
    assert cfg.lrc.train.schedule_steps is None  # LRC corrects afterwards on its own schedule
    with pytest.raises(ValueError, match="exceeds schedule_steps"):
        TrainConfig(max_steps=10, schedule_start=5, schedule_steps=12)

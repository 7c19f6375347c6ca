"""FSDP2 on CPU (gloo, 2 processes): sharded BitLinear = unsharded, activation checkpointing, teacher placement,
DCP checkpoints with exact resume after SIGKILL and resharding 2 -> 1 and 1 -> 2 processes; bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitnet.convert import BitNetConfig, convert_to_bitnet
from bitnet.data import BlockLoader
from bitnet.parallel import ParallelConfigError, apply_activation_checkpointing
from bitnet.student import CheckpointError
from bitnet.teacher import TinyTeacherConfig, build_tiny_teacher
from bitnet.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"
TRAIN = SCRIPTS / "train_student.py"
BIN = Path(sys.executable).parent


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT)
    e["OMP_NUM_THREADS"] = "1"
    return e


def command(script: Path, *args: str, procs: int) -> list[str]:
    if procs == 1:
        return [sys.executable, str(script), *args]
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={procs}", str(script), *args]


def run(script: Path, *args: str, procs: int = 2, timeout: int = 300) -> str:
    proc = subprocess.run(command(script, *args, procs=procs), check=False, env=env(), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def tiny_student(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_tiny_teacher(
        TinyTeacherConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128),
        512, bos_token_id=0, eos_token_id=0,
    )
    model.config.attention_dropout = dropout
    return convert_to_bitnet(model, BitNetConfig())


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    for k, v in a.items():
        assert torch.equal(v, b[k]), (k, float((v.float() - b[k].float()).abs().max()))


def test_fsdp_with_one_process_is_refused(small_world, tmp_path: Path) -> None:
    cfg = TrainConfig(max_steps=2, parallel="fsdp", progress=False)
    with pytest.raises(ParallelConfigError, match=r"parallel=fsdp needs at least 2 processes.*has 1") as e:
        Trainer(tiny_student(), BlockLoader(small_world.dataset("train"), 2), cfg, tmp_path)
    assert "\n" not in str(e.value)
    assert not tmp_path.joinpath("checkpoints").exists()
    with pytest.raises(ValueError, match="cpu_offload needs parallel: fsdp"):
        TrainConfig(max_steps=2, cpu_offload=True)


def test_activation_checkpointing_keeps_loss_and_gradients() -> None:
    """Recomputing a block in backward replays the same ops on the same inputs (and, with dropout, the same RNG
    state, which checkpoint restores), so loss and gradients are bit-identical, not merely close."""
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    results = []
    for ac in (False, True):
        model = tiny_student(dropout=0.1)
        if ac:
            apply_activation_checkpointing(model)
        model.train()
        torch.manual_seed(42)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        names = [n for n, _ in model.named_parameters()]
        assert not any("checkpoint" in n for n in names)  # composable AC keeps parameter names
    assert torch.equal(results[0][0], results[1][0])
    assert_same(results[0][1], results[1][1])


COMMON = ["--steps", "8", "--ckpt-every", "2", "--dropout", "0.1", "--dump-at", "4"]


@pytest.fixture(scope="module")
def fsdp_straight(small_world, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One uninterrupted 2-rank FSDP run (KD loss, sharded teacher, dropout so RNG state matters; checkpoints at 2, 4,
    6, 8), started with --checks so that the same start-up also runs tests/scripts/fsdp_checks.py."""
    out_dir = tmp_path_factory.mktemp("fsdp") / "straight"
    out = run(TRAIN, str(small_world.root), str(out_dir), "--parallel", "fsdp", "--checks", *COMMON)
    return out_dir, out


def test_fsdp_sharded_bitlinear_teacher_offload_match_unsharded(fsdp_straight) -> None:
    """Sharded student (BitLinear ternary forward, with and without activation checkpointing), sharded teacher and
    CPU offload are bit-identical to their unsharded counterparts (see tests/scripts/fsdp_checks.py)."""
    assert "CHECKS OK" in fsdp_straight[1]


def test_fsdp_training_resume_and_reshard(small_world, fsdp_straight, tmp_path: Path) -> None:
    w = str(small_world.root)
    straight, out = fsdp_straight
    assert "RESULT steps=8 resumed_from=None" in out
    ckpt4 = straight / "checkpoints" / "step-00000004"
    shards = sorted(p.name for p in ckpt4.iterdir())
    assert shards == ["rng.safetensors", "shard-00001-model-00001-of-00001.safetensors",
                      "shard-00002-model-00001-of-00001.safetensors", "trainer.json"], shards

    # the same run killed with SIGKILL after its step-4 checkpoint, restarted: bit-identical final weights
    killed, pids = tmp_path / "killed", tmp_path / "pids"
    proc = subprocess.Popen(command(TRAIN, w, str(killed), "--parallel", "fsdp", *COMMON, "--sleep", "0.3",
                                    "--pid-dir", str(pids), procs=2),
                            env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while not (killed / "checkpoints" / "step-00000004").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        for rank_pid in sorted(pids.glob("rank*.pid")):  # the workers (torchrun starts them in their own session)
            os.kill(int(rank_pid.read_text()), signal.SIGKILL)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert len(list(pids.glob("rank*.pid"))) == 2
    assert not (killed / "model").exists()
    latest = max(int(p.name.split("-")[1]) for p in (killed / "checkpoints").glob("step-*"))
    assert 4 <= latest < 8
    (killed / "checkpoints" / ".step-00000099.tmp").mkdir()  # what a kill during a save leaves behind
    out = run(TRAIN, w, str(killed), "--parallel", "fsdp", *COMMON)
    assert f"resumed_from={latest}" in out
    assert not (killed / "checkpoints" / ".step-00000099.tmp").exists()
    assert_same(load_file(str(straight / "model" / "model.safetensors")),
                load_file(str(killed / "model" / "model.safetensors")))
    logs = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (killed, straight)]
    assert logs[0] == logs[1] and len(logs[0]) == 8  # the resumed run's log is the uninterrupted run's log

    # reshard 2 -> 1: one process loads the 2-rank checkpoint of step 4; at step 4 (before training on) its full
    # model and optimizer state are exactly those the 2-rank run had at step 4; then it trains on to step 6
    two_to_one = tmp_path / "two_to_one"
    shutil.copytree(ckpt4, two_to_one / "checkpoints" / ckpt4.name)
    out = run(TRAIN, w, str(two_to_one), "--batch-size", "4", "--steps", "6", "--ckpt-every", "2", "--dump-at", "4",
              procs=1)
    assert "RESULT steps=6 resumed_from=4" in out
    for part in ("model", "optimizer"):
        assert_same(load_file(str(straight / "dump-4" / f"{part}.safetensors")),
                    load_file(str(two_to_one / "dump-4" / f"{part}.safetensors")))

    # reshard 1 -> 2: two FSDP ranks (CPT loss, λ warm-up) load that one-process checkpoint of step 6 exactly
    one_to_two = tmp_path / "one_to_two"
    shutil.copytree(two_to_one / "checkpoints", one_to_two / "checkpoints")
    out = run(TRAIN, w, str(one_to_two), "--parallel", "fsdp", "--loss", "cpt", "--steps", "7", "--dump-at", "6")
    assert "RESULT steps=7 resumed_from=6" in out
    got = load_file(str(one_to_two / "dump-6" / "model.safetensors"))
    want = load_file(str(two_to_one / "model" / "model.safetensors"))  # tied lm_head.weight stored once
    assert_same({k: got[k] for k in want}, want)


def test_sharded_checkpoint_of_another_model_is_refused_before_training(small_world, fsdp_straight,
                                                                        tmp_path: Path) -> None:
    """A 2-rank FSDP checkpoint offered to a student of another shape (3 blocks instead of 2) on one process: refused
    in one line, naming what does not fit (the 11 tensors of block 2: 7 BitLinear weights, 2 SubLN, 2 norms), before
    any step runs (no new checkpoint, no metrics)."""
    straight, _ = fsdp_straight
    shutil.copytree(straight / "checkpoints" / "step-00000004", tmp_path / "checkpoints" / "step-00000004")
    torch.manual_seed(0)
    other = convert_to_bitnet(build_tiny_teacher(
        TinyTeacherConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128),
        512, bos_token_id=0, eos_token_id=0), BitNetConfig())
    trainer = Trainer(other, BlockLoader(small_world.dataset("train"), 4), TrainConfig(max_steps=6, progress=False),
                      tmp_path)
    with pytest.raises(CheckpointError, match=r"does not fit this model: 11 missing \(e.g. model.layers.2") as e:
        trainer.fit()
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004"]
    assert not (tmp_path / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------------ the memory plan
def test_plan_counts_parameters_of_real_shapes_without_weights() -> None:
    """The teacher counts are the published parameter counts of these models (config alone, no weights); the student
    adds one SubLN vector per o_proj and down_proj input."""
    from bitnet.plan import measure_shape

    published = {"qwen2.5-0.5b": 494_032_768, "qwen3-4b": 4_022_468_096, "llama-3.1-8b": 8_030_261_248}
    for name, count in published.items():
        shape = measure_shape(name, seq_len=128)
        assert shape.teacher_params == count, name
        assert shape.params - shape.teacher_params == shape.layers * (shape.hidden + {
            "qwen2.5-0.5b": 4864, "qwen3-4b": 9728, "llama-3.1-8b": 14336}[name] + (  # down_proj input = FFN width
            4096 - 2560 if name == "qwen3-4b" else 0))  # Qwen3-4B's o_proj input is 32 heads x 128 = 4096 wide
        assert shape.act_block > 0 and shape.act_head > 0 and shape.act_kd > 0


def test_plan_activation_bytes_scale_with_tokens() -> None:
    """Saved-for-backward bytes = fixed + per-token x tokens, the same split measured at two lengths (SDPA keeps no
    seq x seq matrix). The fixed part of a block is BitLinear's quantized weights, saved in bf16: 2 bytes per
    weight of the block (the block's other parameters are two norm vectors, which weight_quant does not touch)."""
    from bitnet.plan import measure_shape

    a, b = measure_shape("qwen2.5-0.5b", seq_len=64), measure_shape("qwen2.5-0.5b", seq_len=256)
    assert (a.act_block, a.act_block_fixed, a.act_head) == (b.act_block, b.act_block_fixed, b.act_head)
    norms = 2 * a.hidden  # input_layernorm + post_attention_layernorm of the block
    subln = a.hidden + 4864  # SubLN vectors on the o_proj and down_proj inputs
    linear = a.block_params - norms - subln
    # plus at most an fp32 copy of each norm vector (SubLN multiplies by weight.float(), which autograd keeps)
    assert 2 * linear <= a.act_block_fixed <= 2 * linear + 4 * (norms + subln)


def test_plan_recommends_layouts_and_says_what_would_fit() -> None:
    from bitnet.plan import PlanError, plan_for

    small = plan_for("qwen2.5-0.5b", accelerators="H100:1", micro_batch=2, seq_len=512)
    assert small.recommended.layout.parallel == "ddp" and small.recommended.micro_batch == 2
    assert [e.layout.parallel for e in small.estimates] == ["ddp", "ddp"]  # one GPU: no FSDP rows
    big = plan_for("llama-3.1-8b", accelerators="H100:8", nodes=2, micro_batch=1, seq_len=512)
    assert big.recommended.layout.parallel == "fsdp"
    ddp = next(e for e in big.estimates if e.layout.label == "ddp")
    assert ddp.params + ddp.grads + ddp.optimizer == 16 * big.shape.params  # fp32 weights + grads + AdamW moments
    assert "| fsdp+AC |" in big.table() and "recommended: parallel=fsdp" in big.table()
    with pytest.raises(PlanError, match=r"does not fit on 1xT4:1 .* needs [\d.]+ GiB per GPU; it would fit on") as e:
        plan_for("llama-3.1-8b", accelerators="T4:1", seq_len=512)
    assert "\n" not in str(e.value)
    with pytest.raises(PlanError, match="unknown accelerator 'B999'"):
        plan_for("qwen2.5-0.5b", accelerators="B999:8")

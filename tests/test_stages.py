"""The BitDistill student stages end to end on the small world: each trains, resumes, saves a loadable student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bitnet.convert import BitNetConfig
from bitnet.layers import BitLinearLRC, bit_linears
from bitnet.stages import layerwise
from bitnet.stages.convert import ConvertConfig
from bitnet.stages.cpt import CPTConfig, quant_lambda_at
from bitnet.stages.kd import KDConfig
from bitnet.stages.layerwise import LayerwiseConfig
from bitnet.stages.lrc import LRCConfig, freshly_converted
from bitnet.stages.registry import run_stage
from bitnet.stages.teacher import TeacherConfig
from bitnet.stages.training import StageData
from bitnet.student import load_student
from bitnet.teacher import TinyTeacherConfig
from bitnet.trainer import TrainConfig
from flows.cli import main

DATA = StageData(batch_size=4, eval_batch_size=8, eval_max_batches=4)


def run_student_stage(cfg, student: Path, teacher: Path, world, out: Path) -> dict:
    name = {LayerwiseConfig: "layerwise", CPTConfig: "cpt", KDConfig: "kd", LRCConfig: "lrc"}[type(cfg)]
    return run_stage(name, cfg, {"student": student, "teacher": teacher, "world": world.root}, out)


def train_teacher(cfg: TeacherConfig, world, out: Path) -> dict:
    return run_stage("teacher", cfg, {"world": world.root}, out)


def short(steps: int, **kw) -> TrainConfig:
    return TrainConfig(max_steps=steps, lr=2e-3, warmup_steps=1, log_every=1, progress=False, **kw)


@pytest.fixture(scope="module")
def teacher_and_student(small_world, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stages")
    cfg = TeacherConfig(
        model=TinyTeacherConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=128),
        train=TrainConfig(max_steps=60, lr=5e-3, warmup_steps=5, progress=False),
        data=StageData(batch_size=16, eval_max_batches=4),
    )
    train_teacher(cfg, small_world, root / "teacher")
    run_stage("convert", ConvertConfig(bitnet=BitNetConfig(subln="standard")), {"teacher": root / "teacher" / "model"},
              root / "student")
    return root / "teacher" / "model", root / "student"


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]


def test_lambda_schedule() -> None:
    assert [quant_lambda_at(s, 4, "linear") for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert quant_lambda_at(2, 4, "cosine") == pytest.approx(0.5)
    assert quant_lambda_at(0, 0, "linear") == 1.0


@pytest.mark.parametrize("target", ["hidden", "block"])
def test_layerwise_lowers_its_loss(teacher_and_student, small_world, tmp_path: Path, target: str) -> None:
    teacher, student = teacher_and_student
    m = run_student_stage(LayerwiseConfig(target=target, train=short(12), data=DATA), student, teacher, small_world,
                          tmp_path)
    h = history(tmp_path)
    assert m["steps"] == 12 and h[-1]["loss"] < 0.8 * h[0]["loss"], (h[0], h[-1])
    load_student(tmp_path / "model")


def test_layerwise_block_sequential_fits_each_block_and_resumes(teacher_and_student, small_world,
                                                               tmp_path: Path) -> None:
    """Block by block from cached activations: a progress record per block, every block trained ``max_steps``
    steps and closer to its teacher block over the whole pool after its fit than before; a re-run after the first block
    finished trains only the rest, to the same student."""
    teacher, student = teacher_and_student
    cfg = LayerwiseConfig(target="block_sequential", train=short(6), data=DATA)
    m = run_student_stage(cfg, student, teacher, small_world, tmp_path / "a")
    h = history(tmp_path / "a")
    assert [r["block"] for r in h] == [0, 1] and h[-1]["step"] == 6 and h[-1]["tokens"] == m["tokens"]
    assert m["block_steps"] == 12 and m["pool_blocks"] == 24 and m["tokens"] == 6 * 4 * small_world.seq_len
    assert all(r["pool_loss_after"] < r["pool_loss_before"] for r in h), h

    blocks = tmp_path / "a" / "train" / "checkpoints" / "blocks"
    (blocks / "block-001.safetensors").unlink()
    # what a retry of a run killed during block 1 finds (the stage's run, without the finished-output reuse)
    again = layerwise.run(cfg, {"student": student, "teacher": teacher, "world": small_world.root}, tmp_path / "a")
    assert again["blocks_resumed"] == 1 and again["block_steps"] == 6
    assert again["val_ppl"] == pytest.approx(m["val_ppl"], rel=1e-6)  # the same weights: only the summation order
    load_student(tmp_path / "a" / "model")


def test_cpt_ramps_lambda_and_ends_fully_quantized(teacher_and_student, small_world, tmp_path: Path) -> None:
    teacher, student = teacher_and_student
    cfg = CPTConfig(lambda_warmup_steps=4, train=short(6), data=DATA)
    run_student_stage(cfg, student, teacher, small_world, tmp_path)
    assert [r["lambda"] for r in history(tmp_path)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    reloaded = load_student(tmp_path / "model")
    assert all(layer.quant_lambda == 1.0 for _, layer in bit_linears(reloaded))


@pytest.mark.parametrize("objective", ["bitdistill", "tcs"])
def test_kd_objectives(teacher_and_student, small_world, tmp_path: Path, objective: str) -> None:
    teacher, student = teacher_and_student
    cfg = KDConfig(objective=objective, train=short(4), data=DATA, tcs_k=20)
    m = run_student_stage(cfg, student, teacher, small_world, tmp_path)
    rec = history(tmp_path)[0]
    if objective == "bitdistill":
        assert rec["kl"] > 0 and rec["ad"] > 0
        assert rec["loss"] == pytest.approx(rec["ce"] + 10 * 25 * rec["kl"] + 1e5 * rec["ad"], rel=1e-4)
    else:
        assert rec["topk_kl"] > 0 and "ad" not in rec
    assert m["val_ppl"] > 1


def test_lrc_trains_only_adapters(teacher_and_student, small_world, tmp_path: Path) -> None:
    teacher, student = teacher_and_student
    cfg = LRCConfig(rank=8, calib_batches=2, train=short(4), data=DATA)
    m = run_student_stage(cfg, student, teacher, small_world, tmp_path)
    assert m["lrc_init"] == "closed_form" and m["lrc_init_improvement"] > 0  # auto: a fresh conversion
    before, after = load_student(student), load_student(tmp_path / "model")
    assert after.bitnet_config.lrc_rank == 8
    layers = dict(bit_linears(after))
    assert all(isinstance(m, BitLinearLRC) for m in layers.values())
    for name, layer in bit_linears(before):
        assert torch.equal(layer.weight, layers[name].weight), name  # ternary (latent) weights frozen
    assert any(m.lrc_u.abs().sum() > 0 for m in layers.values())


def test_stage_cli_and_resume(teacher_and_student, small_world, tmp_path: Path) -> None:
    teacher, student = teacher_and_student
    cfg = tmp_path / "cpt.yaml"
    cfg.write_text("lambda_warmup_steps: 2\ntrain: {max_steps: 5, warmup_steps: 1, ckpt_every: 2, log_every: 1}\n"
                   "data: {batch_size: 4, eval_max_batches: 2}\n")
    args = ["stage", "cpt", "--student", str(student), "--teacher", str(teacher), "--world", str(small_world.root),
            "--out", str(tmp_path / "out"), "--config", str(cfg), "--steps", "3", "--no-progress"]
    assert main(args) == 0
    first = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert first["steps"] == 3  # --steps overrides the file, the file's other settings survive
    assert [r["lambda"] for r in history(tmp_path / "out")] == [0.0, 0.5, 1.0]
    assert main(args) == 0  # the finished output of the same config and inputs is reused: nothing trains
    again = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert again == first
    assert main(["stage", "kd", "--student", str(tmp_path / "nowhere"), "--teacher", str(teacher), "--world",
                 str(small_world.root), "--out", str(tmp_path / "x")]) == 2


def test_bad_stage_input_fails_before_training(teacher_and_student, small_world, tmp_path: Path) -> None:
    teacher, student = teacher_and_student
    with pytest.raises(ValueError, match="ad_layers"):
        KDConfig(ad_layers=[])
    with pytest.raises(ValueError, match="split_heads"):
        run_student_stage(KDConfig(split_heads=3, train=short(2), data=DATA), student, teacher, small_world,
                          tmp_path / "kd")
    with pytest.raises(ValueError, match="out of range"):
        run_student_stage(KDConfig(ad_layers=[5], train=short(2), data=DATA), student, teacher, small_world,
                          tmp_path / "kd")
    with pytest.raises(ValueError, match="rank"):
        run_student_stage(LRCConfig(rank=128, train=short(2), data=DATA), student, teacher, small_world,
                          tmp_path / "lrc")
    # a teacher with another depth cannot be aligned layer by layer
    other = tmp_path / "other-teacher"
    cfg = TeacherConfig(
        model=TinyTeacherConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=128),
        train=TrainConfig(max_steps=1, progress=False), data=StageData(batch_size=2, eval_max_batches=1),
    )
    train_teacher(cfg, small_world, other)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        run_student_stage(LayerwiseConfig(train=short(2), data=DATA), student, other / "model", small_world,
                          tmp_path / "lw")
    assert not any((tmp_path / d / "train").exists() for d in ("kd", "lrc", "lw"))  # nothing trained, nothing written


def test_kd_stage_resumes_exactly_after_sigkill(teacher_and_student, small_world, tmp_path: Path) -> None:
    """`bitdistill stage kd` killed with SIGKILL after a checkpoint continues to the uninterrupted result."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    teacher, student = teacher_and_student
    cfg = tmp_path / "kd.yaml"
    cfg.write_text("train: {max_steps: 24, lr: 0.002, warmup_steps: 2, ckpt_every: 2, log_every: 1, progress: false}\n"
                   "data: {batch_size: 4, eval_max_batches: 2}\ntcs_k: 20\n")

    def args(out: Path) -> list[str]:
        return ["stage", "kd", "--student", str(student), "--teacher", str(teacher), "--world", str(small_world.root),
                "--out", str(out), "--config", str(cfg)]

    # every run in a fresh process with the same thread count: bit-exact comparisons need identical reductions
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def cli(out: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", *args(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finish(proc: subprocess.Popen) -> None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]

    finish(cli(tmp_path / "straight"))
    killed = tmp_path / "killed"
    proc = cli(killed)
    deadline = time.time() + 240
    try:
        while not any((killed / "train" / "checkpoints").glob("step-*")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists() and not (killed / "model").exists()
    latest = max(int(p.name.split("-")[1]) for p in (killed / "train" / "checkpoints").glob("step-*"))
    assert 2 <= latest < 24

    finish(cli(killed))
    m = json.loads((killed / "metrics.json").read_text())
    assert m["resumed_from"] == latest and m["steps"] == 24
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_select_then_train_a_stage_on_the_selection(teacher_and_student, small_world, tmp_path: Path) -> None:
    teacher, student = teacher_and_student
    sel = tmp_path / "selected"
    assert main(["select", "--model", str(teacher), "--world", str(small_world.root), "--out", str(sel),
                 "--keep", "0.25", "--max-candidates", "64"]) == 0
    from bitnet.data import PackedDataset

    subset = PackedDataset(sel)
    assert subset.num_blocks == 16 and subset.meta["subset"]["source_digest"] == small_world.dataset("train").digest
    stats = json.loads((sel / "selection.json").read_text())
    assert stats["n_candidates"] == 64 and stats["score_kept_mean"] > stats["score_mean"]
    data = StageData(batch_size=4, eval_batch_size=8, eval_max_batches=2, train_data=str(sel))
    m = run_student_stage(CPTConfig(lambda_warmup_steps=0, train=short(2), data=data), student, teacher,
                          small_world, tmp_path / "cpt")
    assert m["steps"] == 2
    with pytest.raises(ValueError, match="train_data"):
        bad = tmp_path / "bad"
        import numpy as np

        from bitnet.data.influence import write_subset

        other = write_subset(small_world.dataset("train"), np.arange(4), bad)
        meta = json.loads((bad / "meta.json").read_text())
        meta["tokenizer_digest"] = "another"
        (bad / "meta.json").write_text(json.dumps(meta))
        _ = other
        run_student_stage(CPTConfig(train=short(1), data=DATA.model_copy(update={"train_data": str(bad)})),
                          student, teacher, small_world, tmp_path / "cpt-bad")


def test_freshly_converted_detects_trained_students(teacher_and_student) -> None:
    from bitnet.teacher import load_teacher

    teacher, student = teacher_and_student
    t, s = load_teacher(teacher), load_student(student)
    assert freshly_converted(s, t)
    with torch.no_grad():
        bit_linears(s)[3][1].weight[0, 0] += 1e-3  # any training step moves a latent weight
    assert not freshly_converted(s, t)


def test_group_learned_student_trains_resumes_and_keeps_scales_in_lrc(teacher_and_student, small_world,
                                                                     tmp_path: Path) -> None:
    """A calibrated student with learned group scales through CPT (scales trained, saved, reloaded exactly; a re-run
    of the finished stage reuses it) and LRC (adapters only: the weights *and* the learned scales stay frozen)."""
    teacher, _ = teacher_and_student
    convert = ConvertConfig.model_validate({
        "bitnet": {"subln": "none", "weight_scale": "group", "scale_rule": "learned", "group_size": 128},
        "calibration": {"enabled": True, "blocks": 8}})
    student = tmp_path / "student"
    run_stage("convert", convert, {"teacher": teacher, "world": small_world.root}, student)
    start = load_student(student)
    assert all(m.scale_group == 128 and m.weight_scales is not None for _, m in bit_linears(start))
    run_student_stage(CPTConfig(lambda_warmup_steps=0, train=short(4, ckpt_every=2), data=DATA), student, teacher,
                      small_world, tmp_path / "cpt")
    trained = load_student(tmp_path / "cpt")
    pairs = list(zip(bit_linears(start), bit_linears(trained), strict=True))
    assert any(not torch.equal(a.weight_scales, b.weight_scales) for (_, a), (_, b) in pairs)
    again = run_student_stage(CPTConfig(lambda_warmup_steps=0, train=short(4, ckpt_every=2), data=DATA), student,
                              teacher, small_world, tmp_path / "cpt")  # finished: reused, not retrained
    assert again["steps"] == 4
    run_student_stage(LRCConfig(rank=4, calib_batches=2, train=short(2), data=DATA), tmp_path / "cpt", teacher,
                      small_world, tmp_path / "lrc")
    corrected = dict(bit_linears(load_student(tmp_path / "lrc")))
    for name, layer in bit_linears(trained):
        assert torch.equal(corrected[name].weight_scales, layer.weight_scales), name
        assert torch.equal(corrected[name].ternary_weight().codes, layer.ternary_weight().codes), name

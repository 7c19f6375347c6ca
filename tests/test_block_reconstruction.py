"""Stage 1.9's block reconstruction (``LayerwiseConfig.target: block``, and ``block_sequential``: block by block from
cached activations) against a reference built another way, its locality, resume, and the stage training with it, on
every family the student stages take."""

from __future__ import annotations

import pytest
import torch

from bitnet.blockwise import PoolLoader, fit_blocks
from bitnet.calibrate import capture_inputs
from bitnet.convert import decoder_layers
from bitnet.objectives import hidden_state_loss
from bitnet.stages.layerwise import LayerwiseConfig, block_reconstruction_loss, layerwise_loss
from bitnet.stages.training import StageData
from bitnet.trainer import TrainConfig, share_schedule
from tests.test_calibrate import FAMILIES, calibration_data, student_of, teacher


def reference_loss(student: torch.nn.Module, fp: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Block by block by hand: block 0's input and every layer's call (mask, position embeddings) as the model
    makes them (``capture_inputs``), each student block and teacher block run on the same student input, the
    student's output fed on."""
    hidden, calls = capture_inputs(student, decoder_layers(student), [ids])
    h, outs, targets = hidden[0], [], []
    with torch.no_grad():
        for s_layer, t_layer, (rest, kwargs) in zip(decoder_layers(student), decoder_layers(fp), calls[0], strict=True):
            targets.append(t_layer(h, *rest, **kwargs))
            h = s_layer(h, *rest, **kwargs)
            outs.append(h)
    return hidden_state_loss(outs, targets)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_loss_matches_the_block_by_block_reference(family: str) -> None:
    fp = teacher(family)
    student = student_of(fp)
    ids = calibration_data(1)[0]
    loss, logs = block_reconstruction_loss(fp, "mse")(student, {"input_ids": ids})
    # the same float32 ops in the same order on the same inputs: equal up to a few ulps of the per-layer means
    assert float(loss.detach()) == pytest.approx(float(reference_loss(student, fp, ids)), rel=1e-5)
    assert float(loss) > 0 and logs["ce"] > 0
    # not the hidden-state loss: there the teacher runs on its own inputs, so block 1's target differs
    assert float(loss) != pytest.approx(float(layerwise_loss(fp, "mse")(student, {"input_ids": ids})[0]), rel=1e-3)


def test_a_block_equal_to_the_teachers_has_zero_loss() -> None:
    """λ = 0 and no SubLN: the student's blocks compute the teacher's function, whatever the inputs."""
    fp = teacher()
    student = student_of(fp, quant_lambda=0.0, subln="none")  # a fresh SubLN would change the function
    loss, _ = block_reconstruction_loss(fp, "mse")(student, {"input_ids": calibration_data(1)[0]})
    assert float(loss) < 1e-10


def test_block_losses_are_local() -> None:
    """Block 0's gradient comes from its own term only: changing block 1 leaves it unchanged, and the embeddings
    (before every detached block input) get no gradient."""
    fp = teacher()
    ids = calibration_data(1)[0]
    grads = []
    for shift in (0.0, 0.05):
        student = student_of(fp)
        with torch.no_grad():
            for p in decoder_layers(student)[1].parameters():
                p.add_(shift)
        loss, _ = block_reconstruction_loss(fp, "mse")(student, {"input_ids": ids})
        loss.backward()
        emb = student.get_input_embeddings().weight.grad
        assert emb is None or not emb.any()
        grads.append(torch.cat([p.grad.flatten() for p in decoder_layers(student)[0].parameters()
                                if p.grad is not None]))
        assert any(p.grad is not None and p.grad.any() for p in decoder_layers(student)[1].parameters())
    assert grads[0].abs().sum() > 0
    # block 1's change scales block 1's term, which block 0's gradient must not see; the mean over layers is the same
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


def test_block_target_is_a_validated_option() -> None:
    assert LayerwiseConfig().target == "hidden"
    assert LayerwiseConfig(target="block").target == "block"
    with pytest.raises(ValueError):
        LayerwiseConfig(target="blocks")


def test_block_target_refuses_several_processes(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Under torchrun the local losses leave the embeddings and head without gradients (DDP/FSDP refuse that): a
    one-line refusal before any process group or model is touched."""
    from bitnet.stages.layerwise import run

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="target block runs in one process"):
        run(LayerwiseConfig(target="block"), {}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- block by block (cached)


def _block_train(steps: int, lr: float = 3e-3) -> TrainConfig:
    return TrainConfig(max_steps=steps, lr=lr, warmup_steps=1, weight_decay=0.0, log_every=1, progress=False,
                       ckpt_every=2)


def _pool() -> torch.Tensor:
    return torch.cat(calibration_data(2))  # 8 rows of 32 tokens


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sequential_fit_lowers_every_blocks_error_on_the_students_own_inputs(family: str, tmp_path) -> None:
    """After fitting, every block is closer to the teacher's block than it was, on the inputs the fitted student
    actually gives it (block by block by hand), and the embeddings, final norm and head are untouched (the losses
    are local to the blocks)."""
    fp = teacher(family)
    student, converted = student_of(fp), student_of(fp)
    ids = _pool()
    outside = {k: v.clone() for k, v in student.state_dict().items() if ".layers." not in k}
    result = fit_blocks(student, fp, ids, train=_block_train(8), batch_size=4, work=tmp_path)
    assert result.block_steps == 8 * len(decoder_layers(student)) and result.blocks_loaded == 0
    hidden, calls = capture_inputs(student, decoder_layers(student), [ids])
    h = hidden[0]
    with torch.no_grad():
        for fitted, start, t_layer, (rest, kwargs) in zip(decoder_layers(student), decoder_layers(converted),
                                                          decoder_layers(fp), calls[0], strict=True):
            target = t_layer(h, *rest, **kwargs)
            after = hidden_state_loss([fitted(h, *rest, **kwargs)], [target])
            assert after < hidden_state_loss([start(h, *rest, **kwargs)], [target])
            h = fitted(h, *rest, **kwargs)
    for k, v in student.state_dict().items():
        if ".layers." not in k:
            assert torch.equal(v, outside[k]), k


def test_sequential_fit_resumes_at_the_first_unfinished_block_with_the_same_result(tmp_path) -> None:
    """A run stopped after block 0 (block 1's weights file and its checkpoints gone) resumes: block 0 is read
    back, its cached outputs recomputed, block 1 trained again from the same start, and every weight equals an
    uninterrupted run's bit for bit (CPU, one thread order, seeded pool order)."""
    fp = teacher()
    ids = _pool()
    full = student_of(fp)
    fit_blocks(full, fp, ids, train=_block_train(4), batch_size=4, work=tmp_path / "a")
    resumed = student_of(fp)
    work = tmp_path / "b"
    fit_blocks(student_of(fp), fp, ids, train=_block_train(4), batch_size=4, work=work)
    (work / "block-001.safetensors").unlink()
    result = fit_blocks(resumed, fp, ids, train=_block_train(4), batch_size=4, work=work)
    assert result.blocks_loaded == 1 and result.block_steps == 4
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not (work / "block-001").exists()  # a finished block's checkpoints are removed


def test_pool_loader_is_seeded_resumable_and_covers_each_epoch() -> None:
    ids = torch.arange(10 * 3).reshape(10, 3)
    loader = PoolLoader(ids, 4, seed=5)
    first = [next(loader)["index"] for _ in range(2)]
    assert len(torch.cat(first).unique()) == 8  # 10 rows, batches of 4: two per epoch, leftover dropped
    state = loader.state_dict()
    later = [next(loader)["index"] for _ in range(3)]
    again = PoolLoader(ids, 4, seed=5)
    again.load_state_dict(state)
    assert all(torch.equal(a, next(again)["index"]) for a in later)
    assert torch.equal(next(PoolLoader(ids, 4, seed=5))["input_ids"], ids[first[0]])
    with pytest.raises(ValueError, match="another pool"):
        PoolLoader(ids[:8], 4, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="holds no batch"):
        PoolLoader(ids[:3], 4, seed=5)


def test_sequential_target_validation() -> None:
    assert LayerwiseConfig(target="block_sequential", train=_block_train(3),
                           data=StageData(batch_size=4)).pool_size == 12
    with pytest.raises(ValueError, match="block_sequential only"):
        LayerwiseConfig(target="block", pool_blocks=8)
    with pytest.raises(ValueError, match="multiple of data.batch_size"):
        LayerwiseConfig(target="block_sequential", pool_blocks=10, data=StageData(batch_size=4))
    shared = share_schedule([_block_train(3), _block_train(3)])[0]
    with pytest.raises(ValueError, match="once per block"):
        LayerwiseConfig(target="block_sequential", train=shared)

"""Stage 1.9's block reconstruction (``LayerwiseConfig.target: block``) against a reference built another way, its
locality, and the stage training with it, on every family the student stages take."""

from __future__ import annotations

import pytest
import torch

from bitnet.calibrate import capture_inputs
from bitnet.convert import decoder_layers
from bitnet.objectives import hidden_state_loss
from bitnet.stages.layerwise import LayerwiseConfig, block_reconstruction_loss, layerwise_loss
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

"""The student as a stock transformers checkpoint (model type ``bitnet``, offline BitLinear): it loads with
``AutoModelForCausalLM.from_pretrained``, holds our exact codes and scales, and its logits agree with the student."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from bitnet.convert import BitNetConfig, convert_to_bitnet
from bitnet.export import UnsupportedExportError
from bitnet.export.hf import save_hf_bitnet
from bitnet.layers import BitLinear, set_quant_lambda
from bitnet.quant import ACT_EPS
from tests.test_gguf_export import _student
from tests.test_layers_convert import tiny_model

# measured here (2 layers, hidden 256, FFN 512, 30 STE steps, 2 × 64 held-out tokens): max |Δlogit| 0.0011, mean 1e-5,
# logits of std 2.8, top-1 100 %; bit-identical (0.0) once the student computes in transformers' float order. The
# difference is activation rounding: transformers computes (x_q·codes)/(s·(1/Δ)), we compute (x_q/s)·(Δ·codes); float
# rounding then moves a few x·s across a .5 boundary of the next layer's int8 rounding (docs/export.md).
MAX_ABS_TOL = 0.05
MEAN_ABS_TOL = 0.005
MIN_TOP1 = 0.98


@pytest.fixture(autouse=True)
def _eager_transformers_bitlinear():
    """transformers' BitLinear helpers are ``torch.compile``d: compiling them (inductor, gcc) costs the test time."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture(scope="module")
def student(small_world):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _student(small_world)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_dir(student, small_world, tmp_path_factory):
    return save_hf_bitnet(student, tmp_path_factory.mktemp("hf") / "bitnet", tokenizer=small_world.tokenizer())


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _transformers_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the student's BitLinear evaluate its (identical) math in transformers' float order."""

    def forward(self: BitLinear, x: torch.Tensor) -> torch.Tensor:
        tw = self.ternary_weight()
        s = 127 / x.float().abs().amax(dim=-1, keepdim=True).clamp(min=ACT_EPS)
        xq = (x.float() * s).round().clamp(-128, 127)
        return (F.linear(xq, tw.codes.float()) / (s * torch.tensor([1.0 / tw.scale], dtype=torch.float32))).to(x.dtype)

    monkeypatch.setattr(BitLinear, "quantized_forward", forward)


def test_stock_transformers_loads_the_checkpoint_with_matching_logits(
    student, hf_dir, small_world, monkeypatch
) -> None:
    from transformers.integrations.bitnet import BitLinear as HFBitLinear
    from transformers.integrations.bitnet import unpack_weights

    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["model_type"] == "bitnet" and cfg["hidden_act"] == "silu"
    assert cfg["quantization_config"]["quant_method"] == "bitnet"
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert type(model).__name__ == "BitNetForCausalLM"
    theirs = model.model.layers[1].mlp.down_proj
    assert isinstance(theirs, HFBitLinear) and theirs.weight.dtype == torch.uint8
    tw = student.model.layers[1].mlp.down_proj.ternary_weight()
    assert torch.equal(unpack_weights(theirs.weight, dtype=torch.float32), tw.codes.float())
    assert float(theirs.weight_scale) == pytest.approx(1.0 / tw.scale, rel=1e-7)

    ids = small_world.dataset("test").get_batch([0, 1])
    a, b = _logits(student, ids), _logits(model, ids)
    d = (a - b).abs()
    top1 = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    print(
        f"transformers bitnet vs student: max|Δ| {d.max():.4f} mean|Δ| {d.mean():.5f} top-1 {top1:.3f} "
        f"(std {a.std():.2f})"
    )
    assert d.max() <= MAX_ABS_TOL and d.mean() <= MEAN_ABS_TOL and top1 >= MIN_TOP1

    _transformers_order(monkeypatch)  # same formula, same float order: the two models are the same function
    exact = (_logits(student, ids) - b).abs().max()
    print(f"in transformers' float order: max|Δ| {exact:.2e}")
    assert exact <= 1e-4


def test_the_tokenizer_is_saved_alongside(hf_dir, small_world) -> None:
    from transformers import AutoTokenizer

    text = "The built-in functions"
    assert AutoTokenizer.from_pretrained(hf_dir).encode(text) == small_world.tokenizer().encode(text)


@pytest.mark.parametrize("case", ["subln_all", "lrc", "warmup", "plain"])
def test_what_the_bitnet_model_cannot_express_is_refused(case, tmp_path) -> None:
    base = tiny_model("llama")
    if case == "plain":
        model = base
    elif case == "subln_all":
        model = convert_to_bitnet(base, BitNetConfig(subln="all"))
    elif case == "lrc":
        model = convert_to_bitnet(base, BitNetConfig(lrc_rank=4))
    else:
        model = convert_to_bitnet(base)
        set_quant_lambda(model, 0.5)
    with pytest.raises(UnsupportedExportError, match="transformers 'bitnet'"):
        save_hf_bitnet(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export_writes_the_hf_checkpoint_too(student, small_world, tmp_path) -> None:
    from bitnet.student import save_student
    from flows.cli import main

    save_student(student, tmp_path / "student")  # no tokenizer in the student dir: --tokenizer names the world's
    rc = main(
        [
            "export",
            "--student",
            str(tmp_path / "student"),
            "--out",
            str(tmp_path / "s.gguf"),
            "--tokenizer",
            str(small_world.tokenizer_dir),
            "--hf-out",
            str(tmp_path / "hf"),
        ]
    )
    assert rc == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "s.gguf").is_file()
    ids = small_world.dataset("test").get_batch([0])
    assert (_logits(model, ids) - _logits(student, ids)).abs().max() <= MAX_ABS_TOL

"""GGUF export checked by a real consumer: llama.cpp (llama-cpp-python 0.3.36) loads the files, its logits agree
with the PyTorch student, greedy generation matches, the OpenAI-compatible server answers; our reader rejects
damaged files and the exporter refuses what the ``bitnet`` graph cannot express."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from llama_cpp import Llama
from transformers import AutoModelForCausalLM, LlamaConfig

from bitnet.convert import BitNetConfig, add_lrc, convert_to_bitnet
from bitnet.export import (
    ForeignGGUFWarning,
    GGUFFormatError,
    UnsupportedExportError,
    check_gguf,
    export_gguf,
    read_gguf_checked,
)
from bitnet.export.gguf import tensor_name
from bitnet.export.llamacpp import llama_logits, llama_perplexity, load_llama
from bitnet.layers import BitLinear, bit_linears
from bitnet.quant import act_quant_value
from bitnet.student import save_student
from bitnet.teacher import TinyTeacherConfig, build_tiny_teacher
from flows.cli import build_parser, main
from tests.support import free_port, stop
from tests.test_layers_convert import tiny_model

ROOT = Path(__file__).resolve().parents[1]
# measured on this machine (2 layers, hidden 256, FFN 512, 2 × 64 held-out tokens): TQ2_0 max |Δlogit| ≈ 0.005
# with logits of std ≈ 2.7, top-1 agreement 100 % (docs/export.md); the bounds leave head-room for other CPUs' kernels.
MAX_ABS_TOL = 0.05
MEAN_ABS_TOL = 0.005
MIN_TOP1 = 0.98


def _student(world, *, lrc_rank: int = 0, steps: int = 30) -> torch.nn.Module:
    tok = world.tokenizer()
    torch.manual_seed(0)
    cfg = TinyTeacherConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=256)
    model = convert_to_bitnet(
        build_tiny_teacher(cfg, len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    )
    train, gen = world.dataset("train"), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):  # a few STE steps: sharper logits than a random init, so top-1 means something
        ids = train.get_batch(torch.randint(0, train.num_blocks, (8,), generator=gen))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    if lrc_rank:
        add_lrc(model, lrc_rank)
        with torch.no_grad():
            for _, layer in bit_linears(model):
                layer.lrc_u.normal_(std=0.05)
    return model.eval()


@pytest.fixture(scope="module")
def student(small_world):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; llama.cpp runs with n_threads=1 too
    try:
        yield _student(small_world)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(student, small_world, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    tok = small_world.tokenizer()
    return {
        wt: export_gguf(student, out / f"s-{wt}.gguf", tokenizer=tok, weight_type=wt).path
        for wt in ("tq2_0", "tq1_0", "f16")
    }


@pytest.fixture(scope="module")
def held_out(small_world) -> torch.Tensor:
    return small_world.dataset("test").get_batch([0, 1])


def _llama(path: Path, **kwargs) -> Llama:
    return load_llama(path, n_ctx=256, n_threads=1, **kwargs)


def _llama_logits(llm: Llama, ids: torch.Tensor) -> np.ndarray:
    return llama_logits(llm, ids.tolist())


def _agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    d = np.abs(a - b)
    return float(d.max()), float(d.mean()), float((a.argmax(-1) == b.argmax(-1)).mean())


def _torch_logits(model: torch.nn.Module, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids).logits.numpy()


def test_tq2_logits_agree_with_pytorch_student(student, files, held_out) -> None:
    llm = _llama(files["tq2_0"])
    try:
        max_abs, mean_abs, top1 = _agreement(_llama_logits(llm, held_out), _torch_logits(student, held_out))
        ppl_llama = llama_perplexity(llm, held_out.tolist())
    finally:
        llm.close()
    with torch.no_grad():
        ppl_torch = float(torch.exp(student(input_ids=held_out, labels=held_out).loss))
    print(
        f"TQ2_0 vs PyTorch: max|Δ| {max_abs:.4f} mean|Δ| {mean_abs:.5f} top-1 {top1:.3f}; "
        f"ppl {ppl_llama:.3f} vs {ppl_torch:.3f}"
    )
    assert max_abs <= MAX_ABS_TOL and mean_abs <= MEAN_ABS_TOL and top1 >= MIN_TOP1
    assert ppl_llama == pytest.approx(ppl_torch, rel=1e-3)


def _reference_activations(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Make every BitLinear compute ``Δ·codes`` on activations quantized per 256-block (as llama.cpp's Q8_K) or not at
    all (as llama.cpp's F16 matmul), instead of the student's per-token int8."""

    def forward(self: BitLinear, x: torch.Tensor) -> torch.Tensor:
        if mode == "block256":
            shape = x.shape
            x = act_quant_value(x.reshape(*shape[:-1], shape[-1] // 256, 256)).reshape(shape)
        return F.linear(x, self.ternary_weight().dequantize().to(x.dtype), self.bias)

    monkeypatch.setattr(BitLinear, "quantized_forward", forward)


def test_export_is_exact_up_to_the_activation_block_size(small_world, held_out, tmp_path, monkeypatch) -> None:
    """A random student whose logits the layers dominate, F32 embedding and F32 KV cache: llama.cpp reproduces the
    student computed with per-256-block activation quantization; the per-token student differs by more.

    The reference runs in float64. llama.cpp's ternary matmuls are exact (int8 activations × ternary codes summed in
    integers, then two scales), so what separates it from the float64 reference is float32 rounding in its other ops
    (norms, rope, softmax, the F32 output matmul): a relative 2^-24 per op, about 1e-5 on logits of std ≈ 1.6 —
    bounded here by 1e-3 per position. The only larger difference is a quantization flip: an activation whose
    x·127/max lies within that rounding of a .5 boundary rounds the other way (probability ~2e-5 per value, a few in
    the ~3e5 quantized values of this run); through attention it moves its position and every later one of its row.
    So: the median position (before any flip) agrees to 1e-3, and even counting flipped positions the mean |Δ| is at
    most half the per-token student's, which differs at every position by a whole activation-quantization effect.
    (Measured: median 1.1e-6; with a flip in one row 33 % of positions > 1e-3; a float32 reference would add its own
    flips: mean|Δ| 0.009 against llama.cpp for that reason alone.)"""
    tok = small_world.tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=256,
        initializer_range=0.1,
    )
    model = convert_to_bitnet(AutoModelForCausalLM.from_config(cfg)).eval()
    path = export_gguf(model, tmp_path / "r.gguf", tokenizer=tok, embedding_type="f32").path
    llm = _llama(path, f32_kv_cache=True)
    try:
        out = _llama_logits(llm, held_out)
    finally:
        llm.close()
    per_token = _torch_logits(model.double(), held_out)
    _reference_activations(monkeypatch, "block256")
    block = _torch_logits(model, held_out)
    err_block = np.abs(out - block).reshape(-1, out.shape[-1]).max(-1)  # max |Δlogit| per position
    err_token = np.abs(out - per_token).reshape(-1, out.shape[-1]).max(-1)
    mean_block, mean_token = float(np.abs(out - block).mean()), float(np.abs(out - per_token).mean())
    print(f"per-256-block float64 reference: positions > 1e-3: {(err_block > 1e-3).mean():.3f}, median max|Δ| "
          f"{np.median(err_block):.2e}, mean|Δ| {mean_block:.5f}; per-token: positions > 1e-3: "
          f"{(err_token > 1e-3).mean():.3f}, mean|Δ| {mean_token:.5f}")
    assert np.median(err_block) <= 1e-3 and mean_block <= 0.5 * mean_token
    assert (err_token > 1e-3).mean() >= 0.5


def test_tq1_and_f16_exports_load_and_agree(student, files, held_out, monkeypatch) -> None:
    logits = {}
    for wt in ("tq2_0", "tq1_0", "f16"):
        llm = _llama(files[wt])
        try:
            logits[wt] = _llama_logits(llm, held_out)
        finally:
            llm.close()
    # TQ1_0 holds the same codes and runs the same Q8_K activation path as TQ2_0
    assert np.abs(logits["tq1_0"] - logits["tq2_0"]).max() < 1e-3
    # the F16 file computes Δ·codes on unquantized activations: compare with the student minus activation quantization
    _reference_activations(monkeypatch, "none")
    max_abs, mean_abs, top1 = _agreement(logits["f16"], _torch_logits(student, held_out))
    print(
        f"F16 vs PyTorch without activation quantization: max|Δ| {max_abs:.4f} mean|Δ| {mean_abs:.5f} top-1 {top1:.3f}"
    )
    assert max_abs <= MAX_ABS_TOL and mean_abs <= MEAN_ABS_TOL and top1 >= MIN_TOP1
    sizes = {wt: p.stat().st_size for wt, p in files.items()}
    assert sizes["tq1_0"] < sizes["tq2_0"] < sizes["f16"]


def test_ternary_tensors_hold_the_exact_codes_and_scales(student, files) -> None:
    layer = student.model.layers[1].mlp.down_proj
    tw = layer.ternary_weight()
    for wt in ("tq2_0", "tq1_0", "f16"):
        reader = read_gguf_checked(files[wt], expect_arch="bitnet")
        tensors = {t.name: t for t in reader.tensors}
        w = tensors[tensor_name(gguf.MODEL_TENSOR.FFN_DOWN, 1)]
        codes = gguf.quants.dequantize(np.asarray(w.data), w.tensor_type).reshape(tw.codes.shape)
        assert np.array_equal(codes, tw.codes.numpy().astype(np.float32))
        scale = tensors[tensor_name(gguf.MODEL_TENSOR.FFN_DOWN, 1, "scale")]
        assert scale.tensor_type == gguf.GGMLQuantizationType.F32 and float(scale.data[0]) == np.float32(tw.scale)


def test_tokenizer_and_greedy_generation_match(student, files, small_world, held_out) -> None:
    tok = small_world.tokenizer()
    text = tok.decode(held_out[1].tolist())
    llm = _llama(files["tq2_0"])
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode(), add_bos=True) == tok.encode(
            text
        )  # the HF tokenizer adds no BOS: neither does the GGUF
        prompt = held_out[0, :24].tolist()
        generated = []
        for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            generated.append(t)
            if len(generated) == 8:
                break
    finally:
        llm.close()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, student(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert generated == ids[0, len(prompt) :].tolist()


def test_lrc_adapter_is_applied_by_llama_cpp(small_world, held_out, tmp_path) -> None:
    model = _student(small_world, lrc_rank=8, steps=2)
    tok = small_world.tokenizer()
    with pytest.raises(UnsupportedExportError, match="LRC adapters"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=tok)
    res = export_gguf(model, tmp_path / "lrc.gguf", tokenizer=tok, lora_out=tmp_path / "lrc.lora.gguf")
    adapter = read_gguf_checked(res.lora_path, expect_arch="bitnet")
    assert adapter.get_field("general.type").contents() == "adapter"
    ref = _torch_logits(model, held_out[:1])
    for lora, expect_close in ((res.lora_path, True), (None, False)):
        llm = _llama(res.path, lora=lora)
        try:
            max_abs, _, top1 = _agreement(_llama_logits(llm, held_out[:1]), ref)
        finally:
            llm.close()
        assert (max_abs <= MAX_ABS_TOL and top1 >= MIN_TOP1) == expect_close, (lora, max_abs)


def test_embedding_rows_beyond_the_tokenizer_become_unused_tokens(small_world, tmp_path) -> None:
    tok = small_world.tokenizer()
    cfg = TinyTeacherConfig(intermediate_size=256, num_hidden_layers=1)
    model = convert_to_bitnet(build_tiny_teacher(cfg, len(tok) + 64, bos_token_id=0, eos_token_id=0))
    path = export_gguf(model, tmp_path / "pad.gguf", tokenizer=tok).path
    types = read_gguf_checked(path).get_field("tokenizer.ggml.token_type").contents()
    assert len(types) == len(tok) + 64 and set(types[len(tok) :]) == {int(gguf.TokenType.UNUSED)}
    assert types[tok.eos_token_id] == int(gguf.TokenType.CONTROL)
    llm = _llama(path)
    try:
        assert llm.n_vocab() == len(tok) + 64
    finally:
        llm.close()


def test_reader_rejects_damaged_files(files, tmp_path) -> None:
    good = files["tq2_0"].read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(good[: len(good) - 1000])
    with pytest.raises(GGUFFormatError, match="truncated"):
        read_gguf_checked(tmp_path / "trunc.gguf")
    (tmp_path / "head.gguf").write_bytes(good[:200])
    with pytest.raises(GGUFFormatError, match="not a valid GGUF file"):
        read_gguf_checked(tmp_path / "head.gguf")
    flipped = bytearray(good)
    flipped[-100] ^= 0xFF
    (tmp_path / "flip.gguf").write_bytes(bytes(flipped))
    with pytest.raises(GGUFFormatError, match="corrupted"):
        read_gguf_checked(tmp_path / "flip.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(GGUFFormatError, match="not a valid GGUF file"):
        read_gguf_checked(tmp_path / "junk.gguf")
    with pytest.raises(GGUFFormatError, match="no such GGUF file"):
        read_gguf_checked(tmp_path / "missing.gguf")


def _field_value_offset(path: Path, key: str) -> tuple[int, int]:
    """Byte offset and size of a scalar metadata value in the file."""
    field = gguf.GGUFReader(path).get_field(key)  # GGUF v3 entry: u64 key length, key, u32 type, value
    return field.offset + 8 + len(key.encode()) + 4, field.parts[field.data[0]].nbytes


def test_checksum_covers_metadata_and_its_own_key(files, tmp_path) -> None:
    good = files["tq2_0"]
    assert check_gguf(good).checked
    # a changed metadata value: rms eps 1e-6 → 0.5 (llama.cpp would load it and compute garbage)
    off, size = _field_value_offset(good, "bitnet.attention.layer_norm_rms_epsilon")
    data = bytearray(good.read_bytes())
    data[off : off + size] = np.array([0.5], dtype=np.float32).tobytes()
    (tmp_path / "eps.gguf").write_bytes(bytes(data))
    assert gguf.GGUFReader(tmp_path / "eps.gguf").get_field("bitnet.attention.layer_norm_rms_epsilon").contents() == 0.5
    with pytest.raises(GGUFFormatError, match="corrupted"):
        read_gguf_checked(tmp_path / "eps.gguf")
    # one flipped bit in the checksum key's name: the file is still recognised as ours and refused
    raw = good.read_bytes()
    for key, bit in ((b"bitdistill.sha256", 0x01), (b"bitdistill.sha256", 0x20), (b"bitdistill.producer", 0x02)):
        pos = raw.index(key) + 3
        flipped = bytearray(raw)
        flipped[pos] ^= bit
        (tmp_path / "key.gguf").write_bytes(bytes(flipped))
        with pytest.raises(GGUFFormatError, match="corrupted"):
            read_gguf_checked(tmp_path / "key.gguf")


def test_foreign_gguf_is_read_with_a_warning_never_as_checked(tmp_path) -> None:
    w = gguf.GGUFWriter(tmp_path / "foreign.gguf", "llama")
    w.add_block_count(0)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.warns(ForeignGGUFWarning, match="foreign"):
        result = check_gguf(tmp_path / "foreign.gguf")
    assert not result.checked and result.status == "foreign"
    with pytest.warns(ForeignGGUFWarning), pytest.raises(GGUFFormatError, match="no bitdistill checksum"):
        read_gguf_checked(tmp_path / "foreign.gguf", require_checksum=True)


def _odd_dims() -> torch.nn.Module:
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return convert_to_bitnet(AutoModelForCausalLM.from_config(cfg))


def _q6k_odd_width(world, tmp_path):
    return export_gguf(_odd_dims(), tmp_path / "m.gguf", tokenizer=world.tokenizer(), embedding_type="q6_k")


def _untied(world) -> torch.nn.Module:
    tok = world.tokenizer()
    m = build_tiny_teacher(
        TinyTeacherConfig(intermediate_size=256, num_hidden_layers=1), len(tok), bos_token_id=0, eos_token_id=0
    )
    m.config.tie_word_embeddings = False
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone() + 1.0)
    return convert_to_bitnet(m)


UNSUPPORTED = {
    "untied": (_untied, "untied.*--subln none"),
    "qwen2": (lambda w: convert_to_bitnet(tiny_model("qwen2")), "q/k/v projection biases.*--subln none.*HF export"),
    "qwen3": (lambda w: convert_to_bitnet(tiny_model("qwen3")), "per-head q/k norms.*--subln none.*HF export"),
    "subln-all": (lambda w: convert_to_bitnet(tiny_model("llama"), BitNetConfig(subln="all")),
                  "SubLN 'all'.*--subln none"),
    "lambda": (lambda w: convert_to_bitnet(tiny_model("llama"), BitNetConfig(quant_lambda=0.5)), "quant_lambda"),
    "not-converted": (lambda w: tiny_model("llama"), "not a converted BitNet student"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_models_get_a_clear_error(case: str, small_world, tmp_path) -> None:
    build, pattern = UNSUPPORTED[case]
    with pytest.raises(UnsupportedExportError, match=pattern) as info:
        export_gguf(build(small_world), tmp_path / "m.gguf", tokenizer=small_world.tokenizer())
    assert "\n" not in str(info.value) and str(info.value).startswith("cannot export to llama.cpp")
    assert not list(tmp_path.iterdir())


def test_bad_options_get_a_clear_error(small_world, tmp_path) -> None:
    with pytest.raises(UnsupportedExportError, match="Q6_K|multiple of 256"):
        _q6k_odd_width(small_world, tmp_path)
    with pytest.raises(UnsupportedExportError, match="weight_type must be one of"):
        export_gguf(_odd_dims(), tmp_path / "m.gguf", tokenizer=small_world.tokenizer(), weight_type="q2_0")
    assert not list(tmp_path.iterdir())
    (tmp_path / "d.gguf").mkdir()
    with pytest.raises(UnsupportedExportError, match="is a directory"):
        export_gguf(_odd_dims(), tmp_path / "d.gguf", tokenizer=small_world.tokenizer())
    assert [p.name for p in tmp_path.iterdir()] == ["d.gguf"] and not list((tmp_path / "d.gguf").iterdir())


def test_rows_tq_cannot_hold_get_an_exact_fallback(small_world, tmp_path) -> None:
    """hidden 128: q/k/v/o/gate/up rows of 128 values go to Q4_0 codes {7, 8, 9}; ffn_down (256) stays TQ2_0."""
    model = _odd_dims()
    res = export_gguf(model, tmp_path / "m.gguf", tokenizer=small_world.tokenizer())
    types = {t.name: t.type for t in res.plan.ternary()}
    assert types[tensor_name(gguf.MODEL_TENSOR.FFN_DOWN, 0)] == "TQ2_0"
    assert types[tensor_name(gguf.MODEL_TENSOR.ATTN_Q, 0)] == "Q4_0"
    assert "| blk.0.attn_q.weight | 128 × 128 | Q4_0 | 4.5 |" in res.plan.table()
    tensors = {t.name: t for t in read_gguf_checked(res.path).tensors}
    t = tensors[tensor_name(gguf.MODEL_TENSOR.ATTN_Q, 0)]
    codes = model.model.layers[0].self_attn.q_proj.ternary_weight().codes.numpy().astype(np.float32)
    assert np.array_equal(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(codes.shape), codes)
    llm = _llama(res.path)
    llm.close()


def test_failed_write_keeps_the_previous_file(student, small_world, tmp_path, monkeypatch) -> None:
    out = export_gguf(student, tmp_path / "m.gguf", tokenizer=small_world.tokenizer()).path
    before = out.read_bytes()

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(student, out, tokenizer=small_world.tokenizer(), weight_type="tq1_0")
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


KEY = "test-key-0123"  # BITDISTILL_SERVE_API_KEY of the test server
AUTH = {"Authorization": f"Bearer {KEY}"}


def _post(url: str, body: dict | bytes, headers: dict[str, str] = AUTH) -> dict:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _http_error(url: str, body: dict | bytes, headers: dict[str, str] = AUTH) -> tuple[int, str]:
    with pytest.raises(urllib.error.HTTPError) as info:
        _post(url, body, headers)
    return info.value.code, info.value.read().decode()


def test_stage_outputs_are_accepted_where_a_model_is(student, small_world, tmp_path, capsys) -> None:
    """A stage's output directory (the student in ``model/``, the export's ``student.gguf``) works wherever the README
    says a model goes: ``export --student``, ``eval --model``, ``eval --gguf`` and ``serve`` (resolved to its files)."""
    from bitnet.cli import export_files
    from bitnet.evaluate import load_model_for_eval
    from bitnet.stages.export import GGUF_NAME, LORA_NAME

    stage = tmp_path / "kd"
    save_student(student, stage / "model", tokenizer=small_world.tokenizer())
    (stage / "metrics.json").write_text("{}")
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    assert main(["export", "--student", str(stage), "--out", str(export_dir / GGUF_NAME)]) == 0, capsys.readouterr()
    capsys.readouterr()
    assert load_model_for_eval(stage).bitnet_config == student.bitnet_config
    out = tmp_path / "results.json"
    rc = main(["eval", "--model", str(stage), "--world", str(small_world.root), "--tasks", "", "--max-blocks", "1",
               "--gguf", str(export_dir), "--eval-dir", str(tmp_path / "eval"), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert set(json.loads(out.read_text())["perplexity"]) >= {"pytorch", "llama.cpp"}
    assert export_files(export_dir, None) == (export_dir / GGUF_NAME, None)
    (export_dir / LORA_NAME).write_bytes(b"")
    assert export_files(export_dir, None) == (export_dir / GGUF_NAME, export_dir / LORA_NAME)
    assert export_files(export_dir / GGUF_NAME, export_dir) == (export_dir / GGUF_NAME, export_dir / LORA_NAME)


def test_cli_export_and_serve(student, small_world, tmp_path, capsys) -> None:
    for argv in (["export", "--help"], ["serve", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(argv)
        assert exit_info.value.code == 0
    capsys.readouterr()
    save_student(student, tmp_path / "student", tokenizer=small_world.tokenizer())
    gguf_path = tmp_path / "s.gguf"
    assert main(["export", "--student", str(tmp_path / "student"), "--out", str(gguf_path)]) == 0
    assert json.loads(capsys.readouterr().out)["type"] == "tq2_0"
    assert main(["export", "--student", str(tmp_path / "nope"), "--out", str(gguf_path)]) == 2
    (tmp_path / "bad.gguf").write_bytes(gguf_path.read_bytes()[:5000])
    assert main(["serve", str(tmp_path / "bad.gguf"), "--port", "1"]) == 2
    assert "truncated" in capsys.readouterr().err

    prompt = "The built-in functions"
    tok = small_world.tokenizer()
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():  # the PyTorch student's greedy continuation is the expected answer
        for _ in range(6):
            ids = torch.cat([ids, student(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    expected = tok.decode(ids[0, -6:].tolist())
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BITDISTILL_SERVE_API_KEY": KEY}
    log = tmp_path / "server.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bitnet.cli",
                "serve",
                str(gguf_path),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--threads",
                "1",
            ],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                req = urllib.request.Request(f"{base}/v1/models", headers=AUTH)
                with urllib.request.urlopen(req, timeout=2) as r:
                    models = json.loads(r.read())
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up in 60 s"
                time.sleep(0.3)
        assert models["data"][0]["id"] == "s"
        answer = _post(
            f"{base}/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0.0, "repeat_penalty": 1.0}
        )
        assert answer["object"] == "text_completion"
        assert answer["choices"][0]["text"] == expected and answer["usage"]["completion_tokens"] >= 1
        # bad requests: 4xx with a one-line reason, no traceback, no install path
        url = f"{base}/v1/completions"
        for body, reason in ((b'{"prompt": "x",', "not valid JSON"), (b"[1, 2]", "JSON object"),
                             ({"prompt": prompt, "max_tokens": "many"}, "max_tokens")):
            code, text = _http_error(url, body)
            assert code == 400 and reason in text, text
            assert "Traceback" not in text and str(ROOT) not in text and "site-packages" not in text
        assert _http_error(url, {"prompt": prompt}, headers={})[0] == 401  # the API key is required
        # a busy port is refused before the model loads (the server above holds it)
        started = time.monotonic()
        assert main(["serve", str(gguf_path), "--port", str(port)]) == 2
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err and time.monotonic() - started < 10
    finally:
        stop(proc, timeout=20)


def _bpe_tokenizer(pre, decoder, *, byte_fallback: bool, byte_tokens: bool):
    """A small real `tokenizers` BPE wrapped as a transformers fast tokenizer (vocab: the 256 byte symbols)."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + ["Ġt", "Ġth"])}
    if byte_tokens:
        vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    tok = Tokenizer(BPE(vocab, [("Ġ", "t"), ("Ġt", "h")], byte_fallback=byte_fallback))
    tok.pre_tokenizer, tok.decoder = pre, decoder
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=symbols[0])


def test_vocab_pre_tokenizer_and_byte_level_checks() -> None:
    from tokenizers import decoders, pre_tokenizers

    from bitnet.export.vocab import vocab_metadata

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    gguf_style = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.ByteLevel()])
    # what transformers rebuilds from a GGUF `gpt2` vocabulary: byte_fallback with nothing to fall back to
    tok = _bpe_tokenizer(byte_level, gguf_style, byte_fallback=True, byte_tokens=False)
    assert vocab_metadata(tok, len(tok)).pre == "gpt-2"
    # SmolLM's own tokenizer.json: single digits first, then the GPT-2 regex (llama.cpp's "smollm" regexes)
    smollm = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok = _bpe_tokenizer(smollm, decoders.ByteLevel(), byte_fallback=False, byte_tokens=False)
    assert vocab_metadata(tok, len(tok)).pre == "smollm"
    assert vocab_metadata(tok, len(tok), tokenizer_pre="gpt-2").pre == "gpt-2"  # an explicit name wins
    # <0xNN> tokens that byte_fallback really uses: llama.cpp's gpt2 model would tokenize differently
    tok = _bpe_tokenizer(byte_level, gguf_style, byte_fallback=True, byte_tokens=True)
    with pytest.raises(UnsupportedExportError, match="only byte-level BPE"):
        vocab_metadata(tok, len(tok))
    # an unknown pre-tokenizer is not guessed
    tok = _bpe_tokenizer(pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), byte_level]), decoders.ByteLevel(),
                         byte_fallback=False, byte_tokens=False)
    with pytest.raises(UnsupportedExportError, match="pass tokenizer_pre"):
        vocab_metadata(tok, len(tok))

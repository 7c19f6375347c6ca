"""Real model shapes through convert → export → llama.cpp, each with and without SubLN: SmolLM2-135M (SubLN standard →
``bitnet`` graph, rows of 576 → exact Q4_0; SubLN none → ``llama``), Qwen2.5-0.5B (→ ``qwen2``: q/k/v biases, rows of
896), Qwen3-0.6B (→ ``qwen3``: q/k norms, head_dim 128 ≠ 1024/16), Llama-3.2-1B (→ ``llama``: llama3 RoPE scaling as
``rope_freqs``, permuted Q/K rows), Mistral-7B (→ ``llama``, 4096 wide, untied) and an untied plain-RoPE Llama
(→ ``llama`` with ``output``), each with its real widths, head counts, biases, norms and RoPE settings, 2 layers, the
small test vocabulary and random weights (biases and norm weights randomised too, so that a graph that ignored them
would fail). The SubLN students of the last five have no stock llama.cpp graph (docs/export.md): the test checks that
they are refused from the config alone (before training) and at export, for the same reason.

**Tolerance, derived.** The reference is the PyTorch student with every activation quantized the way llama.cpp's CPU
matmul quantizes it for that tensor's type (:func:`_emulate`: Q8_K = int8 per 256 values with the fp32 scale
``-max/127`` for TQ types, Q8_0 = int8 per 32 values with an fp16 scale for Q4_0/Q8_0), with the same Δ (fp16-rounded
where it is folded into block scales), the file written with an F32 embedding and read with an F32 KV cache. What
llama.cpp then still does differently is float32 rounding order (relative ~1e-7–1e-6 per operation). By itself that
moves logits by ~1e-6 — **but** when it moves an activation across an int8 rounding boundary ("a flip", probability
≈ 127 × relative error per value, a few per forward pass at these widths) that value changes by one quantization step,
and through attention a flip at position t perturbs every later position by a fraction of the whole activation-
quantization effect ``E = mean|reference − unquantized|`` (flips re-draw part of that noise; measured 0.02–0.3·E,
and fp32-vs-fp64 PyTorch differs by 0.1–0.14·E the same way). So:

- **position 0** of each row attends only to itself; without a flip llama.cpp matches there to float rounding
  (measured ≈ 1e-6 against E₀ ≈ 0.02–0.05, E₀ the effect at position 0), with one it can be off by a sizeable part
  of E₀ (measured once in ~16 rows: 0.16·E₀). So the **median over 6 rows** of the position-0 error must be
  ``≤ 0.01 × E₀`` (it fails only if 3 of 6 rows flip). The per-token student differs from llama.cpp by ≈ 1.7·E₀ there,
  so this separates the right arithmetic from the wrong one;
- **all positions**: ``mean|llama − reference| ≤ 0.5 × E`` (a flip re-draws at most the noise of what follows it),
  and top-1 agreement ≥ 90 % (near-ties among 512 random logits).

Why the reference must emulate llama.cpp's activation quantization, and what made the 2,048-wide Llama-3.2-1B shape
look worse than the others when compared with the plain per-token PyTorch student: the student quantizes each token's
whole row with one int8 scale, llama.cpp every 256 (Q8_K) or 32 (Q8_0) values with its own. The two quantizers
differ by a fraction of E, and E grows with the number of quantized products a logit sums over. Measured with the
same files against the per-token student (centred-logit relative error, top-1): SmolLM2 576 wide 0.034 / 0.93,
Qwen2.5 896 0.049 / 0.93, Qwen3 1024 0.043 / 0.94, Llama-3.2-1B 2048 0.062 / 0.82, untied Llama 2048 0.060 / 0.89,
Mistral 4096 0.073 / 0.85 — the error grows with width, as a quantizer difference does; against the emulated
reference every shape agrees within the bounds below (ratios 0.07–0.25, top-1 ≥ 0.96; docs/export.md, "Agreement").
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from bitnet.convert import BitNetConfig, convert_to_bitnet
from bitnet.export import (
    UnsupportedExportError,
    export_gguf,
    plan_export,
    read_gguf_checked,
)
from bitnet.export.llamacpp import llama_logits, load_llama
from bitnet.export.plan import activation_blocks, permute_rows, row_permutation
from bitnet.families import family_for
from bitnet.families.exportable import StudentNotExportableError, check_student_exportable
from bitnet.layers import BitLinear, bit_linears
from bitnet.student import save_student
from kernels.quant import expand_scales

POS0_BOUND = 0.01  # median over rows, × the activation-quantization effect at position 0 (module docstring)
RATIO_BOUND = 0.5  # × the activation-quantization effect over all positions (module docstring)
MIN_TOP1 = 0.9


def _common(vocab: int) -> dict:
    return {"vocab_size": vocab, "num_hidden_layers": 2, "tie_word_embeddings": True, "hidden_act": "silu",
            "initializer_range": 0.05, "bos_token_id": 0, "eos_token_id": 0}


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# name: (config factory, {SubLN placement: the graph it exports to, or None: refused before training and at export})
SHAPES = {
    "smollm2-135m": (
        lambda v: LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                              rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192, **_common(v)),
        {"standard": "bitnet", "none": "llama"}),
    "qwen2.5-0.5b": (
        lambda v: Qwen2Config(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                              rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
                              use_sliding_window=False, **_common(v)),
        {"standard": None, "none": "qwen2"}),
    "qwen3-0.6b": (
        lambda v: Qwen3Config(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                              head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960,
                              **_common(v)),
        {"standard": None, "none": "qwen3"}),
    "llama-3.2-1b": (
        lambda v: LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                              rms_norm_eps=1e-5, max_position_embeddings=131072, rope_parameters=dict(LLAMA3_ROPE),
                              **_common(v)),
        {"standard": None, "none": "llama"}),
    # Mistral-7B-v0.3's widths (4096, FFN 14336, 32/8 heads, θ 1e6, no sliding window, untied), 2 layers
    "mistral-7b": (
        lambda v: MistralConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                num_key_value_heads=8, rope_theta=1000000.0, rms_norm_eps=1e-5,
                                max_position_embeddings=32768, sliding_window=None,
                                **{**_common(v), "tie_word_embeddings": False}),
        {"standard": None, "none": "llama"}),
    # an untied Llama with plain RoPE (Llama 2 style; TinyLlama's widths: 2048, FFN 5632, 32/4 heads)
    "llama-untied": (
        lambda v: LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                              rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=2048,
                              **{**_common(v), "tie_word_embeddings": False}),
        {"standard": None, "none": "llama"}),
}
# weight scales of a student: BitNet's per-tensor absmean, or one scale per export block of a row (issue #21)
SCALES = {
    "tensor": {},
    "group-mse": {"weight_scale": "group", "scale_rule": "mse"},
    "group-learned": {"weight_scale": "group", "scale_rule": "learned"},
}
CASES = [(shape, subln, "tensor") for shape, (_, graphs) in SHAPES.items() for subln in graphs] + [
    ("smollm2-135m", "standard", "group-learned"),  # 576-wide rows: groups of 64 in Q4_0; 1536: 256 in TQ2_0
    ("qwen2.5-0.5b", "none", "group-mse"),  # 896 = 3.5 × 256: Q4_0 with groups of 64; q/k/v biases
    ("llama-3.2-1b", "none", "group-learned"),  # every row a multiple of 256: TQ2_0, one scale per block
]


def build_student(shape: str, vocab: int, subln: str, *, narrow: bool = False, scales: str = "tensor"
                  ) -> torch.nn.Module:
    """The shape's student; ``narrow``: widths cut to 256 (what refuses a shape — ties, biases, norms, RoPE scaling —
    does not depend on widths, and a refused 7B-wide student need not be built)."""
    factory, _ = SHAPES[shape]
    torch.manual_seed(0)
    cfg = factory(vocab)
    if narrow:
        cfg.update({"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2})
        if getattr(cfg, "head_dim", None):
            cfg.head_dim = min(cfg.head_dim, 64)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # make biases and norm weights matter
                p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
    model = convert_to_bitnet(model, BitNetConfig(subln=subln, **SCALES[scales])).eval()
    with torch.no_grad():  # learned scales away from the MSE rule they start from: the file must hold these
        for _, layer in bit_linears(model):
            if layer.weight_scales is not None:
                layer.weight_scales.mul_(1.0 + 0.2 * torch.rand_like(layer.weight_scales))
    return model


def _q8_K(x: torch.Tensor) -> torch.Tensor:
    """ggml quantize_row_q8_K_ref (the x86 build uses it): per 256 values, iscale = −127/max (signed), round to even."""
    shape = x.shape
    b = x.reshape(-1, 256)
    idx = b.abs().argmax(-1, keepdim=True)
    mx = torch.gather(b, -1, idx)
    one, zero = torch.ones_like(mx), torch.zeros_like(mx)
    iscale = torch.where(mx != 0, torch.tensor(-127.0, dtype=x.dtype) / torch.where(mx != 0, mx, one), zero)
    q = torch.round(iscale * b).clamp(max=127)
    d = torch.where(iscale != 0, 1.0 / torch.where(iscale != 0, iscale, one), zero)
    return (q * d).reshape(shape)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    """ggml quantize_row_q8_0 (AVX2): per 32 values, d = fp16(amax/127), id = 127/amax, round half even."""
    shape = x.shape
    b = x.reshape(-1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    q = torch.where(amax > 0, torch.round(b * (torch.tensor(127.0, dtype=x.dtype) / safe)), torch.zeros_like(b))
    d = (amax / 127.0).half().to(x.dtype)
    return (q * d).reshape(shape)


_EMULATE = {"q8_K": _q8_K, "q8_0": _q8_0, "f16": lambda x: x.half().to(x.dtype), "none": lambda x: x}


def _emulate(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, kinds: dict[str, str], fold: bool) -> None:
    """Every BitLinear computes Δ·codes on its input quantized as ``kinds[name]`` (see _EMULATE)."""
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, BitLinear)}

    def forward(self: BitLinear, x: torch.Tensor) -> torch.Tensor:
        tw = self.ternary_weight()
        if tw.group:  # per-group scales are on the fp16 grid already
            return F.linear(_EMULATE[kinds[names[id(self)]]](x), tw.dequantize().to(x.dtype), self.bias)
        delta = float(np.float16(tw.scale)) if fold else tw.scale
        return F.linear(_EMULATE[kinds[names[id(self)]]](x), tw.codes.to(x.dtype) * delta, self.bias)

    monkeypatch.setattr(BitLinear, "quantized_forward", forward)


def _gguf_to_module_names(model: torch.nn.Module, plan) -> dict[str, str]:
    """BitLinear module name → how llama.cpp quantizes its input (from the plan's types)."""
    from bitnet.convert import decoder_layers
    from bitnet.export.names import LAYER_MATRICES, tensor_name

    blocks = activation_blocks(plan)
    layers_path = next(n for n, m in model.named_modules() if m is decoder_layers(model))
    return {f"{layers_path}.{i}.{path}": blocks[tensor_name(kind, i)]
            for i in range(plan.hparams.n_layer) for path, kind in LAYER_MATRICES.items()}


def _torch_logits(model: torch.nn.Module, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids).logits.numpy()


@pytest.fixture(scope="module")
def tokens(small_world) -> torch.Tensor:
    return small_world.dataset("test").get_batch([0, 1, 2, 3, 4, 5])[:, :12]


@pytest.mark.parametrize(("shape", "subln", "scales"), CASES)
def test_real_shapes_export_load_and_agree(shape, subln, scales, small_world, tokens, tmp_path, monkeypatch) -> None:
    """Every real shape with and without SubLN: exported and run by llama.cpp within the derived bound, or refused
    before training (from the config alone) and at export (on the weights) with the same reason. Students with
    per-group scales (learned or MSE) are written exactly: each block's fp16 scale is its group's scale."""
    tok = small_world.tokenizer()
    factory, graphs = SHAPES[shape]
    expected_arch = graphs[subln]
    cfg = factory(len(tok))
    family = family_for(cfg.model_type)
    refusal = family.export_refusal(cfg, subln)
    if expected_arch is None:
        assert refusal is not None
        with pytest.raises(StudentNotExportableError, match=r"subln=none"):
            check_student_exportable(cfg, subln)
    else:
        assert refusal is None and check_student_exportable(cfg, subln) == expected_arch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_student(shape, len(tok), subln, narrow=expected_arch is None, scales=scales)
        if expected_arch is None:
            with pytest.raises(UnsupportedExportError, match="--subln none") as info:
                plan_export(model)
            assert refusal.split(" (")[0] in str(info.value) and "\n" not in str(info.value)
            return
        if shape == "smollm2-135m":  # the CLI path: a student directory
            save_student(model, tmp_path / "student", tokenizer=tok)
            res = export_gguf(tmp_path / "student", tmp_path / "m.gguf", embedding_type="f32")
        else:
            res = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok, embedding_type="f32")
        plan = res.plan
        assert res.arch == expected_arch and plan.arch == expected_arch
        fold = plan.delta == "fold"
        print(f"\n{shape}: {plan.table()}")

        # the file holds exactly Δ·codes (fp16(Δ) where Δ is folded into the block scales)
        reader = read_gguf_checked(res.path, expect_arch=expected_arch)
        tensors = {t.name: t for t in reader.tensors}
        from bitnet.convert import decoder_layers
        from bitnet.export.names import LAYER_MATRICES, tensor_name

        for i, block in enumerate(decoder_layers(model)):
            for path, kind in LAYER_MATRICES.items():
                tw = block.get_submodule(path).ternary_weight()
                codes = tw.codes.numpy()
                heads = row_permutation(plan.hparams, path)
                if heads is not None:
                    codes = permute_rows(codes, heads)
                t = tensors[tensor_name(kind, i)]
                values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(codes.shape)
                if tw.group:
                    d = expand_scales(tw.scales, tw.group, tw.codes.shape).numpy()
                    d = permute_rows(d, heads) if heads is not None else d
                else:
                    d = np.float32(np.float16(tw.scale)) if fold else np.float32(1.0)
                assert np.array_equal(values, codes.astype(np.float32) * d), (shape, t.name, t.tensor_type.name)
                if not fold:
                    assert float(tensors[tensor_name(kind, i, "scale")].data[0]) == np.float32(tw.scale)
        assert set(plan.type_counts()) <= {"TQ2_0", "Q4_0"}

        llm = load_llama(res.path, n_ctx=64, n_threads=1, f32_kv_cache=True)
        try:
            out = llama_logits(llm, tokens.tolist())
        finally:
            llm.close()
        kinds = _gguf_to_module_names(model, plan)
        _emulate(model, monkeypatch, kinds, fold)
        ref = _torch_logits(model, tokens)
        _emulate(model, monkeypatch, dict.fromkeys(kinds, "none"), fold)
        unquantized = _torch_logits(model, tokens)
    finally:
        torch.set_num_threads(threads)
    _assert_agree(shape, out, ref, unquantized)
    print(f"{shape}: {res.file_bytes / 1e6:.1f} MB")


def _assert_agree(label: str, out: np.ndarray, ref: np.ndarray, unquantized: np.ndarray) -> float:
    err0 = float(np.median(np.abs(out[:, 0] - ref[:, 0]).mean(-1)))
    effect0 = float(np.abs(ref[:, 0] - unquantized[:, 0]).mean())
    err, effect = float(np.abs(out - ref).mean()), float(np.abs(ref - unquantized).mean())
    top1 = float((out.argmax(-1) == ref.argmax(-1)).mean())
    print(f"{label}: position 0: median mean|llama.cpp − ref| {err0:.2e} vs quantization effect {effect0:.4f}; "
          "all positions: "
          f"{err:.5f} (max {np.abs(out - ref).max():.4f}) vs {effect:.5f}, ratio {err / effect:.3f}; top-1 {top1:.3f}; "
          f"logit std {ref.std():.2f}")
    assert err0 <= POS0_BOUND * effect0 and err <= RATIO_BOUND * effect and top1 >= MIN_TOP1
    return err


def test_unexpressible_combination_names_both_ways_out(small_world) -> None:
    factory, _ = SHAPES["qwen2.5-0.5b"]
    cfg = factory(256)
    cfg.update({"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1})
    model = convert_to_bitnet(AutoModelForCausalLM.from_config(cfg), BitNetConfig(subln="standard"))
    with pytest.raises(UnsupportedExportError) as info:
        plan_export(model)
    msg = str(info.value)
    assert "\n" not in msg and "--subln none" in msg and "HF export" in msg and "qwen2" in msg


def _small(arch: str, vocab: int, **over) -> torch.nn.Module:
    small = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 256, **_common(vocab)}
    cfgs = {
        "llama": lambda: LlamaConfig(rope_theta=10000.0, rms_norm_eps=1e-5, **small),
        "qwen2": lambda: Qwen2Config(use_sliding_window=False, **small),
        "qwen3": lambda: Qwen3Config(head_dim=128, **small),
    }
    cfg = cfgs[arch]()
    cfg.update(over)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_lrc_adapter_for_native_graphs(arch, small_world, tokens, tmp_path, monkeypatch) -> None:
    """An LRC student without SubLN ships as a native GGUF + LoRA adapter (llama: Q/K rows of lora_b permuted; qwen2: Δ
    folded, lora_b = U; llama/qwen3: Δ in .scale, ffn_up/gate lora_b = U/Δ) and llama.cpp applies it. The llama student
    also has an untied lm_head (output.weight)."""
    from bitnet.convert import add_lrc
    from bitnet.layers import bit_linears

    tok = small_world.tokenizer()
    over = {"tie_word_embeddings": False} if arch == "llama" else {}
    model = convert_to_bitnet(_small(arch, len(tok), **over), BitNetConfig(subln="none"))
    if arch == "llama":
        with torch.no_grad():
            model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 0.05)
    add_lrc(model, 8)
    with torch.no_grad():
        for _, layer in bit_linears(model):
            layer.lrc_u.normal_(std=0.05)
    model.eval()
    res = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok, embedding_type="f32",
                      lora_out=tmp_path / "m.lora.gguf")
    assert res.arch == arch and read_gguf_checked(res.lora_path).get_field("general.architecture").contents() == arch
    if arch == "llama":
        assert "output.weight" in {t.name for t in res.plan.tensors}
    outs = {}
    for lora in (res.lora_path, None):
        llm = load_llama(res.path, lora=lora, n_ctx=64, n_threads=1, f32_kv_cache=True)
        try:
            outs[lora is not None] = llama_logits(llm, tokens.tolist())
        finally:
            llm.close()
    kinds = _gguf_to_module_names(model, res.plan)
    fold = res.plan.delta == "fold"
    _emulate(model, monkeypatch, kinds, fold)
    ref = _torch_logits(model, tokens)
    _emulate(model, monkeypatch, dict.fromkeys(kinds, "none"), fold)
    err = _assert_agree(f"{arch} + LRC", outs[True], ref, _torch_logits(model, tokens))
    err_without = float(np.abs(outs[False] - ref).mean())
    print(f"{arch} + LRC: without the adapter mean|Δ| {err_without:.5f}")
    assert err_without > 4 * err


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_hf_export_of_any_student_is_loaded_by_transformers(arch, small_world, tokens, tmp_path) -> None:
    """The reference form: qwen2 + SubLN standard + LRC (no llama.cpp graph) and llama + SubLN all load in transformers
    with the student's logits (same math, same float order: equal up to the fp32 rounding of one code path)."""
    from transformers import AutoModelForCausalLM as Auto

    from bitnet.convert import add_lrc
    from bitnet.export.hf_student import save_hf

    tok = small_world.tokenizer()
    subln = "standard" if arch == "qwen2" else "all"
    model = convert_to_bitnet(_small(arch, len(tok)), BitNetConfig(subln=subln))
    if arch == "qwen2":
        add_lrc(model, 4)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lrc_u" in n:
                    p.normal_(std=0.05)
    model.eval()
    out, form = save_hf(model, tmp_path / "hf", tokenizer=tok)
    assert form == "remote-code"
    loaded = Auto.from_pretrained(out, trust_remote_code=True).eval()
    a, b = _torch_logits(model, tokens), _torch_logits(loaded, tokens)
    print(f"{arch}: HF export vs student max|Δ| {np.abs(a - b).max():.2e}")
    # identical formulas; the student's λ = 1 path goes through kernels/reference.py, which is bit-identical to
    # F.linear(act_quant(x), weight_quant(w)) — allow fp32 reassociation only (1e-4 of logits of std ~1)
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("etype", ["q8_0", "q6_k"])
def test_quantized_embedding_is_what_llama_cpp_uses(etype, small_world, tokens, tmp_path, monkeypatch) -> None:
    """Token embedding = output matrix as Q8_0 / Q6_K: llama.cpp looks rows up dequantized and, for the output matmul,
    quantizes the final hidden state like any Q8_0 (per 32) / Q6_K (Q8_K, per 256) matrix input. The reference does the
    same with the embedding dequantized by ``gguf`` from the file itself, so the same tolerance applies."""
    tok = small_world.tokenizer()
    model = convert_to_bitnet(_small("llama", len(tok)), BitNetConfig(subln="none")).eval()
    res = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok, embedding_type=etype)
    t = {t.name: t for t in read_gguf_checked(res.path).tensors}["token_embd.weight"]
    assert t.tensor_type.name == etype.upper()
    llm = load_llama(res.path, n_ctx=64, n_threads=1, f32_kv_cache=True)
    try:
        out = llama_logits(llm, tokens.tolist())
    finally:
        llm.close()
    deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    deq = torch.from_numpy(deq.reshape(model.lm_head.weight.shape))
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(deq)  # tied: the lm_head too
    act = _q8_0 if etype == "q8_0" else _q8_K
    head = model.lm_head
    monkeypatch.setattr(head, "forward", lambda x: F.linear(act(x), head.weight))
    kinds = _gguf_to_module_names(model, res.plan)
    _emulate(model, monkeypatch, kinds, fold=False)
    ref = _torch_logits(model, tokens)
    monkeypatch.setattr(head, "forward", lambda x: F.linear(x, head.weight))
    _emulate(model, monkeypatch, dict.fromkeys(kinds, "none"), fold=False)
    _assert_agree(f"embedding {etype}", out, ref, _torch_logits(model, tokens))

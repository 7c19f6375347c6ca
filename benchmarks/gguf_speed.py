"""GGUF size and llama.cpp speed of a 0.5B-class BitNet student: TQ2_0 and TQ1_0 against F16, in one run.

The student has the shapes of a 0.5B-class Llama (hidden 1024, 24 layers, 16 query / 4 KV heads of 64, SwiGLU
intermediate 2816 = 11·256, vocabulary 32000, tied embeddings: 341 M parameters, 308 M of them ternary) with random
weights — speed does not depend on training. It is converted (``convert_to_bitnet``, SubLN ``standard``) and
exported by ``bitnet.export.export_gguf`` three times, from the same ternary codes and scales:

- ``tq2_0``: ternary matrices as TQ2_0 (2.0625 bits/weight), token embedding (= lm_head) F16;
- ``tq1_0``: ternary matrices as TQ1_0 (1.6875 bits/weight), token embedding F16;
- ``f16``: the same codes as F16 — what an unquantized model of these shapes costs llama.cpp.

llama.cpp (llama-cpp-python 0.3.36) then loads all three and measures, interleaved round by round so that load
from other processes hits every file alike:

- prompt processing (pp): one ``eval`` of ``--prompt`` tokens from an empty KV cache (one batch);
- decode (tg): ``--decode`` single-token ``eval`` calls after that prompt.

Per thread count (``--threads 2 1``), the table reports each file's median (best) wall-clock tokens/s over
``--rounds`` rounds (after one warm-up round; the order of the files alternates between rounds) and, as the ratio
to F16, the median over rounds of the per-round ratio: the three files of a round run seconds apart, so on a
shared machine a pair sees about the same load. It also reports the ratio of tokens per CPU-second of the process
(all llama.cpp threads), which does not count the time the process waited for a core.
The vocabulary is a small byte-level BPE padded to 32000 entries (ids are fed directly; tokenization is not timed).

    python benchmarks/gguf_speed.py [--threads 2 1] [--prompt 64] [--decode 16] [--rounds 7] [--keep DIR]
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitnet.convert import convert_to_bitnet  # noqa: E402
from bitnet.data import train_bpe_tokenizer  # noqa: E402
from bitnet.export import ExportResult, export_gguf  # noqa: E402
from bitnet.export.llamacpp import load_llama  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 1024, 24, 16, 4, 2816, 32000
TYPES = ("f16", "tq2_0", "tq1_0")


@dataclass
class Speed:
    """Per measured round: wall-clock tokens/s and tokens per CPU-second of this process (all llama.cpp threads)."""

    pp: list[float] = field(default_factory=list)
    tg: list[float] = field(default_factory=list)
    pp_cpu: list[float] = field(default_factory=list)
    tg_cpu: list[float] = field(default_factory=list)


def build_student(hidden: int, layers: int, ffn: int, vocab: int, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised Llama of the given shapes, converted to a BitNet student (fp32, ~1.4 GB at 0.5B)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=hidden // HEADS,
        max_position_embeddings=4096, tie_word_embeddings=True, hidden_act="silu", rms_norm_eps=1e-6,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return convert_to_bitnet(LlamaForCausalLM(cfg)).eval()


def small_tokenizer(out_dir: Path):
    """A byte-level BPE trained on a few sentences; the exporter pads the GGUF vocabulary to the model's 32000 rows."""
    text = ["The quick brown fox jumps over the lazy dog, again and again.", "def main() -> int: return 0"] * 50
    return train_bpe_tokenizer(text, 300, out_dir)


def measure(llm, prompt: list[int], decode: list[int], speed: Speed) -> None:
    """One round from an empty KV cache: prompt processing, then single-token decode steps."""
    llm.reset()
    t0, c0 = time.perf_counter(), time.process_time()
    llm.eval(prompt)
    t1, c1 = time.perf_counter(), time.process_time()
    for tok in decode:
        llm.eval([tok])
    t2, c2 = time.perf_counter(), time.process_time()
    speed.pp.append(len(prompt) / (t1 - t0))
    speed.tg.append(len(decode) / (t2 - t1))
    speed.pp_cpu.append(len(prompt) / max(c1 - c0, 1e-9))
    speed.tg_cpu.append(len(decode) / max(c2 - c1, 1e-9))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[2], help="llama.cpp thread counts to measure (default: 2)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens (default: %(default)s)")
    p.add_argument("--decode", type=int, default=16, help="decoded tokens (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=7, help="measured rounds after one warm-up (default: %(default)s)")
    p.add_argument("--layers", type=int, default=LAYERS, help="decoder layers (default: %(default)s)")
    p.add_argument("--keep", help="write the GGUF files to this directory instead of a temporary one")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, max(args.threads)))

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep) if args.keep else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        model = build_student(HIDDEN, args.layers, FFN, VOCAB)
        n_params = sum(p.numel() for p in model.parameters())
        tok = small_tokenizer(Path(tmp) / "tokenizer")
        t_build = time.perf_counter() - t0
        results: dict[str, ExportResult] = {}
        t_export: dict[str, float] = {}
        for wt in TYPES:
            t = time.perf_counter()
            results[wt] = export_gguf(model, out / f"bench-{wt}.gguf", tokenizer=tok, weight_type=wt)
            t_export[wt] = time.perf_counter() - t
        del model
        gc.collect()

        rng = np.random.default_rng(0)
        prompt = rng.integers(1, VOCAB, size=args.prompt).tolist()
        decode = rng.integers(1, VOCAB, size=args.decode).tolist()
        runs = {n: run_rounds(results, prompt, decode, n, args.rounds) for n in args.threads}

    print(f"# GGUF size and llama.cpp speed — {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"model: hidden {HIDDEN}, {args.layers} layers, heads {HEADS}/{KV_HEADS}, FFN {FFN}, vocab {VOCAB}, tied; "
          f"{n_params / 1e6:.0f} M parameters, {results['f16'].ternary_params / 1e6:.0f} M ternary; built in {t_build:.0f} s; "
          f"export {', '.join(f'{k} {v:.0f} s' for k, v in t_export.items())}")
    print(f"pp: {args.prompt} prompt tokens in one batch; decode: {args.decode} single-token steps; {args.rounds} rounds, "
          f"file order alternating; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    for n, speeds in runs.items():
        print(report(results, speeds, n))
    return 0


def run_rounds(results: dict[str, ExportResult], prompt: list[int], decode: list[int], threads: int, rounds: int
               ) -> dict[str, Speed]:
    """Load the three files with ``threads`` threads and measure ``rounds`` interleaved rounds (after a warm-up)."""
    llms = {wt: load_llama(results[wt].path, n_ctx=len(prompt) + len(decode) + 8, n_threads=threads, logits_all=False)
            for wt in TYPES}
    speeds = {wt: Speed() for wt in TYPES}
    try:
        for wt in TYPES:  # warm-up round: page-ins, caches, thread pools
            measure(llms[wt], prompt, decode, Speed())
        for r in range(rounds):
            for wt in TYPES if r % 2 == 0 else TYPES[::-1]:
                measure(llms[wt], prompt, decode, speeds[wt])
    finally:
        for llm in llms.values():
            llm.close()
    return speeds


def _ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of the per-round ratio a/b: both were measured seconds apart, under the same load."""
    return statistics.median(x / y for x, y in zip(a, b))


def report(results: dict[str, ExportResult], speeds: dict[str, Speed], threads: int) -> str:
    f16, s16 = results["f16"], speeds["f16"]
    lines = [
        f"\n## n_threads={threads}\n",
        "ratios vs F16: median over rounds of the per-round ratio (paired); tok/s: median (best) of the rounds; "
        "CPU: ratio of tokens per CPU-second of the process (all llama.cpp threads), median over rounds\n",
        "| type | file MB | size vs F16 | bits/ternary weight | pp tok/s | pp vs F16 | decode tok/s | decode vs F16 "
        "| pp vs F16 (CPU) | decode vs F16 (CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for wt in TYPES:
        res, sp = results[wt], speeds[wt]
        lines.append(
            f"| {wt.upper()} | {res.file_bytes / 1e6:.1f} | {res.file_bytes / f16.file_bytes:.3f} | "
            f"{res.bits_per_ternary_weight:.4f} | {statistics.median(sp.pp):.1f} ({max(sp.pp):.1f}) | "
            f"{_ratio(sp.pp, s16.pp):.2f}× | {statistics.median(sp.tg):.2f} ({max(sp.tg):.2f}) | "
            f"{_ratio(sp.tg, s16.tg):.2f}× | {_ratio(sp.pp_cpu, s16.pp_cpu):.2f}× | {_ratio(sp.tg_cpu, s16.tg_cpu):.2f}× |")
    checks = {
        "TQ2_0 decode ≥ 2.5× F16": _ratio(speeds["tq2_0"].tg, s16.tg) >= 2.5,
        "TQ2_0 file ≤ 0.25× F16": results["tq2_0"].file_bytes / f16.file_bytes <= 0.25,
        "TQ1_0 ternary bits/weight ≤ 1.7": results["tq1_0"].bits_per_ternary_weight <= 1.7,
    }
    lines.append("")
    lines += [f"- {name}: {'yes' if ok else 'NO'}" for name, ok in checks.items()]
    lines.append("\nall rounds (pp / decode tok/s): " + "; ".join(
        f"{wt}: " + ", ".join(f"{a:.1f}/{b:.2f}" for a, b in zip(speeds[wt].pp, speeds[wt].tg)) for wt in TYPES))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

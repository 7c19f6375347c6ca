"""Offline evaluation data built from a world's held-out test split, and the lm-eval tasks that read it.

``build_eval_data`` writes, under ``out_dir``::

    heldout.jsonl        one {"text": ...} per held-out document (the test split decoded, EOS-separated)
    cloze.jsonl          next-word cloze multiple choice: {"context", "choices", "gold"}
    tasks/*.yaml         the task YAMLs of ``bitnet/eval_tasks/`` with ``dataset_kwargs.data_files`` made absolute
    eval_data.json       what was built (sizes, seed, digest of the split), written last

The YAMLs shipped in ``bitnet/eval_tasks/`` are ordinary lm-eval task configs (``dataset_path: json``) whose
``data_files`` name the files above relative to the data directory; ``TaskManager(include_path=OUT/tasks)`` loads
the rendered copies, so evaluation needs neither the hub nor the original corpus.

Cloze items: a word of at least ``min_word_len`` letters preceded by a single space and by at least
``min_context_chars`` characters of its document; the context is the last ``context_chars`` characters before it
(cut at a word boundary); three distractors are other words of the held-out split about as frequent as the answer
(drawn, seeded, from the ``freq_window`` words on either side of it in the split's frequency ranking), so that
word frequency alone does not pick the answer. lm-eval scores ``context + " " + choice`` for each choice (``acc``
and the length-normalised ``acc_norm``; chance is 25 %).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from bitnet.data import DataError, PackedDataset
from bitnet.io import atomic_dir, sha256_json, write_json_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TASKS_SOURCE = Path(__file__).resolve().parent / "eval_tasks"
HELDOUT_TASK = "bitdistill_heldout"
CLOZE_TASK = "bitdistill_cloze"
LOCAL_TASKS = (HELDOUT_TASK, CLOZE_TASK)
MARKER = "eval_data.json"
_WORD = re.compile(r"(?<=[^\s] )[A-Za-z]+\b")


@dataclass(frozen=True)
class EvalData:
    """A built evaluation directory."""

    root: Path
    info: dict[str, Any]

    @property
    def tasks_dir(self) -> Path:
        return self.root / "tasks"

    @property
    def heldout_file(self) -> Path:
        return self.root / "heldout.jsonl"

    @property
    def cloze_file(self) -> Path:
        return self.root / "cloze.jsonl"

    def heldout_texts(self) -> list[str]:
        return [json.loads(line)["text"] for line in self.heldout_file.read_text(encoding="utf-8").splitlines() if line]


def heldout_documents(
    dataset: PackedDataset, tokenizer: PreTrainedTokenizerBase, max_docs: int | None = None
) -> list[str]:
    """The documents of a packed split, decoded: the token stream cut at EOS (the packer's document separator)."""
    tokens = np.asarray(dataset.tokens, dtype=np.int64)
    cuts = np.flatnonzero(tokens == dataset.eos_token_id)
    docs: list[str] = []
    start = 0
    for end in [*cuts.tolist(), len(tokens)]:
        if end > start:
            text = tokenizer.decode(tokens[start:end].tolist(), skip_special_tokens=True).strip()
            if text:
                docs.append(text)
                if max_docs is not None and len(docs) >= max_docs:
                    break
        start = end + 1
    return docs


def cloze_items(
    texts: list[str],
    n_items: int,
    *,
    seed: int = 0,
    n_choices: int = 4,
    min_word_len: int = 4,
    min_context_chars: int = 200,
    context_chars: int = 400,
    freq_window: int = 20,
) -> list[dict[str, Any]]:
    """Next-word multiple-choice items from ``texts`` (deterministic for a seed)."""
    candidates: list[tuple[int, int, str]] = []
    counts: Counter[str] = Counter()
    for d, text in enumerate(texts):
        for m in _WORD.finditer(text):
            word = m.group(0)
            if len(word) < min_word_len:
                continue
            counts[word] += 1
            if m.start() >= min_context_chars:
                candidates.append((d, m.start(), word))
    ranked = sorted(counts, key=lambda w: (-counts[w], w))  # by frequency: distractors as frequent as the answer
    rank = {w: i for i, w in enumerate(ranked)}
    if len(ranked) < 2 * n_choices or not candidates:
        raise DataError(f"the held-out text is too small for a cloze set ({len(candidates)} candidate positions, "
                        f"{len(ranked)} distinct words)")
    rng = random.Random(seed)
    picks = sorted(rng.sample(range(len(candidates)), min(n_items, len(candidates))))
    items = []
    for i in picks:
        d, pos, word = candidates[i]
        raw = texts[d][max(0, pos - context_chars) : pos - 1]  # the space before the word is lm-eval's target_delimiter
        cut = raw.find(" ") if pos - context_chars > 0 else -1
        context = raw[cut + 1 :] if cut >= 0 else raw
        r, width = rank[word], freq_window
        while True:
            near = [w for w in ranked[max(0, r - width) : r + width + 1] if w.lower() != word.lower()]
            if len(near) >= n_choices - 1 or width >= len(ranked):
                break
            width *= 2
        distractors = rng.sample(near, n_choices - 1)
        choices = [word, *distractors]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "gold": choices.index(word)})
    return items


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def render_tasks(data_dir: Path, out_dir: Path, source: Path = TASKS_SOURCE) -> list[str]:
    """Copy the task YAMLs of ``source`` to ``out_dir``, every ``data_files`` entry made absolute under
    ``data_dir``."""
    names = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in sorted(source.glob("*.yaml")):
        cfg = yaml.safe_load(file.read_text())
        files = cfg.get("dataset_kwargs", {}).get("data_files")
        if isinstance(files, dict):
            cfg["dataset_kwargs"]["data_files"] = {k: str((data_dir / v).resolve()) for k, v in files.items()}
        elif isinstance(files, str):
            cfg["dataset_kwargs"]["data_files"] = str((data_dir / files).resolve())
        (out_dir / file.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
        names.append(cfg["task"])
    return names


def build_eval_data(
    dataset: PackedDataset,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    n_cloze: int = 200,
    max_docs: int | None = None,
    seed: int = 0,
) -> EvalData:
    """Write the held-out texts, the cloze set and the rendered task YAMLs for ``dataset`` (reused when up to date)."""
    root = Path(out_dir)
    tasks_digest = sha256_json({f.name: f.read_text() for f in sorted(TASKS_SOURCE.glob("*.yaml"))})
    settings = {"split_digest": dataset.digest, "n_cloze": n_cloze, "max_docs": max_docs, "seed": seed,
                "tasks_digest": tasks_digest, "version": 2}
    marker = root / MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("settings") == settings and (root / "tasks").is_dir():
            return EvalData(root=root, info=info)
    texts = heldout_documents(dataset, tokenizer, max_docs)
    if not texts:
        raise DataError(f"{dataset.path} holds no held-out text")
    items = cloze_items(texts, n_cloze, seed=seed)
    with atomic_dir(root, marker=MARKER) as tmp:
        _write_jsonl(tmp / "heldout.jsonl", [{"text": t} for t in texts])
        _write_jsonl(tmp / "cloze.jsonl", items)
        tasks = render_tasks(root, tmp / "tasks")
        info = {
            "settings": settings,
            "documents": len(texts),
            "characters": sum(len(t) for t in texts),
            "cloze_items": len(items),
            "tasks": tasks,
        }
        write_json_atomic(tmp / MARKER, info)
    return EvalData(root=root, info=info)

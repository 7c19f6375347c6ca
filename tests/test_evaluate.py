"""``bitdistill eval``: offline lm-eval tasks built from the held-out split, perplexity three ways (our loop, lm-eval's
``loglikelihood_rolling``, llama.cpp on the GGUF), for a BitNet student and for a plain HF model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig

from bitnet.convert import convert_to_bitnet
from bitnet.eval_data import CLOZE_TASK, HELDOUT_TASK, build_eval_data
from bitnet.evaluate import HarnessConfig, evaluate_model, hflm, lm_eval_perplexity
from bitnet.export import export_gguf
from bitnet.student import save_student
from flows.cli import main


def _llama(tok, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def student(small_world):
    return convert_to_bitnet(_llama(small_world.tokenizer())).eval()


@pytest.fixture(scope="module")
def eval_data(small_world, tmp_path_factory):
    return build_eval_data(small_world.dataset("test"), small_world.tokenizer(),
                           tmp_path_factory.mktemp("eval") / "data", n_cloze=40)


def test_eval_data_is_built_from_the_held_out_split(eval_data, small_world) -> None:
    texts = eval_data.heldout_texts()
    assert texts and eval_data.info["documents"] == len(texts)
    tok = small_world.tokenizer()
    stream = small_world.dataset("test").tokens
    assert sum(len(tok.encode(t)) for t in texts) == pytest.approx(len(stream) - len(texts), rel=0.02)
    items = [json.loads(line) for line in eval_data.cloze_file.read_text().splitlines()]
    assert len(items) == 40
    for item in items:
        word = item["choices"][item["gold"]]
        assert len(set(item["choices"])) == 4 and 0 <= item["gold"] < 4
        assert any(f"{item['context']} {word}" in t for t in texts)  # context + " " + answer is the real text
    for name in (HELDOUT_TASK, CLOZE_TASK):
        cfg = yaml.safe_load((eval_data.tasks_dir / f"{name}.yaml").read_text())
        assert cfg["task"] == name and cfg["dataset_path"] == "json"
        assert cfg["dataset_kwargs"]["data_files"]["test"].startswith(str(eval_data.root.resolve()))
    again = build_eval_data(small_world.dataset("test"), tok, eval_data.root, n_cloze=40)
    assert again.info == eval_data.info  # reused, not rebuilt


def test_lm_eval_rolling_perplexity_is_the_plain_cross_entropy(student, small_world) -> None:
    """One window (text shorter than the context): lm-eval's rolling log-likelihood is the CE after the prefix token."""
    tok = small_world.tokenizer()
    ids = small_world.dataset("test").get_batch([0])[0, :50].tolist()
    text = tok.decode(ids)
    ids = tok.encode(text)
    lm = hflm(student, tok, batch_size=4)
    got = lm_eval_perplexity(lm, [text])
    row = torch.tensor([[lm.prefix_token_id, *ids]])
    with torch.no_grad():
        ce = F.cross_entropy(student(input_ids=row).logits[0, :-1], row[0, 1:])
    assert got["tokens"] == len(ids)
    assert got["ppl"] == pytest.approx(math.exp(float(ce)), rel=1e-4)


def test_student_and_its_gguf_evaluate_offline(student, small_world, eval_data, tmp_path) -> None:
    tok = small_world.tokenizer()
    gguf = export_gguf(student, tmp_path / "s.gguf", tokenizer=tok).path
    cfg = HarnessConfig(limit=12, max_blocks=4, batch_size=8, n_cloze=40, threads=1)
    res = evaluate_model(student, tok, small_world.dataset("test"), eval_data.root, cfg, name="student", gguf=gguf,
                         max_blocks=cfg.max_blocks)
    print(res.table())
    ppl = res.perplexity
    assert set(ppl) == {"pytorch", "llama.cpp", "lm-eval rolling"}
    assert ppl["llama.cpp"] == pytest.approx(ppl["pytorch"], rel=1e-2)  # the same blocks, the same model
    assert 0.5 * ppl["pytorch"] < ppl["lm-eval rolling"] < 2 * ppl["pytorch"]  # other windows of the same split
    assert 0.0 <= res.tasks[CLOZE_TASK]["acc"] <= 1.0 and "acc_norm" in res.tasks[CLOZE_TASK]
    held = res.tasks[HELDOUT_TASK]
    assert held["word_perplexity"] > 1 and held["byte_perplexity"] > 1
    assert held["bits_per_byte"] == pytest.approx(math.log2(held["byte_perplexity"]), rel=1e-6)
    table = res.table()
    assert "llama.cpp" in table and CLOZE_TASK in table


def test_cli_evaluates_a_plain_hf_model_and_writes_json(small_world, tmp_path, capsys) -> None:
    tok = small_world.tokenizer()
    teacher_dir = tmp_path / "teacher"
    _llama(tok, seed=1).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    out = tmp_path / "results.json"
    rc = main(["eval", "--model", str(teacher_dir), "--world", str(small_world.root), "--tasks", CLOZE_TASK,
               "--limit", "8", "--max-blocks", "2", "--n-cloze", "20", "--eval-dir", str(tmp_path / "eval"),
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| perplexity" in printed and CLOZE_TASK in printed
    result = json.loads(out.read_text())
    assert set(result["perplexity"]) == {"pytorch", "lm-eval rolling"}
    assert set(result["tasks"]) == {CLOZE_TASK}
    assert result["info"]["config"]["limit"] == 8


def test_cli_eval_errors_are_one_line(small_world, tmp_path, capsys) -> None:
    student_dir = tmp_path / "student"
    save_student(convert_to_bitnet(_llama(small_world.tokenizer())), student_dir)
    rc = main(["eval", "--model", str(student_dir), "--world", str(small_world.root),
               "--gguf", str(tmp_path / "no.gguf")])
    assert rc == 2 and "--gguf file" in capsys.readouterr().err
    rc = main(["eval", "--model", str(student_dir), "--world", str(small_world.root), "--limit", "0"])
    assert rc == 2 and "invalid HarnessConfig: limit" in capsys.readouterr().err

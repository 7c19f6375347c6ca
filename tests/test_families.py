"""The model-family registry: every list derives from it, and the refusal a run makes before training (from the
teacher's config alone) is exactly the refusal the GGUF export makes on the trained student's weights."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from bitnet.convert import BitNetConfig, convert_to_bitnet, supported_architectures
from bitnet.export import UnsupportedExportError, check_exportable
from bitnet.families import FAMILIES, family_for, graph_names, model_types
from bitnet.families.exportable import StudentNotExportableError, check_student_exportable, exportable_placements
from bitnet.plan import MODEL_SHAPES

SMALL = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# family variants that decide a graph: tying, biases, q/k norms, head_dim, RoPE scaling, sliding window
CONFIGS = {
    "llama-tied": lambda: LlamaConfig(**SMALL, tie_word_embeddings=True),
    "llama-untied": lambda: LlamaConfig(**SMALL, tie_word_embeddings=False),
    "llama-bias": lambda: LlamaConfig(**SMALL, tie_word_embeddings=True, attention_bias=True),
    "llama-llama3-rope": lambda: LlamaConfig(**SMALL, tie_word_embeddings=True, rope_parameters=dict(LLAMA3)),
    "llama-head-dim": lambda: LlamaConfig(**SMALL, tie_word_embeddings=True, head_dim=32),
    "mistral-untied": lambda: MistralConfig(**SMALL, sliding_window=None, tie_word_embeddings=False),
    "mistral-tied": lambda: MistralConfig(**SMALL, sliding_window=None, tie_word_embeddings=True),
    "mistral-sliding": lambda: MistralConfig(**SMALL, sliding_window=16, tie_word_embeddings=True),
    "qwen2-tied": lambda: Qwen2Config(**SMALL, tie_word_embeddings=True, use_sliding_window=False),
    "qwen2-untied": lambda: Qwen2Config(**SMALL, tie_word_embeddings=False, use_sliding_window=False),
    "qwen3-tied": lambda: Qwen3Config(**SMALL, head_dim=16, tie_word_embeddings=True),
    "qwen3-untied": lambda: Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=False),
}


def test_every_list_of_families_and_graphs_derives_from_the_registry() -> None:
    from bitnet.cli import build_parser
    from bitnet.export.hf_student import BASES
    from bitnet.pretrained import GGUF_ARCHITECTURES
    from bitnet.stages.export import ExportConfig

    assert set(FAMILIES) >= {"llama", "mistral", "qwen2", "qwen3"}
    assert supported_architectures() == model_types() == sorted(GGUF_ARCHITECTURES)
    assert set(BASES) == set(model_types())
    assert set(graph_names()) == {"bitnet", "llama", "qwen2", "qwen3"}
    parser = build_parser()
    for arch in ("auto", *graph_names()):  # the CLI's --arch choices
        assert parser.parse_args(["export", "--student", "s", "--arch", arch]).arch == arch
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--student", "s", "--arch", "gpt2"])
    for graph in graph_names():
        assert ExportConfig(arch=graph).arch == graph
    with pytest.raises(ValueError, match="arch must be auto or one of bitnet, llama"):
        ExportConfig(arch="gpt2")
    for family in FAMILIES.values():
        for t in family.model_types:
            assert family_for(t) is family


@pytest.mark.parametrize(("name", "subln"), list(itertools.product(sorted(CONFIGS), ("standard", "none", "all"))))
def test_refusal_before_training_equals_the_exports_refusal(name: str, subln: str) -> None:
    cfg = CONFIGS[name]()
    family = family_for(cfg.model_type)
    before = family.export_refusal(cfg, subln)  # type: ignore[arg-type]
    torch.manual_seed(0)
    student = convert_to_bitnet(AutoModelForCausalLM.from_config(cfg), BitNetConfig(subln=subln))  # type: ignore[arg-type]
    if before is None:
        hp = check_exportable(student)
        assert hp.arch == family.graph_for(subln).name  # type: ignore[arg-type]
    else:
        with pytest.raises(UnsupportedExportError) as info:
            check_exportable(student)
        assert before.split(" (")[0] in str(info.value)


def test_the_export_table() -> None:
    """docs/export.md's family × SubLN table, cell by cell."""
    table = {name: exportable_placements(CONFIGS[name]()) for name in CONFIGS}
    assert table["llama-tied"] == {"standard": "bitnet", "none": "llama"}
    assert table["llama-untied"] == table["llama-bias"] == table["llama-llama3-rope"] == {"none": "llama"}
    assert table["llama-head-dim"] == {"none": "llama"}
    assert table["mistral-tied"] == {"standard": "bitnet", "none": "llama"}
    assert table["mistral-untied"] == {"none": "llama"}
    assert table["mistral-sliding"] == {}
    assert table["qwen2-tied"] == table["qwen2-untied"] == {"none": "qwen2"}
    assert table["qwen3-tied"] == table["qwen3-untied"] == {"none": "qwen3"}


@pytest.mark.parametrize("preset_name", sorted(MODEL_SHAPES))
def test_real_presets_produce_an_exportable_student(preset_name: str) -> None:
    from flows.config import preset

    cfg = preset(preset_name)
    shape = dict(MODEL_SHAPES[preset_name])
    teacher = AutoConfig.for_model(shape.pop("model_type"), **shape)
    assert check_student_exportable(teacher, cfg.convert.bitnet.subln, cfg.export.arch) in graph_names()
    # the paper's SubLN recipe is refused for each of them, with the way out named
    with pytest.raises(StudentNotExportableError, match=r"convert\.bitnet\.subln=none") as info:
        check_student_exportable(teacher, "standard", teacher=preset_name)
    assert "\n" not in str(info.value)


def test_unsupported_family_is_refused_with_the_supported_ones() -> None:
    from transformers import GPT2Config

    with pytest.raises(StudentNotExportableError, match="'gpt2' model; supported families: llama, mistral, qwen2"):
        check_student_exportable(GPT2Config(), "none")


def test_bitdistill_run_refuses_an_unexportable_student_before_any_stage(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A local Qwen2 teacher (config only) with the paper's SubLN: refused in one line, nothing written."""
    from flows.cli import main

    teacher = tmp_path / "qwen2-teacher"
    Qwen2Config(**SMALL, tie_word_embeddings=True).save_pretrained(teacher)
    root = tmp_path / "root"
    rc = main(["run", "--root", str(root), "--set", f"teacher.pretrained={teacher}",
               "--set", "convert.bitnet.subln=standard", "--set", "world.seq_len=64"])
    err = capsys.readouterr().err
    assert rc == 2, err
    (line,) = err.strip().splitlines()
    assert line.startswith("bitdistill: error: the qwen2 student of") and "convert.bitnet.subln=none" in line
    assert "q/k/v projection biases" in line
    assert not [p for p in root.rglob("*") if p.is_file()] if root.exists() else True


def test_flow_refuses_before_its_first_stage(tmp_path: Path) -> None:
    from flows.config import pipeline_config
    from flows.preflight import check_export_target

    cfg = pipeline_config(None, "tiny", sets=["convert.bitnet.subln=all"], root=str(tmp_path))
    with pytest.raises(StudentNotExportableError, match="SubLN 'all'.*subln=standard.*subln=none"):
        check_export_target(cfg)
    assert check_export_target(pipeline_config(None, "tiny", root=str(tmp_path))) == "bitnet"
    assert check_export_target(pipeline_config(None, "tiny", sets=["export.enabled=false",
                                                                  "convert.bitnet.subln=all"])) is None
    json.dumps(cfg.model_dump(mode="json"))


def _local_tokenizer(path: Path, pre_tokenizer) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    text = ["the teacher's tokenizer goes into the GGUF, 1234 times"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)
    return path


def test_run_refuses_a_tokenizer_llama_cpp_would_not_reproduce(tmp_path: Path) -> None:
    from tokenizers import pre_tokenizers

    from bitnet.export import UnsupportedExportError
    from flows.config import pipeline_config
    from flows.preflight import check_export_target, check_export_tokenizer

    good = _local_tokenizer(tmp_path / "good", pre_tokenizers.ByteLevel(add_prefix_space=False))
    assert check_export_tokenizer(pipeline_config(None, "tiny", sets=[f"world.tokenizer={good}"])) == "gpt2/gpt-2"
    odd = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bad = _local_tokenizer(tmp_path / "bad", odd)
    cfg = pipeline_config(None, "tiny", sets=[f"world.tokenizer={bad}"])
    with pytest.raises(UnsupportedExportError, match="world's tokenizer .* cannot go into the GGUF.*tokenizer_pre"):
        check_export_target(cfg)
    # the user's override is taken (they know their runtime), and no world tokenizer means the world trains its own
    assert check_export_tokenizer(cfg.model_copy(update={"export": cfg.export.model_copy(
        update={"tokenizer_pre": "gpt-2"})})) == "gpt2/gpt-2"
    assert check_export_tokenizer(pipeline_config(None, "tiny")) is None


def test_run_refuses_blocks_longer_than_the_teachers_positions(tmp_path: Path) -> None:
    from bitnet.data import DataError
    from flows.config import pipeline_config
    from flows.preflight import preflight

    teacher = tmp_path / "teacher"
    LlamaConfig(**{**SMALL, "max_position_embeddings": 32}, tie_word_embeddings=True).save_pretrained(teacher)
    cfg = pipeline_config(None, "tiny", sets=[f"teacher.pretrained={teacher}", "world.seq_len=64"])
    with pytest.raises(DataError, match=r"seq_len \(64\) exceeds the teacher .*max_position_embeddings \(32\)"):
        preflight(cfg)
    assert preflight(cfg.model_copy(update={"world": cfg.world.model_copy(update={"seq_len": 32})})) == "bitnet"

"""The one config path (bitnet/config.py) and the pipeline config built on it (flows/config.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitnet.config import ConfigError, deep_merge, load_config, parse_override
from bitnet.stages.kd import KDConfig
from bitnet.stages.teacher import TeacherConfig
from flows.config import PipelineConfig, pipeline_config, preset


def test_partial_nested_mapping_keeps_the_stage_defaults(tmp_path: Path) -> None:
    (f := tmp_path / "t.yaml").write_text("train: {max_steps: 20}\n")
    cfg = load_config(TeacherConfig, f)
    default = TeacherConfig()
    assert cfg.train.max_steps == 20 and default.train.lr == 2e-3  # the teacher's lr, not TrainConfig's
    assert cfg.train.model_dump(exclude={"max_steps"}) == default.train.model_dump(exclude={"max_steps"})


def test_layers_apply_in_order(tmp_path: Path) -> None:
    (f := tmp_path / "kd.yaml").write_text("temperature: 3.0\ntrain: {max_steps: 7, lr: 0.01}\n")
    cfg = load_config(KDConfig, f, {"train.max_steps": 9, "beta": None}, base={"temperature": 2.0, "beta": 4.0},
                      sets=["train.lr=0.002", "ad_layers=[0, 1]"])
    assert (cfg.temperature, cfg.beta, cfg.train.max_steps, cfg.train.lr, cfg.ad_layers) == (3.0, 4.0, 9, 0.002, [0, 1])


def test_errors_are_one_line_and_name_unknown_keys(tmp_path: Path) -> None:
    (f := tmp_path / "kd.yaml").write_text("train: {max_stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"^invalid KDConfig: train.max_stepz: unknown key \(1 error\(s\)\)$"):
        load_config(KDConfig, f)
    with pytest.raises(ConfigError, match="not of the form"):
        parse_override("temperature")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(KDConfig, tmp_path / "missing.yaml")
    (g := tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(KDConfig, g)


def test_merge_replaces_a_mapping_of_another_kind() -> None:
    base = {"source": {"kind": "dir", "path": "/x", "glob": "*.txt"}, "n": 1}
    assert deep_merge(base, {"source": {"kind": "hf", "name": "d"}}) == {"source": {"kind": "hf", "name": "d"}, "n": 1}
    assert deep_merge(base, {"source": {"glob": "*.md"}})["source"] == {"kind": "dir", "path": "/x", "glob": "*.md"}
    sky = {"compute": {"backend": "skypilot", "cloud": "gcp", "nodes": 2}}
    assert deep_merge(sky, {"compute": {"backend": "torchrun", "nproc_per_node": 2}}) == {
        "compute": {"backend": "torchrun", "nproc_per_node": 2}}  # another backend: no skypilot key left behind
    assert deep_merge(sky, {"compute": {"nodes": 4}})["compute"] == {"backend": "skypilot", "cloud": "gcp", "nodes": 4}


def test_tiny_preset_is_the_plain_default_and_stage_sections_are_flat() -> None:
    assert preset("tiny") == PipelineConfig()
    cfg = pipeline_config({"kd": {"temperature": 2.0, "enabled": False}})
    assert cfg.kd.temperature == 2.0 and not cfg.kd.enabled
    stage_cfg = cfg.kd.stage_config()
    assert type(stage_cfg) is KDConfig and stage_cfg.temperature == 2.0 and not hasattr(stage_cfg, "enabled")
    assert PipelineConfig.stage_names() == ("world", "teacher", "convert", "layerwise", "cpt", "kd", "lrc", "eval",
                                            "export")  # the order flows/bitdistill.py runs them in


def test_pipeline_sections_derive_from_the_stage_registry() -> None:
    """Each section is its registered stage's config + the step options, with the stage's own defaults; no
    hand-written mirror classes, and every preset is a partial mapping over the one default tree."""
    import flows.config
    from bitnet.stages.registry import stage
    from flows.config import PRESETS, StepOptions

    cfg = PipelineConfig()
    for name in PipelineConfig.stage_names():
        section = cfg.step(name)
        assert isinstance(section, StepOptions) and isinstance(section, stage(name).config)
        assert section.stage_config() == stage(name).config()
        assert PipelineConfig.model_fields[name].annotation is type(section)
    assert not [n for n in vars(flows.config) if n.endswith("Step") and n != "StepOptions"]
    for name, make in PRESETS.items():
        overrides = make()
        assert isinstance(overrides, dict) and overrides["preset"] == name
        assert preset(name) == load_config(PipelineConfig, base=overrides)


def test_partial_config_merges_over_its_preset() -> None:
    qwen = pipeline_config({"preset": "qwen2.5-0.5b", "kd": {"temperature": 2.0}})
    assert qwen.teacher.pretrained == "Qwen/Qwen2.5-0.5B" and qwen.kd.temperature == 2.0
    assert qwen.cpt.train.max_steps == preset("qwen2.5-0.5b").cpt.train.max_steps  # the preset's budget survives
    assert pipeline_config(None, "tiny", sets=["kd.train.max_steps=8"]).kd.train.max_steps == 8
    with pytest.raises(ConfigError, match="unknown preset 'nonsense'"):
        pipeline_config({"preset": "nonsense"})


def test_one_cap_per_evaluation_and_no_ignored_key() -> None:
    """The eval stage's ``split`` and ``max_batches`` are its harness's too (the harness section refuses its own);
    a training stage validates over ``data.eval_max_batches`` (``TrainConfig`` has no cap of its own)."""
    from pydantic import ValidationError

    from bitnet.evaluate import HarnessConfig
    from bitnet.trainer import TrainConfig

    for key, value in (("split", "validation"), ("max_blocks", "4")):
        with pytest.raises(ConfigError, match=rf"eval\.harness\.{key}: unknown key"):
            pipeline_config(None, "tiny", sets=[f"eval.harness.{key}={value}"])
    assert pipeline_config(None, "tiny", sets=["eval.harness.limit=4"]).eval.harness.limit == 4
    cli = HarnessConfig(split="validation", max_blocks=4)  # `bitdistill eval` names both itself
    assert (cli.split, cli.max_blocks) == ("validation", 4)
    with pytest.raises(ValidationError, match="eval_batches"):
        TrainConfig(max_steps=1, eval_batches=8)

"""The typed compute backends: one config class and one module per backend, a union discriminated by ``backend``,
the registry that maps each name to its module, and the config paths that select a backend (YAML, ``--set``, the
deployment's parameter schema)."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any, get_args

import pytest
from pydantic import TypeAdapter, ValidationError

from bitnet.config import ConfigError
from flows.config import PipelineConfig, pipeline_config
from tasks.artifacts import ArtifactRef, StoreConfig
from tasks.backends import BACKENDS, Backend, ComputeConfig, LocalCompute, SkyPilotCompute, TorchrunCompute
from tasks.compute import preflight, run_request
from tasks.execute import StageRequest

ADAPTER = TypeAdapter(ComputeConfig)
SAMPLES = [LocalCompute(), TorchrunCompute(nproc_per_node=2, env={"OMP_NUM_THREADS": "1"}),
           SkyPilotCompute(cloud="gcp", accelerators="H100:8", nodes=2, spot=True, region="us-central1",
                           disk_size=200, cluster="dev", idle_minutes_to_autostop=10,
                           secret_blocks={"HF_TOKEN": "hf-token"}, env={"A": "b"})]


def test_every_union_member_has_a_registered_module_with_run() -> None:
    members = get_args(Backend)
    assert {type(s) for s in SAMPLES} == set(members)
    names = [cls.model_fields["backend"].default for cls in members]
    assert list(BACKENDS) == names == ["local", "torchrun", "skypilot"]
    for cls, name in zip(members, names):
        module = BACKENDS[name]
        assert module.__name__ == f"tasks.backends.{name}" and getattr(module, cls.__name__) is cls
        assert callable(module.run), name
        assert get_args(cls.model_fields["backend"].annotation) == (name,)  # the tag is a one-value Literal
    assert [s.remote for s in SAMPLES] == [False, False, True]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.backend)
def test_union_round_trips_through_json(sample: Any) -> None:
    data = ADAPTER.dump_python(sample, mode="json")
    back = ADAPTER.validate_python(data)
    assert type(back) is type(sample) and back == sample
    assert ADAPTER.validate_json(ADAPTER.dump_json(sample)) == sample
    cfg = PipelineConfig(store=StoreConfig(root="gs://b/r"), kd={"compute": data})
    again = PipelineConfig.model_validate(cfg.model_dump(mode="json"))
    assert type(again.kd.compute) is type(sample) and again.kd.compute == sample


@pytest.mark.parametrize(("data", "loc"), [
    ({"backend": "local", "nproc_per_node": 2}, ("local", "nproc_per_node")),
    ({"backend": "local", "env": {"A": "b"}}, ("local", "env")),
    ({"backend": "torchrun", "cloud": "gcp"}, ("torchrun", "cloud")),
    ({"backend": "torchrun", "secret_blocks": {}}, ("torchrun", "secret_blocks")),
    ({"backend": "skypilot", "nproc_per_node": 2}, ("skypilot", "nproc_per_node")),
])
def test_a_backend_refuses_the_fields_of_another(data: dict[str, Any], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as e:
        ADAPTER.validate_python(data)
    (err,) = e.value.errors()
    assert err["type"] == "extra_forbidden" and err["loc"] == loc


def test_bad_backend_settings_are_one_line_config_errors(tmp_path) -> None:
    cases = {
        ("cpt.compute.nproc_per_node=2",): r"^invalid PipelineConfig: cpt.compute.local.nproc_per_node: unknown key "
                                            r"\(1 error\(s\)\)$",
        ("cpt.compute.backend=torchrun", "cpt.compute.cloud=gcp"): r"cpt.compute.torchrun.cloud: unknown key",
        ("cpt.compute.backend=ray",): r"cpt.compute: unknown compute backend 'ray'; expected one of local, torchrun, "
                                      r"skypilot",
        ("cpt.compute.backend=torchrun", "cpt.compute.nproc_per_node=0"): r"cpt.compute.torchrun.nproc_per_node: "
                                                                          r"Input should be greater than or equal to 1",
    }
    for sets, match in cases.items():
        with pytest.raises(ConfigError, match=match) as e:
            pipeline_config(None, "tiny", sets=list(sets))
        assert "\n" not in str(e.value)
    with pytest.raises(ValidationError, match="Unable to extract tag using discriminator 'backend'"):
        ADAPTER.validate_python({"nproc_per_node": 2})


def test_switching_backend_replaces_the_section_instead_of_merging() -> None:
    """``--set`` over a preset: another ``backend`` drops the old backend's keys; the same backend merges."""
    cfg = pipeline_config(None, "tiny", sets=["cpt.compute.backend=torchrun", "cpt.compute.nproc_per_node=2"])
    assert cfg.cpt.compute == TorchrunCompute(nproc_per_node=2) and cfg.kd.compute == LocalCompute()
    qwen = pipeline_config(None, "qwen3-4b", sets=["cpt.compute.backend=torchrun", "cpt.compute.nproc_per_node=2"])
    assert qwen.cpt.compute == TorchrunCompute(nproc_per_node=2)  # the preset's skypilot keys are gone
    assert isinstance(qwen.kd.compute, SkyPilotCompute) and qwen.kd.compute.accelerators == "H100:8"
    more = pipeline_config({"preset": "qwen3-4b", "cpt": {"compute": {"nodes": 2, "region": "us-east1"}}})
    assert more.cpt.compute.nodes == 2 and more.cpt.compute.accelerators == "H100:8" and more.cpt.compute.spot
    back = pipeline_config({"cpt": {"compute": {"backend": "local"}}}, "qwen3-4b")
    assert back.cpt.compute == LocalCompute()


def test_deployment_schema_takes_a_compute_section() -> None:
    """The parameter schema Prefect enforces on ``prefect deployment run``: a partial compute section of any
    backend; the fields of another backend, or an unknown backend, are refused before any process starts."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import ValidationError as SchemaError
    from prefect.utilities.schema_tools.validation import validate

    from flows.bitdistill import bitdistill

    schema = parameter_schema(bitdistill).model_dump_for_openapi()
    for ok in ({"backend": "torchrun", "nproc_per_node": 2}, {"nodes": 2}, {"backend": "local"},
               {"backend": "skypilot", "cloud": "runpod", "accelerators": "A100-80GB:1"}):
        validate({"config": {"cpt": {"compute": ok}}}, schema, raise_on_error=True)
    for bad in ({"backend": "local", "nproc_per_node": 2}, {"backend": "slurm"},
                {"backend": "torchrun", "cloud": "gcp"}, {"nproc_per_node": 0}):
        with pytest.raises(SchemaError):
            validate({"config": {"cpt": {"compute": bad}}}, schema, raise_on_error=True)


def test_run_request_and_preflight_dispatch_through_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend is its module: replacing the registry entry reroutes the run (options passed through)."""
    store = StoreConfig(root="s3://bucket/runs")
    req = StageRequest(stage="kd", key="k", store=store)
    ref = ArtifactRef(uri="s3://bucket/runs/kd/k", sha256="0" * 64, stage="kd", key="k")
    calls: list[tuple[Any, ...]] = []

    def run(request: StageRequest, cfg: Any, logger: Any, **kw: Any) -> ArtifactRef:
        calls.append((request, cfg, sorted(kw)))
        return ref

    fake = SimpleNamespace(run=run, preflight=lambda cfg, st, env: {"TOKEN": "x"})
    monkeypatch.setitem(BACKENDS, "torchrun", fake)
    compute = TorchrunCompute()
    assert run_request(compute, req, logging.getLogger("t"), launcher=lambda *a, **k: 0) is ref
    assert calls == [(req, compute, ["launcher", "progress"])]
    assert preflight(compute, store, {}) == {"TOKEN": "x"}
    assert preflight(LocalCompute(), store, {}) == {}  # a backend without preflight has nothing to check

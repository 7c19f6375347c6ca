"""No credential in logs, databases or artifacts (issue 22, item 7): credentials inside URIs are refused in configs
(which Prefect stores as flow-run parameters) and redacted wherever a URI from the environment is shown; secret-looking
storage options are refused by key and by value, with one-line errors that do not repeat the secret."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from bitnet.config import has_credentials, redact_text, redact_uri, secret_options
from tests.test_flow import STAGES, code_snapshot, corpus, mlflow_server, prefect_home, prefect_server, tiny_config
from tests.test_safety import one_line_error

__all__ = ["code_snapshot", "corpus", "mlflow_server", "prefect_home", "prefect_server"]  # fixtures used here

PASSWORD = "Pw-5ecret-tracking"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # the shape of an AWS secret access key


# ------------------------------------------------------------------------------------------ redaction
@pytest.mark.parametrize(("uri", "shown"), [
    (f"http://alice:{PASSWORD}@127.0.0.1:5000", "http://alice:***@127.0.0.1:5000"),
    (f"https://alice:{PASSWORD}@mlflow.example/api?x=1#f", "https://alice:***@mlflow.example/api?x=1#f"),
    ("http://KEY:ab/cd@host/p", "http://KEY:***@host/p"),  # an unencoded "/" in the password
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Date=1&X-Amz-Signature=f00d",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Date=1&X-Amz-Signature=***"),
    ("https://acct.blob.core.windows.net/c?sv=2020&sig=XYZ%3D&se=1", "https://acct.blob.core.windows.net/c?sv=2020&sig=***&se=1"),
    ("https://h/x?access_token=t0k&apiKey=k3y", "https://h/x?access_token=***&apiKey=***"),
    ("https://hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789@github.com/r", "https://***@github.com/r"),  # a token as user
])
def test_credentials_in_uris_are_redacted(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown and has_credentials(uri)
    assert redact_text(f"request to {uri} failed", uri) == f"request to {shown} failed"


@pytest.mark.parametrize("uri", [
    "http://127.0.0.1:5000", "http://alice@host:5000/x", "http://host:8080/a@b", "http://host/u/someone@example.com",
    "sqlite:////tmp/mlflow.db", "file:///home/me/runs", "s3://bucket/runs?versionId=3", "databricks://profile",
    "runs/tiny/artifacts",
])
def test_uris_without_credentials_are_left_as_they_are(uri: str) -> None:
    assert redact_uri(uri) == uri and not has_credentials(uri)


def test_a_password_quoted_outside_its_uri_is_removed_too() -> None:
    uri = f"http://alice:{PASSWORD}@127.0.0.1:5000"
    assert PASSWORD not in redact_text(f"nonnumeric port: '{PASSWORD}@127.0.0.1:5000'", uri)


# ------------------------------------------------------------------------------------- storage options
@pytest.mark.parametrize(("options", "where"), [
    ({"sk": SECRET}, "sk: a credential's name"),
    ({"ak": "AK", "region": "r"}, "ak: a credential's name"),
    ({"secretKey": SECRET}, "secretKey: a credential's name"),
    ({"client_kwargs": {"aws_secret_access_key": SECRET}}, "client_kwargs.aws_secret_access_key: a credential"),
    ({"api-key": "x"}, "api-key: a credential's name"),
    ({"endpoint_url": f"http://AKIA:{SECRET}@127.0.0.1:9000"}, "endpoint_url: a URL with credentials"),
    ({"profile": SECRET}, "profile: a token-like value"),
    ({"config_kwargs": {"user": "AKIAIOSFODNN7EXAMPLE"}}, "config_kwargs.user: an AWS access key id"),
    ({"headers": [f"https://h/?token={SECRET}"]}, "headers.0: a URL with credentials"),
])
def test_secret_storage_options_are_refused_by_key_and_value(options: dict[str, Any], where: str) -> None:
    from pydantic import ValidationError

    from tasks.artifacts import StoreConfig

    assert any(f.startswith(where) for f in secret_options(options)), secret_options(options)
    with pytest.raises(ValidationError) as e:
        StoreConfig(root="s3://b/r", storage_options=options)
    assert "must not hold credentials" in str(e.value) and where in str(e.value)
    assert SECRET not in str(e.value) and "AKIAIOSFODNN7EXAMPLE" not in str(e.value)  # not echoed, not as input


def test_ordinary_storage_options_are_accepted() -> None:
    from tasks.artifacts import StoreConfig

    for options in ({"endpoint_url": "http://127.0.0.1:9000", "anon": False, "skip_instance_cache": True},
                    {"token": "google_default", "project": "my-project-2024"},
                    {"client_kwargs": {"region_name": "eu-west-1"}, "config_kwargs": {"signature_version": "s3v4"}},
                    {"default_block_size": 5242880, "version_aware": True, "requester_pays": False}):
        assert StoreConfig(root="s3://b/r", storage_options=options).storage_options == options


def test_run_refuses_credentials_in_the_config_in_one_line_without_echo(tmp_path: Path, capsys) -> None:
    """``bitdistill run``: the config is refused before Prefect starts (so no flow run stores it)."""
    from flows.cli import main

    root = ["--root", str(tmp_path / "artifacts")]
    cases = [
        (["--set", f"tracking.uri=http://alice:{PASSWORD}@127.0.0.1:5000"], PASSWORD, "tracking.uri"),
        (["--set", f"tracking.uri=https://mlflow.example/?token={PASSWORD}"], PASSWORD, "tracking.uri"),
        (["--root", f"ftp://bob:{PASSWORD}@files.example/runs"], PASSWORD, "store.root"),
        (["--set", f"store.storage_options.sk={SECRET}"], SECRET, "sk: a credential's name"),
        (["--set", f"store.storage_options.endpoint_url=http://KEY:{PASSWORD}@127.0.0.1:9000"], PASSWORD,
         "endpoint_url: a URL with credentials"),
    ]
    for argv, secret, named in cases:
        err = one_line_error(capsys, main(["run", *root, *argv]))
        assert "must not hold credentials" in err and named in err and secret not in err, err
        assert "MLFLOW_TRACKING_PASSWORD" in err or "AWS_SECRET_ACCESS_KEY" in err, err
    assert not (tmp_path / "artifacts").exists()


def test_world_source_with_credentials_is_refused(tmp_path: Path, capsys) -> None:
    from bitnet.cli import main

    for source in ({"kind": "fsspec", "url": f"https://u:{PASSWORD}@corpus.example/texts/"},
                   {"kind": "fsspec", "url": "s3://corpus/texts", "storage_options": {"sk": PASSWORD}},
                   {"kind": "hf", "name": "json", "data_files": {"train": [f"https://h/t.json?sig={PASSWORD}"]}}):
        cfg = tmp_path / "world.yaml"
        cfg.write_text(yaml.safe_dump({"source": source}))
        err = one_line_error(capsys, main(["world", "build", "--config", str(cfg), "--out", str(tmp_path / "w")]))
        assert "must not hold credentials" in err and PASSWORD not in err, err


# ---------------------------------------------------------------------------------- MLflow tracking URI
def _lineage(tmp_path: Path, caplog, **cfg: Any) -> Any:
    from tasks.artifacts import ArtifactStore
    from tasks.tracking import Lineage, TrackingConfig

    logger = logging.getLogger("test.credentials")
    with caplog.at_level(logging.INFO, logger="test.credentials"):
        return Lineage(TrackingConfig(connect_timeout_s=2, **cfg), ArtifactStore(str(tmp_path / "a")), "tiny", "fr",
                       "name", {}, logger)


def test_unreachable_tracking_uri_from_the_environment_is_shown_redacted(tmp_path, caplog, monkeypatch) -> None:
    """Before: ``WARNING MLflow tracking disabled for this run: http://alice:PASSWORD@… is unreachable: … nonnumeric
    port: 'PASSWORD@…'``."""
    from tasks.tracking import TrackingError
    from tests.support import free_port

    uri = f"http://alice:{PASSWORD}@127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    lineage = _lineage(tmp_path, caplog)
    assert lineage.client is None and lineage.location is None
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "alice:***@127.0.0.1" in warning and "unreachable" in warning and PASSWORD not in warning, warning
    assert "nonnumeric port" not in warning  # the health check sends the credentials as a header, not in the URL
    with pytest.raises(TrackingError) as e:
        _lineage(tmp_path, caplog, required=True)
    assert "alice:***@" in str(e.value) and PASSWORD not in str(e.value)


def _all_prefect_records() -> tuple[list[str], list[dict[str, Any]]]:
    """Every log message and every flow run's parameters that the Prefect server holds."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # the logs still queued in this process reach the server
    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while batch := client.read_logs(offset=len(messages), limit=200):
            messages += [log.message for log in batch]
        params = [fr.parameters for fr in client.read_flow_runs(limit=200)]
    return messages, params


def _mlflow_texts(uri: str) -> list[str]:
    """Every param, tag and JSON artifact of every run of experiment bitdistill, and its logged models' tags."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("bitdistill")
    texts = [json.dumps(exp.tags), exp.artifact_location]
    for run in client.search_runs([exp.experiment_id]):
        texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
        for art in client.list_artifacts(run.info.run_id):
            if art.path.endswith(".json"):
                texts.append(Path(client.download_artifacts(run.info.run_id, art.path)).read_text())
    texts += [json.dumps(m.tags) for m in client.search_logged_models(experiment_ids=[exp.experiment_id])]
    return texts


def test_tracking_uri_with_password_in_the_environment_is_used_but_never_stored(
        prefect_home, corpus, code_snapshot, mlflow_server, tmp_path, capfd, monkeypatch):
    """``MLFLOW_TRACKING_URI=http://alice:PASSWORD@host`` of the worker: the run is tracked there, and the password
    is in none of stdout/stderr, Prefect's logs and flow-run parameters, MLflow's params, tags and JSON artifacts,
    and the run report."""
    from flows.cli import main

    uri = mlflow_server.replace("http://", f"http://alice:{PASSWORD}@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = tiny_config(corpus, str(tmp_path / "artifacts"), tracking={"enabled": True},
                      **{s: {"enabled": False} for s in STAGES[2:]})
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(cfg.model_dump_json())
    assert main(["run", "--config", str(cfg_file)]) == 0

    out, err = capfd.readouterr()
    summary, _ = json.JSONDecoder().raw_decode(out[out.rindex("\n{\n") + 1:])  # the CLI's closing summary
    assert summary["mlflow"].startswith(mlflow_server.replace("http://", "http://alice:***@") + "/#/experiments/")
    messages, params = _all_prefect_records()
    report = Path(summary["report"].removeprefix("file://"))
    texts = _mlflow_texts(mlflow_server)
    assert any("bitdistill.prefect_flow_run_id" in t for t in texts)  # the run did reach MLflow: its runs,
    assert any('"reuse_only"' in t for t in texts)  # the config.json artifacts
    for where, text in [("stdout", out), ("stderr", err), ("prefect logs", "\n".join(messages)),
                        ("flow-run parameters", json.dumps(params)), ("mlflow", "\n".join(texts)),
                        ("report", report.read_text() + (report.parent / "summary.json").read_text())]:
        assert PASSWORD not in text, where


def test_flow_refuses_a_tracking_uri_with_password_without_logging_it(prefect_home, tmp_path) -> None:
    """A deployment's ``config`` with credentials: the flow run fails in its first second with a message (and logs)
    that do not repeat them. (What a user submits as parameters, Prefect stores before any code of ours runs.)"""
    from flows.bitdistill import bitdistill

    state = bitdistill(config={"store": {"root": str(tmp_path / "a")},
                               "tracking": {"uri": f"http://alice:{PASSWORD}@127.0.0.1:5000"}}, return_state=True)
    assert state.is_failed() and "tracking.uri must not hold credentials" in str(state.message)
    assert PASSWORD not in str(state.message)
    messages, _ = _all_prefect_records()
    assert any("must not hold credentials" in m for m in messages) and not any(PASSWORD in m for m in messages)

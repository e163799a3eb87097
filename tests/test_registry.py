"""jobs.platform.registry: each kind of model reference resolved against a real SQLite MLflow registry, each error
type from the situation that produces it (unset alias, missing version or model, a directory that is no model, a
malformed URI, a registry that refuses connections, answers 5xx or refuses the credentials), and registration that
tolerates "already exists" only."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from jobs.platform import registry
from jobs.platform.registry import (
    AliasNotSet,
    MalformedReference,
    ModelReferenceError,
    NoSuchVersion,
    NotAModelDirectory,
    RegistryUnreachable,
)
from jobs.platform.runtime import Settings
from tests.stack import free_port


def settings_for(home: Path, tracking_uri: str | None = None) -> Settings:
    return Settings(
        data=home,
        home=home,
        storage=str(home),
        mlflow_tracking_uri=tracking_uri or f"sqlite:///{home / 'mlflow.db'}",
        ray_address=None,
    )


def fake_hf_dir(path: Path, marker: str) -> Path:
    """A directory with the files registry code looks at (config.json); `marker` tells versions apart."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "marker": marker}))
    (path / "weights.txt").write_text(marker)
    return path


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    """tulpar-reg v1 and v2 registered like a training job does (v2 @pretrain-latest); no @champion."""
    import mlflow
    from pydantic import BaseModel

    from jobs.platform import tracking

    root = tmp_path_factory.mktemp("reg")
    settings = settings_for(root / "home")

    class Cfg(BaseModel):
        n: int

    uris = []
    for i in (1, 2):  # the second registration finds the model already registered: tolerated
        hf = fake_hf_dir(root / f"hf-{i}", f"v{i}")
        with tracking.start_run(settings, "pretrain", Cfg(n=i), run_name=f"reg-{i}"):
            uris.append(
                tracking.register_hf_model(hf, "tulpar-reg", stage="pretrain", alias="pretrain-latest")[0]
            )
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    return {"root": root, "settings": settings, "uris": uris}


def test_registered_references_resolve_to_canonical_versions(reg):
    settings = reg["settings"]
    assert reg["uris"] == ["models:/tulpar-reg/1", "models:/tulpar-reg/2"]
    v1 = registry.resolve("models:/tulpar-reg/1", settings)
    assert (v1.kind, v1.uri, v1.name, v1.version, v1.path) == (
        "registered",
        "models:/tulpar-reg/1",
        "tulpar-reg",
        "1",
        None,
    )
    assert v1.tags["tulpar.stage"] == "pretrain" and v1.source
    latest = registry.resolve("models:/tulpar-reg@pretrain-latest", settings)
    assert latest.uri == "models:/tulpar-reg/2" and latest.aliases == ("pretrain-latest",)
    assert registry.champion_version("tulpar-reg", "pretrain-latest", settings).version == "2"

    import mlflow

    mlflow.set_tracking_uri(
        f"sqlite:///{reg['root'] / 'other.db'}"
    )  # the process-wide URI is not the registry's
    try:
        fetched = registry.hf_model("models:/tulpar-reg@pretrain-latest", settings)
    finally:
        mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    assert fetched.path == settings.home / "cache" / "models" / "tulpar-reg" / "2"
    assert json.loads((fetched.path / "config.json").read_text())["marker"] == "v2"
    assert (fetched.path / "weights.txt").read_text() == "v2"


def test_local_directories(reg, tmp_path):
    hf = fake_hf_dir(tmp_path / "hf", "local")
    r = registry.resolve(str(hf), reg["settings"])
    assert (r.kind, r.uri, r.path, r.name) == ("hf", str(hf.resolve()), hf.resolve(), None)
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "best" / "meta.json").write_text("{}")
    ckpt = registry.resolve(str(run), reg["settings"])
    assert (ckpt.kind, ckpt.path) == ("checkpoint", (run / "best").resolve())
    with pytest.raises(NotAModelDirectory, match=r"is a training checkpoint.*start from its HF export"):
        registry.hf_model(str(run), reg["settings"])


def test_unset_alias_is_alias_not_set_and_champion_version_none(reg):
    settings = reg["settings"]
    with pytest.raises(AliasNotSet) as info:
        registry.resolve("models:/tulpar-reg@champion", settings)
    message = str(info.value)
    assert "models:/tulpar-reg@champion" in message and "@pretrain-latest -> v2" in message
    assert "--promote" in message  # the fix
    assert not isinstance(info.value, RegistryUnreachable)
    assert registry.champion_version("tulpar-reg", "champion", settings) is None


@pytest.mark.parametrize(
    "reference, match",
    [
        ("models:/tulpar-reg/9", r"'tulpar-reg' has no version 9 \(latest: 2\)"),
        (
            "models:/nobody/1",
            r"registered model 'models:/nobody/1' not found.*no registered model named 'nobody'",
        ),
        ("models:/nobody@champion", r"no registered model named 'nobody'"),
    ],
)
def test_missing_versions_and_models_are_no_such_version(reg, reference, match):
    with pytest.raises(NoSuchVersion, match=match):
        registry.resolve(reference, reg["settings"])


def test_champion_version_of_an_unknown_model_raises(reg):
    with pytest.raises(NoSuchVersion):  # not None: "no such model" is not "alias not set"
        registry.champion_version("nobody", "champion", reg["settings"])


@pytest.mark.parametrize(
    "reference",
    [
        "models:/tulpar-reg",
        "models:/tulpar-reg/latest",
        "models:tulpar-reg/1",
        "models:/tulpar-reg@bad alias",
        "",
    ],
)
def test_malformed_references(reg, reference):
    with pytest.raises(MalformedReference, match="models:/<name>"):
        registry.resolve(reference, reg["settings"])


def test_directories_that_are_no_model(reg, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(NotAModelDirectory, match=r"not an HF-format model directory \(no config.json\)"):
        registry.resolve(str(tmp_path), reg["settings"])
    with pytest.raises(NotAModelDirectory, match=r"'.*nowhere' not found"):
        registry.resolve(str(tmp_path / "nowhere"), reg["settings"])


def test_every_error_is_a_user_error_and_the_types_are_distinct():
    kinds = [MalformedReference, NotAModelDirectory, NoSuchVersion, AliasNotSet, RegistryUnreachable]
    for kind in kinds:
        assert issubclass(kind, ModelReferenceError) and issubclass(kind, ValueError)
        assert [other for other in kinds if issubclass(kind, other)] == [kind]


# ---------------------------------------------------------------------------------------- an unreachable registry


@pytest.fixture
def no_retries(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def test_closed_port_is_registry_unreachable_never_alias_not_set(no_retries, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = settings_for(tmp_path, uri)
    start = time.monotonic()
    for reference in ("models:/kk-350m@champion", "models:/kk-350m/3"):
        with pytest.raises(RegistryUnreachable) as info:
            registry.resolve(reference, settings)
        assert (
            reference in str(info.value)
            and uri in str(info.value)
            and "MLFLOW_TRACKING_URI" in str(info.value)
        )
    with pytest.raises(RegistryUnreachable):
        registry.champion_version("kk-350m", "champion", settings)
    assert time.monotonic() - start < 30


class FakeRegistry(BaseHTTPRequestHandler):
    """MLflow's REST API answering from `answers`: path fragment -> (status, body)."""

    answers: dict[str, tuple[int, str]] = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        status, body = next((a for k, a in self.answers.items() if k in self.path), (404, "no route"))
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if body.startswith("{") else "text/plain")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeRegistry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


NOT_FOUND = json.dumps(
    {"error_code": "INVALID_PARAMETER_VALUE", "message": "Registered model alias x not found."}
)


@pytest.mark.parametrize(
    "answers, shown",
    [
        ({"/": (503, "upstream unavailable")}, "503"),  # a proxy in front of a server that is down
        (
            {"/": (401, json.dumps({"error_code": "UNAUTHENTICATED", "message": "bad token"}))},
            "UNAUTHENTICATED",
        ),
        # the alias lookup says "not found" but the model cannot be read to confirm it: not "alias not set"
        (
            {"registered-models/alias": (400, NOT_FOUND), "registered-models/get": (500, "database down")},
            "500",
        ),
    ],
)
def test_server_errors_and_refused_credentials_are_registry_unreachable(
    no_retries, fake_server, tmp_path, monkeypatch, answers, shown
):
    monkeypatch.setattr(FakeRegistry, "answers", answers)
    settings = settings_for(tmp_path, f"http://127.0.0.1:{fake_server.server_address[1]}")
    with pytest.raises(RegistryUnreachable, match=shown):
        registry.resolve("models:/kk-350m@champion", settings)
    with pytest.raises(RegistryUnreachable):
        registry.champion_version("kk-350m", "champion", settings)


def test_alias_not_set_is_confirmed_through_the_rest_api(no_retries, fake_server, tmp_path, monkeypatch):
    model = {"registered_model": {"name": "kk-350m", "aliases": [{"alias": "challenger", "version": "2"}]}}
    monkeypatch.setattr(
        FakeRegistry,
        "answers",
        {"registered-models/alias": (400, NOT_FOUND), "registered-models/get": (200, json.dumps(model))},
    )
    settings = settings_for(tmp_path, f"http://127.0.0.1:{fake_server.server_address[1]}")
    assert registry.champion_version("kk-350m", "champion", settings) is None
    with pytest.raises(AliasNotSet, match=r"@challenger -> v2"):
        registry.resolve("models:/kk-350m@champion", settings)


# ---------------------------------------------------------------------------------------- registration


def test_registration_reraises_anything_but_already_exists(reg, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED
    from pydantic import BaseModel

    from jobs.platform import tracking

    class Cfg(BaseModel):
        n: int

    def refuse(self, name, *args, **kwargs):
        raise MlflowException(f"user may not create {name}", error_code=PERMISSION_DENIED)

    monkeypatch.setattr(MlflowClient, "create_registered_model", refuse)
    hf = fake_hf_dir(tmp_path / "hf", "denied")
    with (
        tracking.start_run(reg["settings"], "pretrain", Cfg(n=3), run_name="denied"),
        pytest.raises(MlflowException, match="user may not create tulpar-reg") as info,
    ):
        tracking.register_hf_model(hf, "tulpar-reg", stage="pretrain", alias="pretrain-latest")
    assert info.value.error_code == "PERMISSION_DENIED"
    monkeypatch.undo()
    client = MlflowClient(tracking_uri=reg["settings"].mlflow_tracking_uri)
    assert sorted(int(v.version) for v in client.search_model_versions("name='tulpar-reg'")) == [1, 2]

"""jobs.publish: the dry-run folder file by file, the model card against MLflow and the report files, and uploads
to a local HTTP server standing in for the Hugging Face Hub API (the real Hub cannot be reached from here).

One module fixture trains a tiny model, registers it twice like the training jobs do (v1 pretrain on a dataset
with a preprocessing report, v2 sft whose parent is v1, each run logging plots/loss_curve.png), records eval
results on v2 the way `jobs.eval` does, and writes a tokenizer report measuring the model's tokenizer and Qwen3.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOKEN = "hf_test_secret_token_123"
EXPORT_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tulpar_config.json",
}
CARD_ASSETS = {"assets/loss_curve-tulpar-tiny-v1.png", "assets/loss_curve-tulpar-tiny-v2.png"}
EVAL_METRICS = {
    "bpb/flores200_devtest/kk": 1.8170123456,
    "bpb/flores200_devtest/ru": 1.9034567891,
    "bpb/flores200_devtest/en": 2.9876543219,
    "bpb/flores200_devtest/avg": 2.2360411522,
    "ppl/flores200_devtest/kk": 812.5,
    "mc/belebele-kk-fixture/acc": 0.375,
    "mc/belebele-kk-fixture/acc_norm": 0.25,
    "mc/belebele-kk-fixture/random": 0.25,
    "mc/belebele-kk-fixture/n": 8.0,
}
DATASET_REPORT = {
    "name": "tiny-test",
    "totals": {"files": 3, "documents_in": 1200, "documents_kept": 1034},
    "output": {
        "train": {
            "kk": {"documents": 431, "tokens": 20123, "bytes": 90000},
            "ru": {"documents": 310, "tokens": 15092, "bytes": 60000},
            "en": {"documents": 293, "tokens": 15090, "bytes": 40000},
        }
    },
    "mixture": {
        "target": {"kk": 0.4, "ru": 0.3, "en": 0.3},
        "achieved": {"kk": 0.4001, "ru": 0.2999, "en": 0.3},
    },
}

SETUP = r"""
import json, sys
from pathlib import Path
import mlflow
from jobs.evaluation.report import eval_tags, set_version_tags
from jobs.platform import tracking
from jobs.platform.runtime import Settings
from jobs.reporting.plots import plot_loss_curve
from llm_core.shards import file_sha256

hf, dataset, plots = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
s = Settings.from_env()
train = tracking.setup(s, "tulpar-train")
runs = {}
for stage, parent, params, tags, start in (
    ("pretrain", None, {"data.dataset": str(dataset)},
     {"tulpar.dataset_manifest_sha256": file_sha256(dataset / "manifest.json")}, 6.0),
    ("sft", "models:/tulpar-tiny/1", {}, {"tulpar.parent_model_uri": "models:/tulpar-tiny/1"}, 4.0),
):
    with mlflow.start_run(experiment_id=train, tags={"tulpar.stage": stage, **tags}) as run:
        mlflow.log_params(params)
        history = [{"step": i, "train_loss": start - 0.1 * i} for i in range(10)]
        png = plot_loss_curve(history, plots / stage / "loss_curve.png", stage)
        tracking.log_figure_file(png)
        version_tags = {"tulpar.parent_model_uri": parent} if parent else {}
        tracking.register_hf_model(hf, "tulpar-tiny", stage=stage, alias=f"{stage}-latest", tags=version_tags)
        runs[stage] = run.info.run_id
metrics = json.loads(sys.argv[4])
with mlflow.start_run(experiment_id=tracking.setup(s, "tulpar-eval")) as run:
    mlflow.log_metrics(metrics)
    set_version_tags("tulpar-tiny", "2", eval_tags("tiny", "0" * 64, run.info.run_id, metrics))
    runs["eval"] = run.info.run_id
print(json.dumps(runs))
"""


def tiny_export(out: Path, data_dir: Path) -> Path:
    """An untrained `tiny` model with a small kk/ru/en BPE, exported in HF format (publishing reads files only)."""
    import torch

    from jobs.platform.configfile import model_config_from_preset
    from llm_core.export_hf import export_hf
    from llm_core.model import Transformer
    from llm_core.tokenizer import train_bpe

    dev = data_dir / "eval" / "parallel" / "flores200_devtest"
    docs = [
        line
        for name in ("kaz_Cyrl.devtest", "rus_Cyrl.devtest", "eng_Latn.devtest")
        for line in (dev / name).read_text(encoding="utf-8").splitlines()[:300]
    ]
    tok = train_bpe(docs, 512)
    torch.manual_seed(0)
    model = Transformer(model_config_from_preset("tiny", [f"vocab_size={tok.vocab_size}"]))
    export_hf(model.eval(), out, tokenizer=tok)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory, data_dir):
    from jobs.reporting.tokenizers import build_report
    from llm_core.tokenizer_eval import EvalText, load_tokenizer

    root = tmp_path_factory.mktemp("publish")
    home = root / "home"
    hf = tiny_export(root / "hf", data_dir)
    dataset = root / "dataset"
    dataset.mkdir()
    (dataset / "manifest.json").write_text(json.dumps({"name": "tiny-test", "format_version": 1}))
    (dataset / "report.json").write_text(json.dumps(DATASET_REPORT))
    # a tokenizer report that measured this model's tokenizer and one reference (Qwen3)
    parallel = data_dir / "eval" / "parallel" / "flores200_devtest"
    files = {"kk": "kaz_Cyrl.devtest", "ru": "rus_Cyrl.devtest", "en": "eng_Latn.devtest"}
    lines = {k: (parallel / f).read_text(encoding="utf-8").splitlines()[:40] for k, f in files.items()}
    tokenizers = [load_tokenizer("tiny-test", hf / "tokenizer.json")]
    qwen = data_dir / "tokenizers" / "qwen3" / "tokenizer.json"
    if qwen.is_file():
        tokenizers.append(load_tokenizer("qwen3", qwen))
    build_report(
        tokenizers,
        [EvalText("flores200_devtest", lines)],
        home / "reports" / "tokenizers" / "test",
        languages=["kk", "ru", "en"],
        show_progress=False,
    )
    e = {**os.environ, "TULPAR_HOME": str(home), "TULPAR_DATA": str(data_dir), "PYTHONUNBUFFERED": "1"}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        e.pop(key, None)
    e["HF_HOME"] = str(root / "hf-home")  # no token stored by a real login can leak in
    out = subprocess.run(
        [sys.executable, "-c", SETUP, str(hf), str(dataset), str(root / "plots"), json.dumps(EVAL_METRICS)],
        cwd=REPO,
        env=e,
        check=True,
        capture_output=True,
        text=True,
    )
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    return {"root": root, "home": home, "hf": hf, "env": e, "runs": runs, "plots": root / "plots"}


def publish(env: dict, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.publish", *args],
        cwd=REPO,
        env={**env["env"], **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def logged_metrics(env: dict) -> dict[str, float]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{env['home'] / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri).get_run(env["runs"]["eval"]).data.metrics


# ------------------------------------------------------------------------------------------- the fake Hub


class FakeHub:
    """A local HTTP server answering the Hub API calls of create_repo + create_commit; records every request.
    `refuse` answers 403 to everything, as the Hub does for a repository owned by someone else."""

    def __init__(self, refuse: bool = False):
        self.requests: list[dict] = []
        self.refuse = refuse
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                hub.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
                if hub.refuse:
                    return self._reply(
                        403, {"error": "You don't have the rights to create a model under this namespace"}
                    )
                path = self.path.split("?")[0]
                if self.command == "POST" and path == "/api/repos/create":
                    req = json.loads(body)
                    return self._reply(200, {"url": f"{hub.url}/{req['organization']}/{req['name']}"})
                if self.command == "POST" and path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                if self.command == "POST" and "/branch/" in path:
                    return self._reply(200, {})
                if self.command == "POST" and "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._reply(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                for f in files
                            ]
                        },
                    )
                if self.command == "POST" and "/commit/" in path:
                    repo = path.split("/api/models/")[1].split("/commit/")[0]
                    return self._reply(
                        200, {"commitUrl": f"{hub.url}/{repo}/commit/c0ffee", "commitOid": "c0ffee" * 6}
                    )
                return self._reply(404, {"error": f"fake hub: no route {self.command} {path}"})

            do_GET = do_POST = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def posts(self, fragment: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST" and fragment in r["path"]]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- dry run


def test_dry_run_writes_the_exact_folder_and_a_card_that_matches_mlflow(env, tmp_path):
    from huggingface_hub import ModelCard

    from llm_core.config import ModelConfig

    out = tmp_path / "folder"
    proc = publish(
        env, "--model", "models:/tulpar-tiny@sft-latest", "--dry-run", "--out", str(out), "--license", "mit"
    )
    assert proc.returncode == 0, proc.stderr
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert written == EXPORT_FILES | CARD_ASSETS | {"README.md"}
    for name in EXPORT_FILES:  # weights, configs and tokenizer files are the export's bytes
        assert (out / name).read_bytes() == (env["hf"] / name).read_bytes(), name
    for stage, version in (("pretrain", 1), ("sft", 2)):
        png = (out / f"assets/loss_curve-tulpar-tiny-v{version}.png").read_bytes()
        assert png == (env["plots"] / stage / "loss_curve.png").read_bytes()
    for f in written:  # the listing on stdout names every file with its size
        assert f in proc.stdout and f"{(out / f).stat().st_size:,} bytes" in proc.stdout

    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.language == ["kk", "ru", "en"]
    assert data.license == "mit" and data.pipeline_tag == "text-generation"
    assert data.library_name == "transformers" and "sft" in data.tags
    assert data.base_model is None  # no parent was published to the Hub

    # the eval results equal what MLflow holds for the eval run of this version
    metrics = logged_metrics(env)
    got = {(r.dataset_name, r.dataset_config, r.metric_type): r.metric_value for r in data.eval_results}
    want = {
        ("flores200_devtest", lang, "bits_per_byte"): metrics[f"bpb/flores200_devtest/{lang}"]
        for lang in ("kk", "ru", "en")
    }
    want[("belebele-kk-fixture", None, "accuracy")] = metrics["mc/belebele-kk-fixture/acc"]
    assert got == want
    m = metrics
    row = (
        f"| flores200_devtest | {m['bpb/flores200_devtest/kk']:.4f} | {m['bpb/flores200_devtest/ru']:.4f} | "
    )
    row += f"{m['bpb/flores200_devtest/en']:.4f} | {m['bpb/flores200_devtest/avg']:.4f} |"
    assert row in card.text
    assert "| belebele-kk-fixture | 0.3750 | 0.2500 | 0.2500 | 8 |" in card.text
    assert f"| ppl/flores200_devtest/kk | {m['ppl/flores200_devtest/kk']:.4f} |" in card.text
    assert env["runs"]["eval"] in card.text

    # architecture and parameter count from the export's tulpar_config.json
    cfg = ModelConfig.model_validate_json((env["hf"] / "tulpar_config.json").read_text())
    assert f"| parameters | {cfg.num_params():,} " in card.text
    assert f"| layers | {cfg.num_layers} |" in card.text

    # lineage: both versions with their runs, newest first
    lineage = card.text.split("## Lineage")[1]
    assert lineage.index("models:/tulpar-tiny/2") < lineage.index("models:/tulpar-tiny/1 | pretrain")
    assert env["runs"]["sft"] in lineage and env["runs"]["pretrain"] in lineage
    assert "](assets/loss_curve-tulpar-tiny-v1.png)" in lineage

    # training data: the pretraining run's dataset report
    assert "1,034 of 1,200 documents kept" in card.text
    assert "| Kazakh (kk) | 431 | 20,123 | 0.4000 | 0.4001 |" in card.text

    # tokenizer efficiency: the report's numbers for this tokenizer; references not in the report are "not measured"
    report = json.loads((env["home"] / "reports/tokenizers/test/report.json").read_text())
    tok = card.text.split("## Tokenizer efficiency")[1].split("## Training data")[0]
    by = {(r["tokenizer"], r["language"]): r for r in report["metrics"]}
    ours = by[("tiny-test", "kk")]
    assert f"{ours['tokens']:,} ({ours['chars_per_token']:.2f} chars/token)" in tok
    assert "| Llama 3 | not measured | not measured | not measured |" in tok
    if ("qwen3", "kk") in by:
        assert f"| Qwen3 | {by[('qwen3', 'kk')]['tokens']:,} " in tok


def test_dry_run_of_an_unmeasured_directory_says_what_is_missing(env, tmp_path):
    import shutil

    from huggingface_hub import ModelCard

    model = tmp_path / "export"
    shutil.copytree(env["hf"], model)
    out = tmp_path / "folder"
    proc = publish(
        env,
        "--model",
        str(model),
        "--dry-run",
        "--out",
        str(out),
        extra_env={"TULPAR_HOME": str(tmp_path / "h")},
    )
    assert proc.returncode == 0, proc.stderr
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results is None and not (out / "assets").exists()
    assert "Not measured: `jobs.eval` has recorded no results" in card.text
    assert "tokenizer report on this machine measured this model's tokenizer" in card.text
    assert "not recorded: the model is a directory" in card.text


def test_gguf_is_refused_for_a_tokenizer_llama_cpp_splits_differently_unless_allowed(env, tmp_path):
    """--gguf checks the tokenizer before anything is written; with the override the folder holds the GGUF, its
    Ollama Modelfile and a card section naming them."""
    import gguf

    out = tmp_path / "refused"
    proc = publish(env, "--model", str(env["hf"]), "--dry-run", "--out", str(out), "--gguf", "q8_0")
    assert (
        proc.returncode == 2
        and "--allow-tokenizer-mismatch" in proc.stderr
        and "Traceback" not in proc.stderr
    )
    assert not out.exists()
    out = tmp_path / "allowed"
    proc = publish(
        env,
        "--model",
        str(env["hf"]),
        "--dry-run",
        "--out",
        str(out),
        "--gguf",
        "q8_0",
        "--allow-tokenizer-mismatch",
        extra_env={"TULPAR_HOME": str(tmp_path / "h")},
    )
    assert proc.returncode == 0, proc.stderr
    [path] = list(out.glob("*-q8_0.gguf"))
    assert path.with_suffix(".Modelfile").is_file()
    reader = gguf.GGUFReader(str(path))
    assert str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8") == "llama"
    assert f"`{path.name}`" in (out / "README.md").read_text(encoding="utf-8")
    assert path.name in proc.stdout  # the dry-run listing names it


# ------------------------------------------------------------------------------------------- upload


def test_upload_creates_the_repo_and_commits_every_file_once(env, tmp_path):
    from mlflow import MlflowClient

    dry = tmp_path / "dry"
    assert (
        publish(
            env,
            "--model",
            "models:/tulpar-tiny/2",
            "--repo-id",
            "alice/tulpar-tiny",
            "--dry-run",
            "--out",
            str(dry),
        ).returncode
        == 0
    )
    with FakeHub() as hub:
        proc = publish(
            env,
            "--model", "models:/tulpar-tiny/2", "--repo-id", "alice/tulpar-tiny", "--private",
            extra_env={"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN},
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    # every API call carries the token; huggingface_hub's own unauthenticated GET of its agent registry aside
    api = [r for r in hub.requests if r["path"] != "/api/agent-harnesses"]
    assert {(r["method"], r["path"].split("?")[0]) for r in api} == {
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/alice/tulpar-tiny/preupload/main"),
        ("POST", "/api/models/alice/tulpar-tiny/commit/main"),
    }
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in api)
    assert all(TOKEN not in str(r["headers"]) for r in hub.requests if r not in api)
    (create,) = hub.posts("/api/repos/create")
    want = {"name": "tulpar-tiny", "organization": "alice", "visibility": "private", "type": "model"}
    assert json.loads(create["body"]) == want
    (commit,) = hub.posts("/api/models/alice/tulpar-tiny/commit/main")  # one commit with everything
    lines = [json.loads(line) for line in commit["body"].splitlines() if line.strip()]
    assert lines[0]["key"] == "header"
    files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
    assert set(files) == EXPORT_FILES | CARD_ASSETS | {"README.md"}
    for name, content in files.items():  # the upload is the dry run's folder, byte for byte
        assert content == (dry / name).read_bytes(), name
    assert hub.requests.index(create) < hub.requests.index(commit)
    assert "commit c0ffee" in proc.stdout
    mv = MlflowClient(tracking_uri=f"sqlite:///{env['home'] / 'mlflow.db'}").get_model_version(
        "tulpar-tiny", "2"
    )
    assert mv.tags["tulpar.hub.repo_id"] == "alice/tulpar-tiny"


def test_a_repo_owned_by_someone_else_is_refused_with_the_fix(env):
    with FakeHub(refuse=True) as hub:
        proc = publish(
            env, "--model", "models:/tulpar-tiny/2", "--repo-id", "bob/tulpar-tiny",
            extra_env={"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN},
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert (
        "HTTP 403" in proc.stderr and "belongs to someone else" in proc.stderr and "--repo-id" in proc.stderr
    )
    assert "Traceback" not in proc.stderr and not hub.posts("/commit/")


def test_an_unreachable_hub_is_a_network_error_that_says_rerun(env):
    proc = publish(
        env, "--model", "models:/tulpar-tiny/2", "--repo-id", "alice/tulpar-tiny",
        extra_env={"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_TOKEN": TOKEN},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "could not be reached" in proc.stderr and "re-run the same command" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_token_fails_before_any_request(env):
    with FakeHub() as hub:
        proc = publish(
            env,
            "--model",
            "models:/tulpar-tiny/2",
            "--repo-id",
            "alice/tulpar-tiny",
            extra_env={"HF_ENDPOINT": hub.url},
        )
    assert proc.returncode == 2
    assert "HF_TOKEN is not set" in proc.stderr and "Traceback" not in proc.stderr
    assert hub.requests == []


def test_models_without_an_hf_export_are_refused(env, tmp_path):
    ckpt = tmp_path / "run" / "best"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text("{}")
    proc = publish(env, "--model", str(tmp_path / "run"), "--dry-run", "--out", str(tmp_path / "a"))
    assert (
        proc.returncode == 2
        and "training checkpoint" in proc.stderr
        and "models:/<name>/<version>" in proc.stderr
    )
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((env["hf"] / "config.json").read_text())
    proc = publish(env, "--model", str(partial), "--dry-run", "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "not a complete HF export" in proc.stderr
    assert "(missing generation_config.json, tokenizer.json, *.safetensors weights)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "b").exists()


def test_a_published_parent_is_the_base_model_and_revision_names_the_branch(env, tmp_path):
    from huggingface_hub import ModelCard
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{env['home'] / 'mlflow.db'}")
    client.set_model_version_tag("tulpar-tiny", "1", "tulpar.hub.repo_id", "alice/tulpar-tiny-base")
    try:
        with FakeHub() as hub:
            proc = publish(
                env, "--model", "models:/tulpar-tiny/2", "--repo-id", "alice/tulpar-tiny-chat",
                "--revision", "candidate", "--commit-message", "SFT on the kk/ru/en chat data",
                extra_env={"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN},
            )  # fmt: skip
    finally:
        client.delete_model_version_tag("tulpar-tiny", "1", "tulpar.hub.repo_id")
    assert proc.returncode == 0, proc.stderr
    assert hub.posts("/api/models/alice/tulpar-tiny-chat/branch/candidate")
    (commit,) = hub.posts("/api/models/alice/tulpar-tiny-chat/commit/candidate")
    lines = [json.loads(line) for line in commit["body"].splitlines() if line.strip()]
    assert lines[0]["value"]["summary"] == "SFT on the kk/ru/en chat data"
    readme = next(x for x in lines if x["key"] == "file" and x["value"]["path"] == "README.md")
    card_path = tmp_path / "README.md"
    card_path.write_bytes(base64.b64decode(readme["value"]["content"]))
    assert ModelCard.load(card_path).data.base_model == "alice/tulpar-tiny-base"

"""`python -m pipelines.recipes --check` (`make recipe-check`): every shipped recipe passes, and broken recipes
built in tmp_path fail with exit 2 and a message naming the recipe, the key and the fix. No training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llm_core.config import ModelConfig
from pipelines.recipe_check import estimate_gpu_memory
from pipelines.recipes import list_recipes, main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(tulpar_home, data_dir):
    return tulpar_home


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["--check", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_passes_the_check(env, capsys, name):
    rc, out, err = run(capsys, name)
    stages = [line.split()[1] for line in out.splitlines()]
    assert stages[:3] == ["tokenizer", "preprocess", "pretrain"] and stages[-1] == "rehearsal"
    assert rc == 0, err
    assert " FAIL" not in out


def test_recipe_lines_name_every_stage(env, capsys):
    rc, out, _ = run(capsys, "tiny")
    assert rc == 0
    lines = {line.split()[1]: line for line in out.splitlines()}
    assert set(lines) == {"tokenizer", "preprocess", "pretrain", "sft", "dpo", "eval", "serve", "rehearsal"}
    assert "4096 tokens" in lines["tokenizer"] and "embedding 4096" in lines["tokenizer"]
    assert "16x128x1x1=2048 tok/step" in lines["pretrain"]
    assert "CPU, head_dim 32 servable" in lines["serve"]


# ------------------------------------------------------------------ broken recipes in tmp_path


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


TINY_MODEL = dict(
    dim=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    ffn_hidden_dim=384,
    max_seq_len=512,
    tie_embeddings=True,
)


def broken_recipe(
    tmp_path: Path,
    *,
    model: dict | None = None,
    pretrain: dict | None = None,
    hardware: dict | None = None,
    sft_files: list[str] | None = None,
    serve: dict | None = None,
) -> Path:
    """A tiny-sized recipe whose stage configs are files in tmp_path, so one piece at a time can be broken."""
    d = tmp_path / "recipe"
    pre = {
        "name": "broken",
        "model": {**TINY_MODEL, **(model or {})},
        "data": {"dataset": "tiny"},
        "train": {"steps": 10, "batch_size": 4, "seq_len": 128},
        "ray": {"num_workers": 1, "use_gpu": False},
    }
    for k, v in (pretrain or {}).items():
        pre.setdefault(k, {}).update(v) if isinstance(v, dict) else pre.__setitem__(k, v)
    write(d / "pretrain.yaml", pre)
    sft = yaml.safe_load((REPO / "configs/sft/tiny.yaml").read_text())
    if sft_files is not None:
        sft["data"]["files"] = sft_files
    write(d / "sft.yaml", sft)
    srv = yaml.safe_load((REPO / "configs/serve/tiny.yaml").read_text())
    srv.update(serve or {})
    write(d / "serve.yaml", srv)
    return write(
        d / "broken.yaml",
        {
            "name": "broken",
            "model_name": "tulpar-broken",
            "hardware": hardware or {"accelerator": "cpu"},
            "tokenizer": {"config": "tiny"},
            "preprocess": {"config": "tiny"},
            "pretrain": {"config": "pretrain.yaml"},
            "sft": {"config": "sft.yaml"},
            "eval": {"config": "tiny"},
            "serve": {"config": "serve.yaml"},
        },
    )


def failures(err: str) -> list[str]:
    return [line.strip() for line in err.splitlines() if line.startswith("  recipe ")]


def test_a_valid_tmp_recipe_passes_and_gets_its_vocabulary_from_the_tokenizer(env, capsys, tmp_path):
    rc, out, err = run(capsys, str(broken_recipe(tmp_path)))
    assert rc == 0, err
    assert "(vocab 4096)" in out  # the tiny tokenizer's 4096 tokens, no vocab_size stated in the model


def test_vocab_mismatch_fails_naming_key_and_fix(env, capsys, tmp_path):
    rc, _, err = run(capsys, str(broken_recipe(tmp_path, model={"vocab_size": 8192})))
    (msg,) = failures(err)
    assert rc == 2 and "Traceback" not in err
    assert msg.startswith("recipe broken (broken.yaml), stage pretrain, key model.vocab_size:")
    assert "states vocab_size 8192, but the vocabulary is the tokenizer's: tiny produces 4096 tokens" in msg
    assert "remove vocab_size from the model section of" in msg


def test_any_stated_vocabulary_fails_even_when_it_matches(env, capsys, tmp_path):
    """The vocabulary is derived, never configured: jobs.pretrain refuses a stated one, so the check does too."""
    rc, _, err = run(capsys, str(broken_recipe(tmp_path, model={"vocab_size": 4096})))
    (msg,) = failures(err)
    assert rc == 2 and "key model.vocab_size" in msg and "jobs.pretrain refuses a stated vocab_size" in msg


def test_unservable_head_dim_fails_on_cpu(env, capsys, tmp_path):
    # dim 192 / 4 heads = head_dim 48: not in vLLM's CPU list (it is a multiple of 8, fine on GPU)
    recipe = broken_recipe(tmp_path, model={"dim": 192, "ffn_hidden_dim": 512})
    rc, _, err = run(capsys, str(recipe))
    assert rc == 2
    (msg,) = failures(err)
    assert (
        "stage serve, key model.dim/model.num_heads: head_dim 48" in msg
        and "not servable by vLLM on CPU" in msg
    )
    assert "choose dim and num_heads" in msg


def test_unservable_head_dim_fails_on_gpu(env, capsys, tmp_path):
    # head_dim 36 (dim 144 / 4): not a multiple of 8, so FlashAttention in vLLM cannot serve it on a GPU
    recipe = broken_recipe(
        tmp_path, model={"dim": 144}, serve={"use_gpu": True}, hardware={"accelerator": "cpu"}
    )
    rc, _, err = run(capsys, str(recipe))
    msgs = [m for m in failures(err) if "stage serve," in m]
    assert rc == 2 and len(msgs) == 1
    assert "head_dim 36" in msgs[0] and "not servable by vLLM on GPU" in msgs[0]


def test_tokens_per_step_that_does_not_add_up_fails(env, capsys, tmp_path):
    recipe = broken_recipe(tmp_path, hardware={"accelerator": "cpu", "tokens_per_step": 1000})
    rc, _, err = run(capsys, str(recipe))
    (msg,) = failures(err)
    assert rc == 2
    assert "stage pretrain, key hardware.tokens_per_step: the recipe states 1000 tokens per step" in msg
    assert "batch_size 4 x seq_len 128 x accumulation 1 x num_workers 1 = 512" in msg
    assert "set hardware.tokens_per_step: 512" in msg


def test_tokens_per_step_that_rounds_fails(env, capsys, tmp_path):
    # 1000 tokens per step with 4 x 128 micro-batches rounds to 2 accumulation steps = 1024 tokens
    recipe = broken_recipe(
        tmp_path,
        pretrain={"train": {"tokens_per_step": 1000}},
        hardware={"accelerator": "cpu", "tokens_per_step": 1024},
    )
    rc, _, err = run(capsys, str(recipe))
    (msg,) = failures(err)
    assert rc == 2 and "key train.tokens_per_step: 1000 is not a whole number of micro-batches" in msg


def test_path_into_tests_fails(env, capsys, tmp_path):
    recipe = broken_recipe(tmp_path, sft_files=["tests/fixtures/eval/generic_en.jsonl"])
    rc, _, err = run(capsys, str(recipe))
    (msg,) = failures(err)
    assert rc == 2
    assert "stage sft, key data.files.0: 'tests/fixtures/eval/generic_en.jsonl' points into tests/" in msg
    assert "move the file to TULPAR_DATA or configs/" in msg


def test_missing_input_file_fails(env, capsys, tmp_path):
    recipe = broken_recipe(tmp_path, sft_files=["sft/no_such_file.jsonl"])
    rc, _, err = run(capsys, str(recipe))
    (msg,) = failures(err)
    assert rc == 2 and "stage sft, key data.files.0: 'sft/no_such_file.jsonl' not found" in msg


def test_rehearsal_that_changes_shapes_fails(env, capsys, tmp_path):
    recipe = broken_recipe(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    data["rehearsal"] = {"pretrain": ["model.num_layers=1", "train.seq_len=64", "model.vocab_size=512"]}
    write(recipe, data)
    rc, _, err = run(capsys, str(recipe))
    msgs = failures(err)
    assert rc == 2
    assert any("key rehearsal.pretrain: model.num_layers: 1 != the recipe's 2" in m for m in msgs)
    assert any("key rehearsal.pretrain: train.seq_len: 64 != the recipe's 128" in m for m in msgs)
    assert any("key rehearsal.pretrain: model.vocab_size: 512 != the tokenizer's 4096" in m for m in msgs)


def test_gpu_memory_that_does_not_fit_fails(env, capsys, tmp_path):
    recipe = broken_recipe(
        tmp_path,
        pretrain={"train": {"batch_size": 2048, "seq_len": 512}, "ray": {"use_gpu": True}},
        hardware={"accelerator": "gpu", "gpu_type": "T4-16GB", "gpu_memory_gb": 16},
    )
    rc, _, err = run(capsys, str(recipe))
    msg = next(m for m in failures(err) if "stage pretrain" in m)
    assert rc == 2 and "key train.batch_size: estimated" in msg and "exceeds T4-16GB's 16 GB" in msg


def test_unknown_recipe_exits_2(env, capsys):
    rc, _, err = run(capsys, "no-such-recipe")
    assert rc == 2 and "unknown recipe 'no-such-recipe'" in err


# ------------------------------------------------------------------ the memory estimate


def test_memory_estimate_matches_the_formula():
    m = ModelConfig(
        vocab_size=1024,
        dim=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_dim=512,
        max_seq_len=256,
    )
    p = m.num_params()
    est = estimate_gpu_memory(
        m, rows=2, seq_len=128, num_workers=1, parallelism="ddp", activation_checkpointing=False
    )
    per_layer = (16 * 256 + 4 * 128 + 8 * 512) * 2 * 128
    expected = (16 * p + 4 * per_layer + 10 * 2 * 128 * 1024) * 1.1 / 2**30 + 1.5
    assert est.total_gb == pytest.approx(expected)
    ckpt = estimate_gpu_memory(
        m, rows=2, seq_len=128, num_workers=1, parallelism="ddp", activation_checkpointing=True
    )
    assert ckpt.activations_gb == pytest.approx((4 * 256 * 4 * 2 * 128 + per_layer) / 2**30)
    fsdp = estimate_gpu_memory(
        m, rows=2, seq_len=128, num_workers=8, parallelism="fsdp", activation_checkpointing=False
    )
    ddp = estimate_gpu_memory(
        m, rows=2, seq_len=128, num_workers=8, parallelism="ddp", activation_checkpointing=False
    )
    assert fsdp.states_gb < est.states_gb / 4 < ddp.states_gb


def test_kk_350m_memory_estimate_fits_an_h100():
    """The shipped kk-350m pretraining shape: FSDP over 8, activation checkpointing, 8 x 4096 per micro-batch."""
    m = ModelConfig(
        vocab_size=32000,
        dim=1024,
        num_layers=24,
        num_heads=16,
        num_kv_heads=8,
        ffn_hidden_dim=2816,
        max_seq_len=4096,
    )
    est = estimate_gpu_memory(
        m, rows=8, seq_len=4096, num_workers=8, parallelism="fsdp", activation_checkpointing=True
    )
    assert 10 < est.total_gb < 80
    no_ckpt = estimate_gpu_memory(
        m, rows=8, seq_len=4096, num_workers=8, parallelism="fsdp", activation_checkpointing=False
    )
    assert no_ckpt.activations_gb > 5 * est.activations_gb  # what activation checkpointing saves


def test_serving_an_alias_the_gate_does_not_move_fails(env, capsys, tmp_path):
    recipe = broken_recipe(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    data["rehearsal"] = {"eval": ["gate.alias=rehearsal"]}  # the rehearsal still serves @champion
    write(recipe, data)
    rc, _, err = run(capsys, str(recipe))
    (msg,) = failures(err)
    assert rc == 2 and "stage rehearsal, key rehearsal.serve: alias: serves @champion" in msg
    assert "the eval gate promotes to @rehearsal" in msg and "set rehearsal.serve alias=rehearsal" in msg


# ------------------------------------------------------------------ context extension: `extend` and `init`


def extension_recipe(
    tmp_path: Path, extend: dict | None = None, eval_overrides: list[str] | None = None
) -> Path:
    """broken_recipe's chain with an extend stage (a tiny-extend-like config in tmp_path) and the long-context
    eval: pretrain at seq_len 128, extend x4 to 512."""
    recipe = broken_recipe(tmp_path)
    ext = yaml.safe_load((REPO / "configs/pretrain/tiny-extend.yaml").read_text())
    for k, v in (extend or {}).items():
        ext.setdefault(k, {}).update(v) if isinstance(v, dict) else ext.__setitem__(k, v)
    write(recipe.parent / "extend.yaml", ext)
    data = yaml.safe_load(recipe.read_text())
    data["extend"] = {"config": "extend.yaml"}
    data["eval"] = {
        "config": "long-context",
        "overrides": eval_overrides or ["gate.rules=[{metric: passkey/480/acc, max_abs_regression: 0.1}]"],
    }
    return write(recipe, data)


def test_an_extend_stage_is_checked_against_the_pretrain_stage_it_continues(env, capsys, tmp_path):
    rc, out, err = run(capsys, str(extension_recipe(tmp_path)))
    assert rc == 0, err
    lines = {line.split()[1]: line for line in out.splitlines()}
    assert "max_seq_len 512 (yarn x4 from 128), seq 512<=512, 8x512x1x1=4096 tok/step" in lines["extend"]

    cases = [  # (extend config changes, the message naming the key)
        (
            {"model": {"rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_seq_len": 256}}},
            "key model.rope_scaling.original_max_seq_len: extend: 256, but the pretrain stage trains at "
            "train.seq_len 128",
        ),
        ({"model": {"dim": 256}}, "key model: extend: model.dim = 256 differs from the init model's 128"),
        ({"model": {"max_seq_len": 256}}, "model.max_seq_len = 256 is below the init model's 512"),
        ({"train": {"seq_len": 128}}, "key train.seq_len: 128 is not longer than the pretrain stage's 128"),
    ]
    for i, (changes, message) in enumerate(cases):
        rc, _, err = run(capsys, str(extension_recipe(tmp_path / str(i), changes)))
        assert rc == 2 and any(message in m for m in failures(err)), (changes, err)
    # the factor must be max_seq_len / original_max_seq_len (ModelConfig's rule, through the merged config)
    bad = {"model": {"rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_seq_len": 128}}}
    rc, _, err = run(capsys, str(extension_recipe(tmp_path / "factor", bad)))
    assert rc == 2 and "rope_scaling.factor (2.0) must equal max_seq_len" in err
    # a gate on a passkey length the extended model cannot take is caught before anything runs
    rc, _, err = run(
        capsys,
        str(
            extension_recipe(
                tmp_path / "gate", eval_overrides=["gate.rules=[{metric: passkey/1024/acc, min: 0.5}]"]
            )
        ),
    )
    (msg,) = failures(err)
    assert rc == 2 and "stage eval, key gate.rules: passkey/1024/acc: passkey length 1024" in msg


def test_a_pretrain_stage_with_an_init_directory_needs_the_tokenizers_vocabulary(env, capsys, tmp_path):
    from llm_core.export_hf import hf_config

    def init_dir(vocab: int) -> Path:
        d = tmp_path / f"init-{vocab}"
        d.mkdir(exist_ok=True)
        cfg = ModelConfig(vocab_size=vocab, **TINY_MODEL)
        (d / "config.json").write_text(json.dumps(hf_config(cfg, eos_token_id=0)))
        return d

    rc, out, err = run(
        capsys,
        str(broken_recipe(tmp_path / "ok", pretrain={"init": str(init_dir(4096)), "model": {}})),
    )
    assert rc == 0, err
    assert f"from init {init_dir(4096)}" in out
    rc, _, err = run(
        capsys, str(broken_recipe(tmp_path / "bad", pretrain={"init": str(init_dir(1024)), "model": {}}))
    )
    assert rc == 2 and "has vocab_size 1024, but this recipe's tokenizer tiny produces 4096 tokens" in err
    rc, _, err = run(
        capsys,
        str(broken_recipe(tmp_path / "reg", pretrain={"init": "models:/other@pretrain-latest", "model": {}})),
    )
    assert rc == 2 and "continue from this recipe's own pretrained model with an `extend:` stage" in err

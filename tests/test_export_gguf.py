"""GGUF export (jobs.export_gguf, llm_core.export_gguf): a round trip through an independent reader.

transformers' GGUF loader (its own metadata reader, tokenizer rebuilt from the file's vocabulary, merges and
`tokenizer.ggml.pre`, tensors dequantized by gguf-py) reads what our writer wrote; tokenization of the FLORES-200
devtest lines and the logits are compared with our tokenizer and the HF export. A tokenizer llama.cpp would split
differently is refused, and exported with a warning only when asked.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jobs.export_gguf import main as export_main
from jobs.platform.configfile import model_config_from_preset
from llm_core.data import RandomWindows, concat_documents
from llm_core.export_gguf import (
    TokenizerMismatch,
    export_gguf,
    llama_cpp_differences,
    llama_cpp_tokenizer,
    ollama_modelfile,
)
from llm_core.export_hf import export_hf
from llm_core.model import Transformer
from llm_core.text import sample_language
from llm_core.tokenizer import train_bpe
from llm_core.trainer import TrainConfig, Trainer
from tests.conftest import small_config, small_moe_config

gguf = pytest.importorskip("gguf")
FLORES = {"kk": "kaz_Cyrl.devtest", "ru": "rus_Cyrl.devtest", "en": "eng_Latn.devtest"}
VOCAB = 1024


@pytest.fixture(scope="module")
def corpus(data_dir) -> list[str]:
    return [d for lang in ("kk", "ru", "en") for d in sample_language(data_dir / "corpus" / lang, 60_000, 20)]


@pytest.fixture(scope="module")
def flores(data_dir) -> dict[str, list[str]]:
    root = data_dir / "eval" / "parallel" / "flores200_devtest"
    return {lang: (root / f).read_text(encoding="utf-8").splitlines() for lang, f in FLORES.items()}


@pytest.fixture(scope="module")
def llama_bpe_tokenizer(corpus):
    return train_bpe(corpus, VOCAB, pre_tokenizer="llama-bpe", normalization="none")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, corpus, llama_bpe_tokenizer):
    """The tiny preset trained briefly with the llama-bpe tokenizer: its HF export, and GGUFs written by the CLI
    from that HF directory in each dtype."""
    tok = llama_bpe_tokenizer
    torch.manual_seed(0)
    model = Transformer(model_config_from_preset("tiny", [f"vocab_size={tok.vocab_size}"]))
    tokens = concat_documents(tok.iter_documents(corpus), tok.vocab_size)
    steps = 30  # enough to move the logits well away from the initialisation's near-uniform ones
    trainer = Trainer(
        model, TrainConfig(steps=steps, batch_size=8, seq_len=64, lr=5e-3, warmup_steps=5, eval_every=10**6)
    )
    sampler = RandomWindows(np.asarray(tokens), 64, 8, seed=0)
    for _ in range(steps):
        trainer.train_step(sampler.next_step())
    root = tmp_path_factory.mktemp("gguf")
    hf_dir = export_hf(model.eval(), root / "hf", tokenizer=tok)
    summaries = {}
    for dtype in ("f16", "q8_0", "bf16"):
        out = root / f"tiny-{dtype}.gguf"
        assert export_main(["--model", str(hf_dir), "--out", str(out), "--dtype", dtype]) == 0
        summaries[dtype] = out
    return hf_dir, root, summaries


def _flores_batch(tok, flores, per_language: int = 8, length: int = 48) -> torch.Tensor:
    rows = []
    for lines in flores.values():
        ids = [x for x in tok.encode_batch(lines[:40]) if len(x) >= length][:per_language]
        assert len(ids) == per_language
        rows += [x[:length] for x in ids]
    return torch.tensor(rows)


def test_gguf_metadata_declares_llama_bpe_and_chat_template(exported, llama_bpe_tokenizer):
    _, _, files = exported
    reader = gguf.GGUFReader(files["f16"])
    fields = {name: reader.fields[name] for name in reader.fields}

    def value(key):
        return fields[key].contents()

    assert value("general.architecture") == "llama"
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == "llama-bpe"
    assert value("tokenizer.chat_template") == llama_bpe_tokenizer.chat_template
    assert value("tokenizer.ggml.add_bos_token") is False
    assert value("tokenizer.ggml.eos_token_id") == llama_bpe_tokenizer.im_end_id
    types = value("tokenizer.ggml.token_type")
    assert types[llama_bpe_tokenizer.im_start_id] == gguf.TokenType.CONTROL
    assert len(value("tokenizer.ggml.tokens")) == llama_bpe_tokenizer.vocab_size
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in kinds  # tied embeddings: llama.cpp reuses token_embd
    q8 = {t.name: t.tensor_type.name for t in gguf.GGUFReader(files["q8_0"]).tensors}
    assert q8["blk.0.ffn_down.weight"] == "Q8_0" and q8["token_embd.weight"] == "Q8_0"


def test_tokenizer_read_back_from_gguf_tokenizes_flores_like_ours(exported, llama_bpe_tokenizer, flores):
    from transformers import AutoTokenizer

    _, root, files = exported
    theirs = AutoTokenizer.from_pretrained(root, gguf_file=files["f16"].name)
    for lang, lines in flores.items():
        ours = llama_bpe_tokenizer.encode_batch(lines)
        read_back = [theirs.encode(line, add_special_tokens=False) for line in lines]
        differing = [i for i, (a, b) in enumerate(zip(ours, read_back)) if a != b]
        assert not differing, (
            f"{lang}: {len(differing)} of {len(lines)} lines differ, e.g. {lines[differing[0]]!r}"
        )
        # and the tokenizer llama.cpp builds (its llama-bpe regex, ignore_merges) agrees too
        emulated = llama_cpp_tokenizer(llama_bpe_tokenizer, "llama-bpe")
        assert [e.ids for e in emulated.encode_batch(lines, add_special_tokens=False)] == ours
    chat = [{"role": "system", "content": "Сіз көмекшісіз."}, {"role": "user", "content": "Сәлем! 2026 жыл."}]
    text = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == llama_bpe_tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    assert theirs.encode(text, add_special_tokens=False) == llama_bpe_tokenizer.encode(text)


def test_gguf_logits_match_the_hf_export(exported, llama_bpe_tokenizer, flores):
    from transformers import AutoModelForCausalLM

    hf_dir, root, files = exported
    ids = _flores_batch(llama_bpe_tokenizer, flores)
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        ref = hf(ids).logits
        rounded = {}  # the HF model with its matrices rounded as the f16/bf16 GGUFs store them (norms stay f32)
        for dtype in (torch.float16, torch.bfloat16):
            hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            for p in hf.parameters():
                if p.dim() == 2:
                    p.copy_(p.to(dtype).float())
            rounded[dtype] = hf(ids).logits
        got = {}
        for dtype, path in files.items():
            model = AutoModelForCausalLM.from_pretrained(
                root, gguf_file=path.name, dtype=torch.float32
            ).eval()
            got[dtype] = model(ids).logits
    assert ref.abs().max() > 1.0  # a trained model: the comparison has something to compare
    # f16/bf16 rounding of the matrices is the only difference (f16 alone moves this model's logits by ~0.15)
    assert (got["f16"] - rounded[torch.float16]).abs().max().item() < 1e-4
    assert (got["bf16"] - rounded[torch.bfloat16]).abs().max().item() < 1e-4
    agree = (got["q8_0"].argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.99, f"q8_0 argmax agreement {agree:.4f}"


def test_untied_embeddings_and_gqa_round_trip(tmp_path, llama_bpe_tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    cfg = small_config(vocab_size=llama_bpe_tokenizer.vocab_size, tie_embeddings=False, rope_theta=500000.0)
    model = Transformer(cfg).eval()
    with (
        torch.no_grad()
    ):  # larger weights than init (logits far from zero), already f16 values: f16 is lossless
        for p in model.parameters():
            p.copy_((p * 4.0).half().float())
    hf_dir = export_hf(model, tmp_path / "hf", tokenizer=llama_bpe_tokenizer)
    result = export_gguf(model, llama_bpe_tokenizer, tmp_path / "m.gguf", dtype="f16")
    assert result.tensor_types["output.weight"] == "F16"
    ids = torch.tensor([llama_bpe_tokenizer.encode("Мәскеу — Ресейдің астанасы. London is 1,234 km away.")])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()(
            ids
        )
    assert ref.abs().max() > 1.0
    assert (got.logits - ref).abs().max().item() < 1e-4  # same weights: only the layout can differ


def test_export_refuses_a_tokenizer_llama_cpp_splits_differently(tmp_path, corpus, flores, capsys):
    shipped = train_bpe(corpus, VOCAB, pre_tokenizer="gpt2", digits="group3", superword_fraction=0.15)
    differences = llama_cpp_differences(shipped)
    assert any(d.startswith("pre-tokenizer") for d in differences)
    assert any(d.startswith("normalizer: ours applies NFC") for d in differences)
    # the refusal is not spurious: llama.cpp's tokenization of the same vocabulary differs on real text
    emulated = llama_cpp_tokenizer(shipped, "llama-bpe")
    lines = flores["kk"][:50]
    ours = shipped.encode_batch(lines)
    assert sum(a != e.ids for a, e in zip(ours, emulated.encode_batch(lines, add_special_tokens=False))) > 10

    torch.manual_seed(0)
    model = Transformer(small_config(vocab_size=shipped.vocab_size)).eval()
    hf_dir = export_hf(model, tmp_path / "hf", tokenizer=shipped)
    out = tmp_path / "refused.gguf"
    assert export_main(["--model", str(hf_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: llama.cpp would tokenize text differently" in err
    assert "pre_tokenizer=llama-bpe" in err and "--allow-tokenizer-mismatch" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob("*.gguf*"))

    with pytest.raises(TokenizerMismatch, match="normalizer"):
        export_gguf(model, shipped, out)

    assert export_main(["--model", str(hf_dir), "--out", str(out), "--allow-tokenizer-mismatch"]) == 0
    captured = capsys.readouterr()
    assert (
        "warning: exporting with tokenizer.ggml.pre = 'llama-bpe' although llama.cpp will tokenize"
        in captured.err
    )
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["tokenizer_differences"] == differences and out.is_file()


def test_moe_and_bad_arguments_are_user_errors(tmp_path, llama_bpe_tokenizer, capsys):
    moe = Transformer(small_moe_config(vocab_size=llama_bpe_tokenizer.vocab_size)).eval()
    with pytest.raises(ValueError, match="Mixture-of-Experts.*dense models only"):
        export_gguf(moe, llama_bpe_tokenizer, tmp_path / "moe.gguf")
    dense = Transformer(small_config(vocab_size=llama_bpe_tokenizer.vocab_size)).eval()
    with pytest.raises(ValueError, match="dtype 'q4_0' is not supported"):
        export_gguf(dense, llama_bpe_tokenizer, tmp_path / "m.gguf", dtype="q4_0")
    with pytest.raises(ValueError, match=r"must end in \.gguf"):
        export_gguf(dense, llama_bpe_tokenizer, tmp_path / "m.bin")
    assert export_main(["--model", str(tmp_path / "absent"), "--out", str(tmp_path / "x.gguf")]) == 2
    assert "not found" in capsys.readouterr().err


def test_modelfile_template_renders_our_chat_template(exported, llama_bpe_tokenizer):
    _, root, files = exported
    text = (root / "tiny-q8_0.Modelfile").read_text(encoding="utf-8")
    assert text == ollama_modelfile("tiny-q8_0.gguf")
    assert text.startswith("FROM ./tiny-q8_0.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text
    # render the Go template's one construct (range over .Messages) by substitution and compare with ours
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    head, rest = template.split("{{- range .Messages }}")
    body, tail = rest.split("{{ end }}")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Сәлем!"}]
    rendered = head + "".join(
        body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages
    )
    assert rendered + tail == llama_bpe_tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def test_llama_bpe_recipe_is_validated():
    from jobs.tokenizer import BPESpec

    with pytest.raises(ValueError, match="normalization=none.*superword_fraction=0"):
        BPESpec(pre_tokenizer="llama-bpe")
    spec = BPESpec(pre_tokenizer="llama-bpe", normalization="none", superword_fraction=0)
    assert spec.digits == "group3"
    with pytest.raises(ValueError, match="use group3"):
        train_bpe(["a b c"] * 10, 300, pre_tokenizer="llama-bpe", normalization="none", digits="individual")


def test_shipped_llama_bpe_config_validates():
    from jobs.platform.configfile import load_config
    from jobs.tokenizer import TokenizerJobConfig
    from tests.conftest import REPO

    cfg = load_config(TokenizerJobConfig, REPO / "configs" / "tokenizer" / "tiny-llama-bpe.yaml")
    assert (cfg.tokenizer.pre_tokenizer, cfg.tokenizer.normalization) == ("llama-bpe", "none")
    assert cfg.tokenizer.superword_fraction == 0


def test_rope_scaling_is_written_the_way_llama_cpp_reads_it(tmp_path, llama_bpe_tokenizer):
    """Llama 3.1 scaling: ggml's rope divides each base frequency by `rope_freqs`, which must give llm_core's
    scaled frequencies; YaRN: llama.cpp's rope.scaling keys. (No reader here applies either: docs/gguf.md.)"""
    from llm_core.config import RopeScaling
    from llm_core.model import rope_inv_freq

    vocab = llama_bpe_tokenizer.vocab_size
    llama3 = small_config(
        vocab_size=vocab,
        max_seq_len=256,
        rope_scaling=RopeScaling(type="llama3", factor=8.0, original_max_seq_len=32, low_freq_factor=1.0),
    )
    export_gguf(Transformer(llama3).eval(), llama_bpe_tokenizer, tmp_path / "llama3.gguf")
    reader = gguf.GGUFReader(tmp_path / "llama3.gguf")
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert freqs.tensor_type.name == "F32"
    hd = llama3.head_dim
    base = 1.0 / (llama3.rope_theta ** (np.arange(0, hd, 2) / hd))
    scaled, _ = rope_inv_freq(llama3)
    np.testing.assert_allclose(base / np.asarray(freqs.data), scaled.numpy(), rtol=1e-5)
    assert (np.asarray(freqs.data) > 1).any()  # the scaling does something at this length

    yarn = small_config(
        vocab_size=vocab,
        max_seq_len=256,
        rope_scaling=RopeScaling(type="yarn", factor=4.0, original_max_seq_len=64),
    )
    export_gguf(Transformer(yarn).eval(), llama_bpe_tokenizer, tmp_path / "yarn.gguf")
    fields = gguf.GGUFReader(tmp_path / "yarn.gguf").fields
    assert fields["llama.rope.scaling.type"].contents() == "yarn"
    assert fields["llama.rope.scaling.factor"].contents() == 4.0
    assert fields["llama.rope.scaling.original_context_length"].contents() == 64
    assert fields["llama.rope.scaling.yarn_beta_fast"].contents() == 32.0


def test_ignore_merges_difference_is_found():
    """llama.cpp's llama-bpe takes a pre-token that is a vocabulary entry whole (ignore_merges); a vocabulary
    whose merges do not rebuild such an entry tokenizes differently there, and the check says so."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    from llm_core.tokenizer import SPECIAL_TOKENS, Tokenizer, build_pretokenizer

    vocab = {c: i for i, c in enumerate("abc")} | {"ab": 3, "bc": 4, "abc": 5}
    # "a b" is merged first, so "abc" ends as ["ab", "c"] although "abc" is in the vocabulary
    bpe = models.BPE(vocab=vocab, merges=[("a", "b"), ("b", "c"), ("a", "bc")])
    tk = HFTokenizer(bpe)
    tk.pre_tokenizer = build_pretokenizer("llama-bpe", "group3")
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIAL_TOKENS)
    tok = Tokenizer(tk)
    assert tok.encode("abc") == [3, 2]
    assert llama_cpp_tokenizer(tok, "llama-bpe").encode("abc", add_special_tokens=False).ids == [5]
    (difference,) = llama_cpp_differences(tok)
    assert difference.startswith("ignore_merges:") and "1 entries differ (e.g. ['abc'])" in difference

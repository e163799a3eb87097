"""Export llm_core dense models to GGUF, the file llama.cpp, Ollama and LM Studio run, with the tokenizer inside.

    export_gguf(model, tokenizer, "tulpar-tiny-f16.gguf", dtype="f16")   # also bf16, q8_0

writes the model under the `llama` GGUF architecture (our dense model is Llama: RMSNorm, RoPE, SwiGLU, GQA, tied
or untied embeddings), the byte-level BPE (`tokenizer.ggml.model = gpt2`: tokens, token types, merges, special
ids) and the ChatML chat template, plus an Ollama Modelfile beside it (`<stem>.Modelfile`).

Tokenizer compatibility. A GGUF does not carry our `tokenizer.json`: llama.cpp rebuilds the tokenizer from the
vocabulary and merges and splits the text with one of the regexes compiled into it, chosen by the name in
`tokenizer.ggml.pre`, with no normalizer. A tokenizer tokenizes identically there only when its own pipeline is
exactly one of those: `llama_cpp_differences` lists what is not (a pre-tokenizer regex llama.cpp does not know,
NFC normalization, BPE options), and `export_gguf` refuses such a tokenizer unless `allow_tokenizer_mismatch`,
in which case it warns with the same list. Tokenizers trained with `pre_tokenizer="llama-bpe"` (and
`"llama3"` with individual digits and no normalization: llama.cpp's `qwen2`) have none.
`llama_cpp_tokenizer` builds the tokenizer llama.cpp would use, for measuring the mismatch (docs/gguf.md).

Tensors (i = layer), from the HF names of `export_hf.to_hf_state_dict`:

    token_embd.weight            model.embed_tokens.weight
    blk.i.attn_norm.weight       model.layers.i.input_layernorm.weight                 (F32)
    blk.i.attn_{q,k}.weight      model.layers.i.self_attn.{q,k}_proj.weight, rows permuted (see _rope_interleave)
    blk.i.attn_{v,output}.weight model.layers.i.self_attn.{v,o}_proj.weight
    blk.i.ffn_norm.weight        model.layers.i.post_attention_layernorm.weight        (F32)
    blk.i.ffn_{gate,up,down}     model.layers.i.mlp.{gate,up,down}_proj.weight
    output_norm.weight           model.norm.weight                                     (F32)
    output.weight                lm_head.weight (untied embeddings only)
    rope_freqs.weight            Llama 3.1 RoPE scaling: per-frequency divisors         (F32)

MoE models are refused: ours maps onto Qwen2-MoE, whose GGUF counterpart (`qwen2moe`) has no reader here to
verify an export against (see docs/gguf.md).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from llm_core.checkpoint import unwrap_model
from llm_core.config import ModelConfig
from llm_core.export_hf import to_hf_state_dict
from llm_core.model import Transformer, rope_inv_freq
from llm_core.tokenizer import ENDOFTEXT, IM_END, IM_START, Tokenizer, pretokenizer_pattern

log = logging.getLogger("tulpar.export_gguf")

GgufDtype = Literal["f16", "bf16", "q8_0"]
GGUF_DTYPES: tuple[str, ...] = ("f16", "bf16", "q8_0")

# The named pre-tokenizers of llama.cpp (src/llama-vocab.cpp) that a tokenizer of ours can match exactly: the regex
# llama.cpp applies and whether it sets `ignore_merges` (a pre-token that is itself a vocabulary entry becomes that
# token without running the merges). `gpt-2` is only used to measure a mismatch: no recipe of ours produces it.
LLAMA_CPP_PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    "llama-bpe": (pretokenizer_pattern("llama-bpe", "group3"), True),
    "qwen2": (pretokenizer_pattern("llama3", "individual"), False),
    "gpt-2": (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)", False),
}
# the names an export may declare (gpt-2's regex is none of our recipes)
EXPORTABLE_PRE_TOKENIZERS = ("llama-bpe", "qwen2")
LLAMA_BPE_FIX = (
    "train the tokenizer with pre_tokenizer=llama-bpe (normalization=none, superword_fraction=0; "
    "configs/tokenizer/tiny-llama-bpe.yaml) and the model on it"
)

# ggml type ids (gguf.GGMLQuantizationType) and file types (gguf.LlamaFileType), by our dtype name
_TENSOR_TYPE = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
_FILE_TYPE = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
_Q8_BLOCK = 32  # Q8_0 quantizes blocks of 32 values along a row


class TokenizerMismatch(ValueError):
    """llama.cpp would tokenize text differently from our tokenizer; the message lists how and the fix."""


# ------------------------------------------------------------------------------------ tokenizer compatibility


def _pre_tokenizer_json(pattern: str) -> dict:
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return json.loads(tk.to_str())["pre_tokenizer"]


def _describe_pre_tokenizer(pre: dict | None) -> str:
    if pre is None:
        return "none"
    if pre.get("type") == "Sequence":
        return " then ".join(_describe_pre_tokenizer(p) for p in pre["pretokenizers"])
    if pre.get("type") == "Split":
        return f"Split(regex {pre['pattern'].get('Regex', pre['pattern'])!r})"
    if pre.get("type") == "ByteLevel":
        return "ByteLevel(GPT-2 regex)" if pre.get("use_regex") else "ByteLevel"
    return str(pre.get("type"))


def llama_cpp_pre_tokenizer(tokenizer: Tokenizer) -> str | None:
    """The llama.cpp pre-tokenizer name whose regex is exactly this tokenizer's, or None."""
    ours = json.loads(tokenizer.tk.to_str()).get("pre_tokenizer")
    for name in EXPORTABLE_PRE_TOKENIZERS:
        if ours == _pre_tokenizer_json(LLAMA_CPP_PRE_TOKENIZERS[name][0]):
            return name
    return None


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other bytes for the
    code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _unrebuilt_tokens(tk: HFTokenizer, pattern: str) -> list[str]:
    """Vocabulary entries that can be a whole pre-token but which the merges do not rebuild into one token: where
    llama.cpp's `ignore_merges` gives that one token and plain BPE gives several."""
    to_byte = {c: b for b, c in _byte_level_alphabet().items()}
    pre = HFTokenizer(models.BPE())
    pre.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    added = {t.content for t in tk.get_added_tokens_decoder().values()}
    found = []
    for token in tk.get_vocab(with_added_tokens=False):
        if token in added or len(token) < 2 or any(c not in to_byte for c in token):
            continue
        try:
            text = bytes(to_byte[c] for c in token).decode("utf-8")
        except UnicodeDecodeError:  # ends inside a character: never a whole pre-token
            continue
        if [p for p, _ in pre.pre_tokenizer.pre_tokenize_str(text)] != [text]:
            continue
        if len(tk.model.tokenize(token)) != 1:
            found.append(text)
    return found


def llama_cpp_differences(tokenizer: Tokenizer, pre: str | None = None) -> list[str]:
    """How llama.cpp, reading this tokenizer from a GGUF that declares `pre` (default: the matching name, else
    llama-bpe), would tokenize text differently from it; empty when it tokenizes identically."""
    state = json.loads(tokenizer.tk.to_str())
    matched = llama_cpp_pre_tokenizer(tokenizer)
    pre = pre or matched or "llama-bpe"
    if pre not in LLAMA_CPP_PRE_TOKENIZERS:
        raise ValueError(
            f"unknown llama.cpp pre-tokenizer {pre!r}: choose one of {sorted(LLAMA_CPP_PRE_TOKENIZERS)}"
        )
    pattern, ignore_merges = LLAMA_CPP_PRE_TOKENIZERS[pre]
    out = []
    if state.get("pre_tokenizer") != _pre_tokenizer_json(pattern):
        out.append(
            f"pre-tokenizer: ours is {_describe_pre_tokenizer(state.get('pre_tokenizer'))}, llama.cpp's "
            f"{pre!r} splits with regex {pattern!r} (a superword stage, GPT-2 letter/space rules or another digit "
            "rule split text into other pieces)"
        )
    normalizer = state.get("normalizer")
    if normalizer is not None:
        out.append(
            f"normalizer: ours applies {normalizer.get('type')} before splitting, llama.cpp applies none (text not "
            "already in that form, e.g. decomposed Cyrillic й = и + U+0306, encodes to other ids)"
        )
    model = state.get("model", {})
    if model.get("type") != "BPE":
        out.append(f"model: ours is {model.get('type')}, a GGUF gpt2 tokenizer is byte-level BPE")
    for key in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key) not in (None, ""):
            out.append(f"BPE {key}: ours is {model.get(key)!r}, llama.cpp's BPE has no {key}")
    if model.get("byte_fallback"):
        out.append("BPE byte_fallback: ours falls back to <0xNN> tokens, llama.cpp's gpt2 tokenizer does not")
    if bool(model.get("ignore_merges", False)) != ignore_merges and not out:
        unrebuilt = _unrebuilt_tokens(tokenizer.tk, pattern)
        if unrebuilt:
            out.append(
                f"ignore_merges: llama.cpp's {pre!r} {'takes' if ignore_merges else 'does not take'} a pre-token "
                f"that is a vocabulary entry whole, ours {'does not' if ignore_merges else 'does'}; "
                f"{len(unrebuilt)} entries differ (e.g. {unrebuilt[:3]})"
            )
    return out


def llama_cpp_tokenizer(tokenizer: Tokenizer, pre: str) -> HFTokenizer:
    """The tokenizer llama.cpp builds from our vocabulary and merges under `tokenizer.ggml.pre = pre`: its regex,
    byte-level mapping, no normalizer, its ignore_merges; special tokens matched whole, as llama.cpp does."""
    if pre not in LLAMA_CPP_PRE_TOKENIZERS:
        raise ValueError(
            f"unknown llama.cpp pre-tokenizer {pre!r}: choose one of {sorted(LLAMA_CPP_PRE_TOKENIZERS)}"
        )
    pattern, ignore_merges = LLAMA_CPP_PRE_TOKENIZERS[pre]
    state = json.loads(tokenizer.tk.to_str())
    state["normalizer"] = None
    state["post_processor"] = None
    state["pre_tokenizer"] = _pre_tokenizer_json(pattern)
    state["model"]["ignore_merges"] = ignore_merges
    return HFTokenizer.from_str(json.dumps(state, ensure_ascii=False))


# ------------------------------------------------------------------------------------------------ the Modelfile


def ollama_modelfile(gguf_name: str) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` (beside it): our ChatML template as a Go template (each
    message `<|im_start|>role\\ncontent<|im_end|>\\n`, then the assistant header), stopping on the chat end tokens."""
    template = (
        "{{- range .Messages }}"
        + IM_START
        + "{{ .Role }}\n{{ .Content }}"
        + IM_END
        + "\n{{ end }}"
        + IM_START
        + "assistant\n"
    )
    lines = [
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
        *(f'PARAMETER stop "{t}"' for t in (IM_END, ENDOFTEXT, IM_START)),
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ tensors


def _rope_interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection from our rotate-half RoPE layout (pairs (j, j + hd/2) of each head) to ggml's
    `llama` layout (pairs (2j, 2j + 1)): llama.cpp's llama architecture rotates adjacent pairs."""
    out_features, in_features = w.shape
    head_dim = out_features // heads
    return w.reshape(heads, 2, head_dim // 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def _gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")  # model.layers.<i>.<module>.<proj>.weight | model.layers.<i>.<norm>.weight
    layer, rest = parts[2], ".".join(parts[3:])
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    return f"blk.{layer}.{names[rest]}"


def gguf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """Every tensor of the GGUF as float32 numpy arrays in torch (row-major) order, under GGUF names."""
    model = unwrap_model(model)
    cfg = model.cfg
    out: dict[str, np.ndarray] = {}
    for hf, t in to_hf_state_dict(model, dtype="float32").items():
        if hf.endswith("self_attn.q_proj.weight"):
            t = _rope_interleave(t, cfg.num_heads)
        elif hf.endswith("self_attn.k_proj.weight"):
            t = _rope_interleave(t, cfg.num_kv_heads)
        out[_gguf_name(hf)] = t.numpy()
    if cfg.rope_scaling is not None and cfg.rope_scaling.type == "llama3":
        out["rope_freqs.weight"] = rope_freq_factors(cfg)
    return out


def rope_freq_factors(cfg: ModelConfig) -> np.ndarray:
    """Llama 3.1 RoPE scaling as llama.cpp stores it: per frequency, the divisor of the unscaled frequency
    (ggml's rope uses theta = position * base_frequency / factor)."""
    unscaled = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim)
    )
    scaled, _ = rope_inv_freq(cfg)
    return (unscaled / scaled).to(torch.float32).numpy()


# ------------------------------------------------------------------------------------------------------ export


@dataclass
class GgufExport:
    """What `export_gguf` wrote."""

    path: Path
    modelfile: Path
    dtype: str
    tokenizer_pre: str
    tokenizer_differences: list[str] = field(default_factory=list)
    tensor_types: dict[str, str] = field(default_factory=dict)  # GGUF name -> ggml type name


def _check_model(cfg: ModelConfig) -> None:
    if cfg.is_moe:
        raise ValueError(
            f"model {cfg.name!r} is a Mixture-of-Experts model ({cfg.num_experts} experts): GGUF export supports "
            "dense models only (the llama architecture). Our MoE maps onto Qwen2-MoE, whose GGUF architecture "
            "(qwen2moe) is not written by Tulpar: no reader here can verify it. Export it to HF "
            "(llm_core.export_hf) for transformers / vLLM instead"
        )
    if cfg.is_mla:
        raise ValueError(
            f"model {cfg.name!r} uses multi-head latent attention (attention: mla): GGUF export writes the llama "
            "architecture only, and llama.cpp's DeepSeek architecture (deepseek2) is not written by Tulpar. Export "
            "it to HF (llm_core.export_hf, DeepseekV3ForCausalLM) for transformers / vLLM instead"
        )


def export_gguf(
    model: Transformer,
    tokenizer: Tokenizer,
    path: str | Path,
    *,
    dtype: str = "f16",
    name: str | None = None,
    allow_tokenizer_mismatch: bool = False,
) -> GgufExport:
    """Write `model` with `tokenizer` as a GGUF file at `path` (f16, bf16 or q8_0) and an Ollama Modelfile beside it.

    Raises TokenizerMismatch when llama.cpp would tokenize differently (see `llama_cpp_differences`) unless
    `allow_tokenizer_mismatch`, which warns instead and declares the nearest name (llama-bpe).
    """
    import gguf  # the writer of llama.cpp's gguf-py; imported here so llm_core imports without it

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF dtype {dtype!r} is not supported: choose one of {', '.join(GGUF_DTYPES)}")
    model = unwrap_model(model)
    cfg = model.cfg
    _check_model(cfg)
    path = Path(path)
    if path.suffix != ".gguf":
        raise ValueError(
            f"output {str(path)!r} must end in .gguf (llama.cpp and Ollama look for it): e.g. {path}.gguf"
        )
    vocab = cfg.require_vocab_size()
    if tokenizer.vocab_size > vocab:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab}: pass the tokenizer the "
            "model was trained with"
        )

    differences = llama_cpp_differences(tokenizer)
    pre = llama_cpp_pre_tokenizer(tokenizer) or "llama-bpe"
    if differences:
        listing = "; ".join(differences)
        if not allow_tokenizer_mismatch:
            raise TokenizerMismatch(
                f"llama.cpp would tokenize text differently from this tokenizer ({listing}). Fix: {LLAMA_BPE_FIX}; "
                "or pass --allow-tokenizer-mismatch to export anyway (the model then sees other ids in llama.cpp "
                "and Ollama than it was trained on)"
            )
        message = f"exporting with tokenizer.ggml.pre = {pre!r} although llama.cpp will tokenize differently: {listing}"
        warnings.warn(message, stacklevel=2)
        log.warning(message)

    # ---- vocabulary, in id order; ids past the tokenizer's (model vocab rounded up) are unused placeholders
    id_to_token = {i: t for t, i in tokenizer.tk.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.tk.get_added_tokens_decoder()
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab):
        token = id_to_token.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [
        m if isinstance(m, str) else " ".join(m) for m in json.loads(tokenizer.tk.to_str())["model"]["merges"]
    ]

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(name or cfg.name)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPE[dtype]))
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.ffn_hidden_dim)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(vocab)
    rs = cfg.rope_scaling
    if (
        rs is not None and rs.type == "yarn"
    ):  # llama.cpp's YaRN: same ramp, floor/ceil and 0.1 ln(s) + 1 scale
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rs.factor)
        writer.add_rope_scaling_orig_ctx_len(rs.original_max_seq_len)
        writer.add_rope_scaling_yarn_beta_fast(rs.beta_fast)
        writer.add_rope_scaling_yarn_beta_slow(rs.beta_slow)
    # llama3 scaling travels as the rope_freqs tensor (gguf_tensors), as llama.cpp's converter writes it

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.im_end_id)  # a chat turn ends generation, as in tokenizer_config.json
    writer.add_eot_token_id(tokenizer.im_end_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)  # our text starts without BOS (llama-bpe's default would add one)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    tensor_types: dict[str, str] = {}
    for tname, data in gguf_tensors(model).items():
        qtype = gguf.GGMLQuantizationType[_TENSOR_TYPE[dtype]]
        if data.ndim == 1:  # norms and RoPE factors stay float32, as llama.cpp's converter keeps them
            qtype = gguf.GGMLQuantizationType.F32
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % _Q8_BLOCK:
            qtype = gguf.GGMLQuantizationType.F16  # rows that are not whole blocks cannot be Q8_0
        raw = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)
        writer.add_tensor(tname, raw, raw_dtype=qtype)  # byte rows of blocks: the writer derives the shape
        tensor_types[tname] = qtype.name
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

    modelfile = path.with_name(f"{path.stem}.Modelfile")
    modelfile.write_text(ollama_modelfile(path.name), encoding="utf-8")
    return GgufExport(path, modelfile, dtype, pre, differences, tensor_types)

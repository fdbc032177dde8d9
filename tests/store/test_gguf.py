"""Tests for jaxgpt.convert's GGUF commands: the real SmolLM2-135M-Instruct file against
transformers loading the same GGUF, and small models written and read back in every type."""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import convert as convert_cli
from jaxgpt.config import Config, FromGgufConfig, ModelConfig, ToGgufConfig
from jaxgpt.data import chat, dialogs
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.generate.engine import Engine
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.model import quant
from jaxgpt.model.gpt import GPT
from jaxgpt.store import export, runs
from jaxgpt.store.gguf import convert, models
from jaxgpt.store.gguf.weights import GGUFFile, pad_kept_vocab
from jaxgpt.store.hf.config import ConvertError
from jaxgpt.store.hf.weights import flatten

gguf = pytest.importorskip("gguf")


def _text_ids(tok: Tokenizer, n: int) -> list[int]:
    """n ids of real conversation text (the first chitchat dialogs' messages, joined)."""
    lines = [m["content"] for conv in dialogs.load("chitchat", limit=40).conversations
             for m in conv]
    ids = tok.encode(" ".join(lines))
    assert len(ids) >= n
    return ids[:n]


@pytest.fixture(scope="module")
def smol(smollm2_export):
    summary, out = smollm2_export
    return summary, runs.load(out)


@pytest.fixture(scope="module")
def hf_smol(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    kw = dict(gguf_file=smollm2_gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, dtype=torch.float32, **kw).eval()
    return tok, model, torch


@pytest.mark.slow
def test_smollm2_logits_and_greedy_decoding_match_transformers(smol, hf_smol):
    summary, loaded = smol
    hf_tok, hf_model, torch = hf_smol
    assert summary["architecture"] == "llama" and summary["quantization"] == {
        "Q8_0": 1, "Q4_1": 210, "F32": 61}
    m = loaded.cfg.model
    assert (m.n_layer, m.d_model, m.n_head, m.n_kv_head, m.d_ff, m.rope_theta,
            m.tie_embeddings) == (30, 576, 9, 3, 1536, 100000.0, True)
    ids = _text_ids(loaded.tokenizer, 64)
    with torch.no_grad():
        want = hf_model(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(GPT(m).apply(loaded.params, jnp.asarray([ids]))[0])[:, :want.shape[1]]
    assert np.abs(got - want).max() < 5e-4 < np.abs(want).max() / 1e4
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    with torch.no_grad():
        hf_new = hf_model.generate(torch.tensor([ids[:16]]), max_new_tokens=32, do_sample=False,
                                   min_new_tokens=32, eos_token_id=None, pad_token_id=0)
    engine = Engine(GPT(m), loaded.params, slots=1)
    ours = engine.generate([ids[:16]], SamplingParams(max_tokens=32, temperature=0.0))[0]
    assert ours == hf_new[0, 16:].tolist()


@pytest.mark.slow
def test_smollm2_chat_layout_is_the_templates(smol, hf_smol):
    tok, hf_tok = smol[1].tokenizer, hf_smol[0]
    assert tok.chat_format == "chatml"
    assert tok.default_system.startswith("You are a helpful AI assistant named SmolLM")
    for conv in ([{"role": "user", "content": "Hi! How are you?"}],
                 [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "What is 2+2?"}]):
        want = hf_tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
        want = want if isinstance(want, list) else want["input_ids"]
        assert chat.render(conv, tok, for_generation=True)[0].tolist() == list(want)


@pytest.mark.slow
def test_smollm2_round_trips_through_to_gguf(smol, tmp_path):
    summary, loaded = smol
    out = tmp_path / "back.gguf"
    written = convert.to_gguf(summary["export"], out, ToGgufConfig(dtype="f32"))
    assert written["vocab_size"] == 49152 and written["architecture"] == "llama"
    back = GGUFFile(out)
    orig = GGUFFile(models.known_file("smollm2-135m-instruct"))
    assert set(back.tensors) == set(orig.tensors)
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.29.attn_k.weight",
                 "blk.7.ffn_down.weight", "output_norm.weight"):
        shape = tuple(int(n) for n in reversed(orig.tensors[name].shape))
        np.testing.assert_array_equal(back(name, shape), orig(name, shape))
    assert back.meta["tokenizer.chat_template"] == orig.meta["tokenizer.chat_template"]
    assert back.meta["tokenizer.ggml.tokens"] == orig.meta["tokenizer.ggml.tokens"]
    again = convert.from_gguf(str(out), tmp_path / "again", FromGgufConfig(seq_len=512))
    reloaded = runs.load(again["export"])
    for path, x in flatten(jax.device_get(loaded.params)).items():
        np.testing.assert_array_equal(flatten(jax.device_get(reloaded.params))[path], x)
    assert reloaded.tokenizer.fingerprint == loaded.tokenizer.fingerprint


# ---- small models, every architecture and type ----

TINY = dict(vocab_size=0, n_layer=2, n_head=4, d_model=64, seq_len=64)
ARCHS = {
    "llama": ModelConfig(preset="llama", n_kv_head=2, tie_embeddings=False, **TINY),
    "llama3-rope": ModelConfig(preset="llama", rope_scaling="llama3", rope_factor=8.0,
                               rope_original_context=32, rope_theta=500000.0, **TINY),
    "linear-rope": ModelConfig(preset="llama", rope_scaling="linear", rope_factor=2.0, **TINY),
    "qwen2": ModelConfig(preset="llama", qkv_bias=True, n_kv_head=2, **TINY),
    "qwen3": ModelConfig(preset="llama", qk_norm=True, n_kv_head=2, tie_embeddings=False, **TINY),
    "gpt2": ModelConfig(preset="gpt2", **TINY),
}


@functools.cache
def _bpe() -> Tokenizer:
    text = " ".join(m["content"] for conv in dialogs.load("chitchat", limit=200).conversations
                    for m in conv)
    return Tokenizer.train_bpe([text], 512)


def _tiny_export(tmp_path, name: str):
    tok = _bpe()
    m = dataclasses.replace(ARCHS[name], vocab_size=tok.n_vocab).resolved()
    cfg = Config(model=m)
    params = GPT(m).init(jax.random.key(3))
    # biases and norm scales away from their init, so that a swapped one shows
    params = jax.tree.map(lambda x: x + 0.01 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)
                          % 0.37, params)
    return export.export(tmp_path / f"{name}-export", cfg, params, tok), params, m, tok


@pytest.mark.parametrize("name", list(ARCHS))
def test_tiny_models_round_trip_exactly_in_f32(tmp_path, name):
    where, params, m, tok = _tiny_export(tmp_path, name)
    out = tmp_path / "tiny.gguf"
    convert.to_gguf(str(where), out)
    back = runs.load(convert.from_gguf(str(out), tmp_path / "back")["export"])
    assert back.cfg.model == m
    for path, x in flatten(jax.device_get(params)).items():
        np.testing.assert_array_equal(flatten(jax.device_get(back.params))[path], x, err_msg=path)
    ids = jnp.asarray([tok.encode("Round and round the garden")])
    np.testing.assert_array_equal(GPT(m).apply(back.params, ids), GPT(m).apply(params, ids))
    assert back.tokenizer.encode("héllo 123 wörld") == tok.encode("héllo 123 wörld")


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_to_gguf_types_are_the_gguf_packages(tmp_path, dtype):
    where, params, m, _ = _tiny_export(tmp_path, "qwen2")
    out = tmp_path / f"{dtype}.gguf"
    convert.to_gguf(str(where), out, ToGgufConfig(dtype=dtype))
    f32 = tmp_path / "f32.gguf"
    convert.to_gguf(str(where), f32)
    typed, full = gguf.GGUFReader(out), {t.name: t for t in gguf.GGUFReader(f32).tensors}
    qtype = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    for t in typed.tensors:
        x = np.asarray(full[t.name].data)
        assert t.tensor_type.name == (qtype if x.ndim == 2 else "F32"), t.name
        want = gguf.quants.dequantize(
            gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype]),
            gguf.GGMLQuantizationType[qtype]) if x.ndim == 2 else x
        np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type), want)


def _random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Raw blocks of a quantization type with bytes below 0x40, so every fp16 scale in them is
    finite and small."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return rng.integers(0, 0x40, (rows, cols // block * size), dtype=np.uint8)


def _dequantizable():
    out = []
    for qtype in gguf.GGMLQuantizationType:
        block, size = gguf.GGML_QUANT_SIZES.get(qtype, (0, 0))
        if qtype.name in ("F32", "F64", "I8", "I16", "I32", "I64") or not block or 256 % block:
            continue
        try:
            gguf.quants.dequantize(np.zeros((1, size * 256 // block), np.uint8), qtype)
        except NotImplementedError:
            continue
        out.append(qtype.name)
    return out


def _rewrite(reader, out, arch="llama", extra=None, tensor=lambda t: (np.asarray(t.data), None)):
    """A copy of a GGUF with another architecture, more metadata, and each tensor as
    tensor(t) gives it ((data, raw type); None as data: left out)."""
    writer = gguf.GGUFWriter(out, arch)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            convert.writer_lib.add_value(writer, key, field.contents())
    for key, value in (extra or {}).items():
        convert.writer_lib.add_value(writer, key, value)
    for t in reader.tensors:
        data, raw = tensor(t)
        if data is not None:
            writer.add_tensor(t.name, data, raw_dtype=raw)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    return str(out)


@pytest.mark.parametrize("qtype", _dequantizable())
def test_every_dequantizable_type_reads_as_the_gguf_packages(tmp_path, qtype):
    """A tiny llama GGUF whose matrices are random raw blocks of one type: every param of the
    export is the gguf package's dequantization of its tensor, unpermuted for RoPE."""
    where, _, m, tok = _tiny_export(tmp_path, "llama")
    m = dataclasses.replace(m, d_model=256, n_head=4, n_kv_head=2, d_ff=256)
    f32 = tmp_path / "f32.gguf"
    convert.to_gguf(str(export.export(tmp_path / "wide", Config(model=m),
                                      GPT(m).init(jax.random.key(0)), tok)), f32)
    reader, rng, Q = gguf.GGUFReader(f32), np.random.default_rng(0), gguf.GGMLQuantizationType
    raw = {}

    def random_matrices(t):
        x = np.asarray(t.data)
        if x.ndim == 2 and t.name != "token_embd.weight":
            raw[t.name] = _random_blocks(Q[qtype], *x.shape, rng)
            return raw[t.name], Q[qtype]
        return x, None

    out = _rewrite(reader, tmp_path / f"{qtype}.gguf", tensor=random_matrices)
    back = flatten(jax.device_get(runs.load(convert.from_gguf(out, tmp_path / "x")
                                            ["export"]).params))
    deq = {name: gguf.quants.dequantize(r, Q[qtype]) for name, r in raw.items()}
    E = m.head_dim
    q = deq["blk.1.attn_q.weight"]  # [H*E out, D in], rows of each head as (pair, 2)
    halves = np.concatenate([q.reshape(4, E // 2, 2, -1)[:, :, j] for j in (0, 1)], axis=1)
    np.testing.assert_array_equal(back["block_1/attn/wq/w"], halves.reshape(4 * E, -1).T
                                  .reshape(m.d_model, 4, E))
    np.testing.assert_array_equal(back["block_0/mlp/w_down/w"], deq["blk.0.ffn_down.weight"].T)
    np.testing.assert_array_equal(back["block_0/mlp/w_up/w"][:, 0], deq["blk.0.ffn_gate.weight"].T)
    np.testing.assert_array_equal(back["lm_head"], deq["output.weight"].T)


@pytest.mark.parametrize("arch,qtype", [("llama", "Q8_0"), ("gpt2", "Q4_0"), ("llama", "Q4_1")])
def test_kept_blocks_are_the_gguf_packages_values(tmp_path, arch, qtype):
    """from_gguf.keep_quantized: Q8_0 / Q4_0 / Q4_1 matrices (the embedding and head too) kept in
    their blocks, whose values are the plain conversion's (the gguf package's dequantization),
    and a model that runs on them as on those values."""
    where, _, m, tok = _tiny_export(tmp_path, arch)
    m = dataclasses.replace(m, d_model=256, n_head=4, n_kv_head=2 if arch == "llama" else 4,
                            d_ff=256)
    f32 = tmp_path / "f32.gguf"
    convert.to_gguf(str(export.export(tmp_path / "wide", Config(model=m),
                                      GPT(m).init(jax.random.key(0)), tok)), f32)
    rng, Q, raw = np.random.default_rng(0), gguf.GGMLQuantizationType, {}

    def random_matrices(t):
        x = np.asarray(t.data)
        if x.ndim != 2:
            return x, None
        raw[t.name] = _random_blocks(Q[qtype], *x.shape, rng)
        return raw[t.name], Q[qtype]

    out = _rewrite(gguf.GGUFReader(f32), tmp_path / f"{qtype}.gguf", arch, tensor=random_matrices)
    kept_dir = convert.from_gguf(out, tmp_path / "kept", FromGgufConfig(keep_quantized=True))
    kept = runs.load(kept_dir["export"])
    assert kept.cfg.model.weights == ("int8" if qtype == "Q8_0" else "int4")
    names = flatten(kept.params)
    key = "w_q" if qtype == "Q8_0" else "w_q4"
    assert f"block_0/mlp/w_down/{key}" in names and "wte" not in names
    assert "lm_head" not in names and ("lm_head_scale" in names) == (arch == "llama")
    floats = runs.load(kept_dir["export"], ["model.weights=float"]).params
    deq = {name: gguf.quants.dequantize(r, Q[qtype]) for name, r in raw.items()}
    np.testing.assert_array_equal(floats["wte"], deq["token_embd.weight"])
    np.testing.assert_array_equal(floats["block_0"]["mlp"]["w_down"]["w"],
                                  deq["blk.0.ffn_down.weight"].T)
    if arch == "llama":
        np.testing.assert_array_equal(floats["lm_head"], deq["output.weight"].T)
    ids = jnp.asarray([tok.encode("Round and round the garden")])
    want = np.asarray(GPT(m).apply(floats, ids))  # random blocks: logits up to ~100
    np.testing.assert_allclose(GPT(kept.cfg.model).apply(kept.params, ids), want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("layout", ["int8", "int4_min"])
def test_kept_embedding_pads_to_the_tokenizers_ids_with_the_mean_row(layout):
    rng = np.random.default_rng(0)
    rows = {"scale": rng.uniform(0.01, 0.02, (4, 2)).astype(np.float32)}
    if layout == "int8":
        rows["q"] = rng.integers(-127, 128, (4, 64)).astype(np.int8)
    else:
        rows["q4"] = rng.integers(-128, 128, (4, 32)).astype(np.int8)
        rows["min"] = rng.uniform(-0.1, 0.0, (4, 2)).astype(np.float32)
    flat = {f"wte_{k}": v for k, v in rows.items()}
    padded = pad_kept_vocab(flat, 6)
    x = np.asarray(quant.dequantized(quant.stored(padded, "wte"), rows=True))
    before = np.asarray(quant.dequantized(rows, rows=True))
    np.testing.assert_array_equal(x[:4], before)
    step = np.abs(before.mean(0)).max() / (127 if layout == "int8" else 7)
    np.testing.assert_allclose(x[4:], np.repeat(before.mean(0, keepdims=True), 2, 0),
                               atol=step / 2 + 1e-6)


# ---- bad input ----

def test_bad_files_are_refused_by_name(tmp_path):
    where, _, m, _ = _tiny_export(tmp_path, "llama")
    good = tmp_path / "good.gguf"
    convert.to_gguf(str(where), good)
    with pytest.raises(ConvertError, match="exists; give a new file name"):
        convert.to_gguf(str(where), good)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ConvertError, match="cut.gguf: not a readable GGUF file"):
        convert.from_gguf(str(cut), tmp_path / "o1")
    reader = gguf.GGUFReader(good)

    def rewrite(name, arch="llama", drop=(), extra=None):
        return _rewrite(reader, tmp_path / name, arch, extra, lambda t: (
            None if t.name in drop else np.asarray(t.data), None))

    cases = {rewrite("mamba.gguf", arch="mamba"): "general.architecture='mamba'",
             rewrite("nok.gguf", drop=("blk.1.attn_k.weight",)): "tensor blk.1.attn_k.weight "
             "is missing",
             rewrite("swa.gguf", extra={"llama.attention.sliding_window": 16}):
             "llama.attention.sliding_window=16: sliding-window attention",
             rewrite("yarn.gguf", extra={"llama.rope.scaling.type": "yarn"}):
             "llama.rope.scaling.type='yarn'"}
    for path, message in cases.items():
        with pytest.raises(ConvertError, match=message.replace("(", r"\(").replace("[", r"\[")):
            convert.from_gguf(path, tmp_path / "o2")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="busy: exists and is not empty; give a new directory"):
        convert.from_gguf(str(good), tmp_path / "busy")
    with pytest.raises(ConvertError, match="notes.txt: is a file; give a new directory"):
        convert.from_gguf(str(good), tmp_path / "busy" / "notes.txt")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(ConvertError, match="no such file; give a .gguf path, a known model"):
        convert.from_gguf(str(tmp_path / "nothing.gguf"), tmp_path / "o3")


def test_known_model_cache_is_checked(tmp_path, monkeypatch, smollm2_gguf):
    monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path))
    with pytest.raises(ConvertError, match="smollm2-135m-instruct: not in the cache"):
        models.known_file("smollm2-135m-instruct", fetch=False)
    copy = tmp_path / "models" / "smollm2-135m-instruct" / smollm2_gguf.name
    copy.parent.mkdir(parents=True)
    data = bytearray(smollm2_gguf.read_bytes())
    copy.write_bytes(bytes(data))
    assert models.known_file("smollm2-135m-instruct", fetch=False) == copy
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(ConvertError, match="not in the cache"):
        models.known_file("smollm2-135m-instruct", fetch=False)
    assert not copy.exists()  # the damaged copy is gone, so the next use fetches it again


def test_command_line(tmp_path, capsys):
    where, *_ = _tiny_export(tmp_path, "gpt2")
    convert_cli.main(["to-gguf", str(where), str(tmp_path / "m.gguf"), "to_gguf.dtype=f16"])
    assert json.loads(capsys.readouterr().out)["dtype"] == "f16"
    convert_cli.main(["from-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "back")])
    assert json.loads(capsys.readouterr().out)["architecture"] == "gpt2"


def test_written_chat_template_lays_conversations_out_as_jaxgpt(tmp_path, smollm2_export):
    """to-gguf's template for a model without one of its own renders jaxgpt's layout (for
    llama.cpp's chat), a template's default system message included."""
    jinja2 = pytest.importorskip("jinja2")
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"}]
    for tok in (_bpe(), runs.load_tokenizer(smollm2_export[1])):
        template = jinja2.Environment().from_string(convert.chat_template_of(tok))
        text = template.render(messages=conv, add_generation_prompt=True)
        assert text == tok.decode(chat.render(conv, tok, for_generation=True)[0].tolist())
        assert ("You are a helpful AI assistant" in text) == (tok.chat_format == "chatml")

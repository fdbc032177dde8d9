"""Tests for jaxgpt.convert: Hugging Face models in (from-hf) and out (to-hf), on random-init
transformers models saved to a temporary directory (nothing is downloaded)."""
import base64
import dataclasses
import hashlib
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import corpus, leaves_equal, synthetic

from jaxgpt import config as config_lib
from jaxgpt import convert as convert_cli
from jaxgpt.data import chat, dialogs
from jaxgpt.data import tokens as data
from jaxgpt.data.hf_tokenizer import byte_level_chars
from jaxgpt.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from jaxgpt.errors import CheckpointError
from jaxgpt.generate import sample
from jaxgpt.generate.engine import Engine
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.generate.service import Service
from jaxgpt.model.gpt import GPT
from jaxgpt.store import export, runs
from jaxgpt.store.hf import convert
from jaxgpt.store.hf import tokenizer as hf_tokenizer
from jaxgpt.train import loop

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

TEXTS = ["Hello world, this is a test.", "ROMEO:\nThe night is sweet, my lord!",
         "  spaces\tand\nnewlines  ", "numbers 12345 and ünïcödé ☃", ""]
XLA = ["model.kernels=xla"]  # plain XLA fp32 math (the default cpu kernels agree as closely)


def hf_tokenizer_json(vocab_size: int = 300, specials: tuple[str, ...] = ("<s>", "</s>")) -> str:
    """A small byte-level BPE trained here, with <s> / </s> specials (or others), as HF's
    tokenizer.json."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus(20_000)], trainer)
    return tok.to_str()


def save_hf(directory, model, tokenizer_json: str | None = None, **save):
    model.save_pretrained(directory, **save)
    if tokenizer_json is not None:
        (directory / "tokenizer.json").write_text(tokenizer_json)
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
             "eos_token": "</s>"}))
    return directory


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Random-init transformers models saved as safetensors: GPT-2 (a HF tokenizer, vocab_size
    above it), Llama with GQA and an untied head (a HF tokenizer exactly its vocab_size: jaxgpt
    pads), Llama tied without tokenizer files, and the GQA one sharded."""
    root, tok_json = tmp_path_factory.mktemp("hf"), hf_tokenizer_json()
    n_tok = tokenizers.Tokenizer.from_str(tok_json).get_vocab_size()
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=n_tok + 20, n_positions=64, n_embd=64, n_layer=2, n_head=4,
        initializer_range=0.2, bos_token_id=0, eos_token_id=1))
    llama = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, rope_theta=500.0, initializer_range=0.1,
                 bos_token_id=0, eos_token_id=1)
    gqa = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=n_tok, num_key_value_heads=2, **llama))
    tied = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=211, tie_word_embeddings=True, **llama))
    # Llama 3.1-3.2's RoPE (as Llama-3.2-1B: GQA, tied), its bands set so that the 8 frequencies of
    # a 16-wide head fall 2 kept, 1 blended, 5 divided; and the linear kind
    llama3 = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=n_tok, num_key_value_heads=2, tie_word_embeddings=True,
        **{**llama, "max_position_embeddings": 256, "initializer_range": 0.3},
        rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64}))
    linear = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=211, **llama,
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 3.0}))
    # Qwen2 (Qwen2.5's architecture): a Llama with biases on q, k and v alone, here drawn at random
    # (HF starts them at 0)
    qwen2 = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=n_tok, num_key_value_heads=2, tie_word_embeddings=True, **llama))
    with torch.no_grad():
        for name, x in qwen2.named_parameters():
            if name.endswith("_proj.bias"):
                x.normal_(0.0, 0.1)
    return {"gpt2": save_hf(root / "gpt2", gpt2, tok_json),
            "gqa": save_hf(root / "gqa", gqa, tok_json), "tied": save_hf(root / "tied", tied),
            "llama3": save_hf(root / "llama3", llama3, tok_json),
            "linear": save_hf(root / "linear", linear),
            "qwen2": save_hf(root / "qwen2", qwen2, tok_json),
            "sharded": save_hf(root / "sharded", gqa, tok_json, max_shard_size="60KB")}


@pytest.fixture(scope="module")
def exports(hf_dirs, tmp_path_factory):
    """Each model converted: name -> (export directory, the printed summary)."""
    root = tmp_path_factory.mktemp("exports")
    return {name: (root / name, convert.from_hf(str(d), root / name))
            for name, d in hf_dirs.items()}


def hf_model(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def hf_logits(directory, tokens_BxL) -> np.ndarray:
    with torch.no_grad():
        return hf_model(directory)(torch.tensor(tokens_BxL)).logits.numpy()


def jax_logits(export_dir, tokens_BxL) -> np.ndarray:
    loaded = runs.load(export_dir, XLA, need_tokenizer=False)
    # one compile
    return np.asarray(jax.jit(GPT(loaded.cfg.model).apply)(loaded.params, jnp.asarray(tokens_BxL)))


@pytest.mark.parametrize("name", ["gpt2", "gqa", "tied", "llama3", "linear", "qwen2"])
def test_logits_equal_transformers(hf_dirs, exports, name):
    out, summary = exports[name]
    n = summary["hf_vocab_size"]
    tokens_BxL = np.random.default_rng(0).integers(0, n, (2, 48))
    ref_BxLxV, ours_BxLxV = hf_logits(hf_dirs[name], tokens_BxL), jax_logits(out, tokens_BxL)
    assert ours_BxLxV.shape[-1] == summary["vocab_size"]
    assert np.abs(ours_BxLxV[..., :n] - ref_BxLxV).max() < 1e-4
    if summary["vocab_size"] > n:  # padded ids: the mean logit, never the argmax
        mean_BxL = ref_BxLxV.mean(-1)
        assert np.abs(ours_BxLxV[..., n:] - mean_BxL[..., None]).max() < 1e-4
        assert (ours_BxLxV.argmax(-1) < n).all()


def test_config_and_tokenizer_mapping(exports):
    (gqa, s_gqa), (gpt2, s_gpt2), (tied, s_tied) = exports["gqa"], exports["gpt2"], exports["tied"]
    m = runs.saved_config(gqa).model
    assert ((m.preset, m.norm, m.mlp, m.position, m.bias, m.tie_embeddings)
            == ("llama", "rmsnorm", "swiglu", "rope", False, False))
    assert (m.n_head, m.n_kv_head, m.d_ff, m.rope_theta, m.norm_eps) == (4, 2, 96, 500.0, 1e-6)
    assert (runs.saved_config(tied).model.tie_embeddings
            and runs.saved_config(gpt2).model.mlp == "gelu")
    # GQA's tokenizer is exactly its vocab: 6 chat specials are new ids past it, in padded rows
    assert s_gqa["vocab_size"] == s_gqa["hf_vocab_size"] + len(SPECIAL_TOKENS) - 2
    # GPT-2's vocab_size leaves room: the new ids take unused rows, nothing is padded
    assert s_gpt2["vocab_size"] == s_gpt2["hf_vocab_size"]
    assert (json.loads((gqa / "hf" / "config.json").read_text())["architectures"]
            == ["LlamaForCausalLM"])
    m3 = runs.saved_config(exports["llama3"][0]).model
    linear = runs.saved_config(exports["linear"][0]).model
    assert (m3.rope_scaling, m3.rope_theta, m3.rope_factor, m3.rope_low_freq_factor,
            m3.rope_high_freq_factor, m3.rope_original_context, m3.seq_len,
            m3.tie_embeddings) == ("llama3", 500.0, 4.0, 1.0, 4.0, 64, 256, True)
    assert (linear.rope_scaling, linear.rope_factor) == ("linear", 3.0) and m.rope_scaling == "none"
    qwen2 = runs.saved_config(exports["qwen2"][0]).model
    assert (qwen2.qkv_bias, qwen2.bias, m.qkv_bias) == (True, False, False)
    attn = runs.load(exports["qwen2"][0]).params["block_0"]["attn"]
    assert {name for name, leaves in attn.items() if "b" in leaves} == {"wq", "wkv"}  # none on wo
    assert s_tied["tokenizer"] is None and (tied / runs.NO_TOKENIZER).is_file()


def test_hf_tokenizer_matches_tokenizers(hf_dirs, exports, tmp_path):
    hf = tokenizers.Tokenizer.from_file(str(hf_dirs["gqa"] / "tokenizer.json"))
    tok = runs.load_tokenizer(exports["gqa"][0])
    n = hf.get_vocab_size()
    assert (tok.eot_id, tok.bos_id) == (hf.token_to_id("</s>"), hf.token_to_id("<s>"))
    assert (sorted(tok.special_id(t) for t in SPECIAL_TOKENS[2:]) == list(range(n, n + 6))
            and tok.n_vocab == n + 6)
    for text in TEXTS:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert (tok.encode(text) == ids and tok.encode_np(text).tolist() == ids
                and tok.decode(ids) == text)
        assert (tok.decode_bytes(ids) == text.encode()
                and tok.token_byte_lengths()[ids].sum() == len(text.encode()))
    assert tok.encode_batch(TEXTS) == [hf.encode(t, add_special_tokens=False).ids for t in TEXTS]
    plain = tokenizers.Tokenizer.from_str(hf.to_str())
    plain.encode_special_tokens = True
    # special text is text
    assert tok.encode("a </s> b") == plain.encode("a </s> b").ids != hf.encode("a </s> b").ids
    assert (tok.is_special(tok.eot_id)
            and tok.decode_bytes([tok.bos_id, tok.special_id("<|user_start|>")]) == b"")
    assert tok.decode([tok.special_id("<|user_start|>"), *tok.encode("hi")]) == "<|user_start|>hi"
    reloaded = Tokenizer.load(tok.save(tmp_path))
    assert reloaded.fingerprint == tok.fingerprint and (tmp_path / "hf_tokenizer.json").is_file()


def test_sentencepiece_style_tokenizer():
    """Llama-2-style pieces (\u2581 for a space, <0xNN> byte fallback) give the bytes of the text,
    plus the one space SentencePiece puts before it."""
    from tokenizers import decoders, models, normalizers, trainers
    hf = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                          normalizers.Replace(" ", "\u2581")])
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    hf.train_from_iterator([corpus(20_000)], trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]))
    # as in Llama 2's file, the byte pieces are vocabulary, not added tokens
    spec = json.loads(hf.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    hf = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tok = Tokenizer.from_hf(json.dumps(spec), "sp", eos_id=2, bos_id=1)
    for text in TEXTS[:4]:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids and tok.decode(ids) == text
        assert (tok.decode_bytes(ids) == b" " + text.encode()
                and tok.token_byte_lengths()[ids].sum() == len(text.encode()) + 1)


def test_gpt2_vocabulary_becomes_tiktoken_gpt2(monkeypatch):
    """A byte-level vocabulary whose ranks hash to GPT-2's official file is read as tiktoken's gpt2
    (here the hash is this test tokenizer's, as GPT-2's real vocabulary is not available
    offline)."""
    hf_json = hf_tokenizer_json()
    spec = json.loads(hf_json)
    assert hf_tokenizer.as_gpt2(spec) is None
    chars = byte_level_chars()
    ranks = sorted((i, bytes(chars[c] for c in p)) for p, i in spec["model"]["vocab"].items()
                   if p not in ("<s>", "</s>"))
    digest = hashlib.sha256(b"".join(base64.b64encode(t) + b" %d\n" % i
                                     for i, t in ranks)).hexdigest()
    monkeypatch.setattr(hf_tokenizer, "_gpt2_sha256", lambda: digest)
    tok = hf_tokenizer.as_gpt2(spec)
    hf = tokenizers.Tokenizer.from_str(hf_json)
    assert tok.name == "gpt2" and tok.eot_id == 50256 and tok.bos_id == 50257
    assert all(tok.encode(t) == hf.encode(t).ids for t in TEXTS)


@pytest.mark.parametrize("name", ["gpt2", "gqa", "tied", "llama3", "qwen2"])
def test_to_hf_gives_back_the_same_tensors(hf_dirs, exports, name, tmp_path):
    summary = convert.to_hf(str(exports[name][0]), tmp_path / "back")
    original = safetensors_numpy.load_file(hf_dirs[name] / "model.safetensors")
    back = safetensors_numpy.load_file(tmp_path / "back" / "model.safetensors")
    assert original.keys() == back.keys() and all(np.array_equal(original[k], back[k])
                                                  for k in original)
    assert summary["vocab_size"] == exports[name][1]["hf_vocab_size"]  # the padding rows dropped
    tokens_BxL = np.random.default_rng(1).integers(0, summary["vocab_size"], (1, 16))
    assert np.array_equal(hf_logits(tmp_path / "back", tokens_BxL),
                          hf_logits(hf_dirs[name], tokens_BxL))
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    # carried over from the original
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    if name != "gpt2":
        original_config = json.loads((hf_dirs[name] / "config.json").read_text())
        assert config["rope_parameters"] == original_config["rope_parameters"]
    if name != "tied":
        fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
        assert (fast(TEXTS[1], add_special_tokens=False)["input_ids"]
                == runs.load_tokenizer(exports[name][0]).encode(TEXTS[1]))


@pytest.mark.parametrize("name", ["gpt2", "gqa", "llama3", "qwen2"])
def test_greedy_generation_equals_transformers(hf_dirs, exports, name):
    loaded = runs.load(exports[name][0], XLA)
    prompt = loaded.tokenizer.encode("ROMEO: the night")
    # no tokenizer: the engine would never pick ids past it, which GPT-2's unused rows here are
    ours = Engine(GPT(loaded.cfg.model), loaded.params, None, slots=1).generate(
        [prompt], SamplingParams(max_tokens=32, temperature=0.0))[0]
    with torch.no_grad():
        ref = hf_model(hf_dirs[name]).generate(torch.tensor([prompt]), max_new_tokens=32,
                                               do_sample=False, eos_token_id=None,
                                               pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref and len(set(ref)) > 3


def test_a_bfloat16_checkpoint_comes_back_in_bfloat16(hf_dirs, tmp_path):
    model = hf_model(hf_dirs["tied"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    convert.from_hf(str(tmp_path / "bf16"), tmp_path / "export")
    assert convert.to_hf(str(tmp_path / "export"), tmp_path / "back")["dtype"] == "bfloat16"
    original = safetensors_numpy.load_file(tmp_path / "bf16" / "model.safetensors")
    back = safetensors_numpy.load_file(tmp_path / "back" / "model.safetensors")
    assert all(back[k].dtype == original[k].dtype and np.array_equal(original[k], back[k])
               for k in original)


def test_sharded_checkpoint_converts(hf_dirs, exports, tmp_path):
    assert (hf_dirs["sharded"] / "model.safetensors.index.json").is_file()
    sharded, whole = (runs.load(exports[k][0]) for k in ("sharded", "gqa"))
    assert leaves_equal(sharded.params, whole.params)
    summary = convert.to_hf(str(exports["sharded"][0]), tmp_path / "back",
                            config_lib.ToHfConfig(max_shard_mb=0.05))
    assert (len(summary["files"]) > 1
            and (tmp_path / "back" / "model.safetensors.index.json").is_file())
    tokens_BxL = np.arange(12)[None]
    assert np.array_equal(hf_logits(tmp_path / "back", tokens_BxL),
                          hf_logits(hf_dirs["gqa"], tokens_BxL))


def test_without_tokenizer_params_load_but_sampling_says_why(hf_dirs, exports, capsys, tmp_path):
    out = exports["tied"][0]
    loaded = runs.load(out, need_tokenizer=False)
    assert loaded.tokenizer is None and loaded.cfg.model.vocab_size == 211
    with pytest.raises(CheckpointError,
                       match="converted from Hugging Face without tokenizer files"):
        runs.load(out)
    with pytest.raises(SystemExit) as exit_info:
        sample.main([str(out), "sample.max_new_tokens=2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "from_hf.tokenizer=" in err
    # the remedy it names: a tokenizer from elsewhere (here GQA's tokenizer.json)
    convert_cli.main(["from-hf", str(hf_dirs["tied"]), str(tmp_path / "with"),
                  f"from_hf.tokenizer={hf_dirs['gqa'] / 'tokenizer.json'}"])
    summary = json.loads(capsys.readouterr().out)
    assert (summary["tokenizer"]
            and runs.load(tmp_path / "with").tokenizer.n_vocab == summary["vocab_size"] == 306)


def test_an_imported_model_fine_tunes_and_goes_back(exports, make_config, tmp_path):
    """train.init_from=EXPORT trains the converted model with its HF tokenizer; to-hf of the result
    keeps the rows of the chat specials (now trained) and adds their tokens to tokenizer.json."""
    out = exports["gqa"][0]
    cfg = make_config(tmp_path / "ft", data={"batch_size": 4}, train={
        "steps": 3, "log_every": 1, "eval_every": 0, "eval_max_tokens": 256, "init_from": str(out)})
    cfg = config_lib.validate(dataclasses.replace(cfg, model=runs.saved_config(out).model))
    logged = loop.train(cfg, devices=jax.devices()[:1])
    assert logged["step"] == 3 and np.isfinite(logged["loss"])
    tuned = runs.load(tmp_path / "ft" / "export")
    assert tuned.tokenizer.fingerprint == runs.load_tokenizer(out).fingerprint
    assert not leaves_equal(tuned.params, runs.load(out).params)
    summary = convert.to_hf(str(tmp_path / "ft" / "export"), tmp_path / "hf")
    V = tuned.cfg.model.vocab_size
    assert summary["vocab_size"] == V > exports["gqa"][1]["hf_vocab_size"]
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (fast.convert_tokens_to_ids("<|assistant_end|>")
            == tuned.tokenizer.special_id("<|assistant_end|>"))
    tokens_BxL = np.arange(V - 20, V)[None]  # the new ids too
    ours_BxLxV = jax_logits(tmp_path / "ft" / "export", tokens_BxL)
    assert np.abs(hf_logits(tmp_path / "hf", tokens_BxL) - ours_BxLxV).max() < 1e-4


@pytest.mark.parametrize("variant", [{}, {"rope_scaling": "llama3", "rope_factor": 8.0,
                                          "rope_original_context": 16}, {"qkv_bias": True}])
def test_a_native_model_goes_to_transformers(make_config, text_file, tmp_path, variant):
    """A jaxgpt llama-preset model with a trained BPE: to-hf writes a model and a tokenizer.json
    that transformers loads, with the same logits and the same ids (RoPE scaled or not; with biases
    on q, k and v, as a Qwen2)."""
    cfg = make_config(preset="llama", model={"vocab_size": 320, "rope_theta": 1000.0, **variant})
    tok = Tokenizer.train_bpe([text_file.read_text()], 300)
    params = GPT(cfg.model).init(jax.random.key(0))
    # biases start at 0: draw them, so that their place in the HF model counts
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (jax.random.normal(jax.random.key(1), x.shape) * 0.1
                         if path[-1].key == "b" else x), params)
    export.export(tmp_path / "native", cfg, jax.device_get(params), tok)
    convert.to_hf(str(tmp_path / "native"), tmp_path / "hf")
    architecture = "Qwen2ForCausalLM" if variant.get("qkv_bias") else "LlamaForCausalLM"
    assert (json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"]
            == [architecture])
    tokens_BxL = np.random.default_rng(0).integers(0, 320, (1, 24))
    ours_BxLxV = jax_logits(tmp_path / "native", tokens_BxL)
    assert np.abs(hf_logits(tmp_path / "hf", tokens_BxL) - ours_BxLxV).max() < 1e-4
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert all(fast(t, add_special_tokens=False)["input_ids"] == tok.encode(t) for t in TEXTS)
    assert fast.eos_token == "<|endoftext|>" and fast.convert_tokens_to_ids("<|bos|>") == tok.bos_id


# Chat templates written here in the two layouts jaxgpt reads (their tokens as SmolLM2 / Qwen2.5
# and Llama 3 write them; the real ones add default system messages, dates and tool calls on top)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
          "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
          "{% endif %}")
CHATS = [[{"role": "user", "content": "Hello there, how are you?"}],
         [{"role": "system", "content": "You answer briefly."},
          {"role": "user", "content": "ROMEO: the night"},
          {"role": "assistant", "content": "Is sweet, my lord!\nGood night."},
          {"role": "user", "content": "And then?"}]]


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    """Random-init Llamas whose tokenizers carry a ChatML and a Llama 3 chat template
    (tokenizer_config.json)."""
    root, out = tmp_path_factory.mktemp("chat_hf"), {}
    for name, template, specials, bos, eos in [
            ("chatml", CHATML, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>"),
            ("llama3", LLAMA3, ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                "<|end_header_id|>", "<|eot_id|>"),
             "<|begin_of_text|>", "<|eot_id|>")]:
        tok_json = hf_tokenizer_json(specials=specials)
        ids = tokenizers.Tokenizer.from_str(tok_json).token_to_id
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            initializer_range=0.1,
            bos_token_id=ids(bos) if bos else None, eos_token_id=ids(eos)))
        directory = root / name
        model.save_pretrained(directory)
        (directory / "tokenizer.json").write_text(tok_json)
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
             "eos_token": eos, **({"bos_token": bos} if bos else {})}))
        out[name] = (directory, convert.from_hf(str(directory), root / f"{name}_export"))
    return out


def template_ids(directory, conversation, generation: bool) -> list[int]:
    fast = transformers.AutoTokenizer.from_pretrained(directory)
    ids = fast.apply_chat_template(conversation, add_generation_prompt=generation, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_an_imported_chat_model_talks_in_its_own_template(chat_models, name):
    """A model whose template is ChatML or Llama 3's converts with that chat format: conversations
    render to the ids transformers' apply_chat_template gives, the loss mask covers each reply and
    the end token that closes it, and replies stop at that token."""
    directory, summary = chat_models[name]
    assert summary["chat_format"] == name
    export_dir = Path(summary["export"])
    tok = runs.load_tokenizer(export_dir)
    assert (tok.chat_format == name
            and Tokenizer.load(tok.save(export_dir / "again")).chat_format == name)
    for conversation in CHATS:
        assert chat.render(conversation, tok, for_generation=True)[0].tolist() == template_ids(
            directory, conversation, True)
    full = CHATS[1][:3]
    ids, mask = chat.render(full, tok)
    assert ids.tolist() == template_ids(directory, full, False)
    end = "<|im_end|>" if name == "chatml" else "<|eot_id|>"
    trained = (tok.encode(full[2]["content"]) + [tok.special_id(end)]
               + (tok.encode("\n") if name == "chatml" else []))
    assert ids[mask].tolist() == trained and ids[len(ids) - len(trained):].tolist() == trained
    lay = chat.layout(tok)
    start = "<|im_start|>" if name == "chatml" else "<|start_header_id|>"
    assert lay.stop_ids[:2] == (tok.special_id(end), tok.special_id(start))
    # the engine stops there: a reply ends at the model's end token, which it never shows
    loaded = runs.load(export_dir, XLA)
    with Service(Engine(GPT(loaded.cfg.model), loaded.params, tok, slots=1), tok) as service:
        reply = service.chat(CHATS[0], SamplingParams(max_tokens=8, temperature=0.0)).result()[0]
    prompt = chat.render(CHATS[0], tok, for_generation=True)[0].tolist()
    ours = Engine(GPT(loaded.cfg.model), loaded.params, None, slots=1).generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0.0, stop_ids=lay.stop_ids))[0]
    # (the prompt holds id 0, bos: the attention mask given, not inferred from a pad id)
    with torch.no_grad():
        ref = hf_model(directory).generate(torch.tensor([prompt]),
                                           attention_mask=torch.ones(1, len(prompt)),
                                           max_new_tokens=8, do_sample=False,
                                           eos_token_id=list(lay.stop_ids),
                                           pad_token_id=0)[0, len(prompt):].tolist()
    ref = list(itertools.takewhile(lambda t: t not in lay.stop_ids, ref))  # HF keeps the stop token
    assert ours == ref and reply.text == tok.decode(ours)


def test_an_imported_chat_model_fine_tunes_in_its_own_template(chat_models, make_config, tmp_path):
    """SFT from a ChatML model (train.init_from) trains on ChatML rows, with the loss on each reply
    and its <|im_end|>, and its export keeps the format for talk and serve."""
    export_dir = Path(chat_models["chatml"][1]["export"])
    path = dialogs.write_jsonl(tmp_path / "c.jsonl", synthetic(40))
    cfg = make_config(tmp_path / "ft",
                      data={"chat": f"jsonl:{path}", "batch_size": 4, "tokenizer": str(export_dir)},
                      train={"steps": 3, "log_every": 1, "eval_every": 0,
                             "init_from": str(export_dir)})
    cfg = config_lib.validate(dataclasses.replace(cfg, model=runs.saved_config(export_dir).model))
    tok = runs.load_tokenizer(export_dir)
    batch = data.open_batches(cfg).batch_at(0)
    inputs, targets, mask = (np.asarray(batch[k]) for k in ("inputs", "targets", "loss_mask"))
    mask = mask.astype(bool)
    assert ((inputs == tok.special_id("<|im_start|>")).sum() > 0
            and not (inputs == tok.special_id("<|user_start|>")).any())
    assert mask.any() and (targets[mask] == tok.special_id("<|im_end|>")).any()
    # a turn's start is never trained
    assert not (targets[mask] == tok.special_id("<|im_start|>")).any()
    logged = loop.train(cfg, devices=jax.devices()[:1])
    assert logged["step"] == 3 and np.isfinite(logged["loss"])
    assert runs.load_tokenizer(tmp_path / "ft" / "export").chat_format == "chatml"


def edit_config(directory, tmp_path, **changes):
    """A copy of a HF model directory (links to its files) with config.json changed."""
    copy = tmp_path / directory.name
    copy.mkdir(parents=True)
    for f in directory.iterdir():
        (copy / f.name).symlink_to(f)
    config = {**json.loads((directory / "config.json").read_text()), **changes}
    (copy / "config.json").unlink()
    (copy / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                  if v != "DELETE"}))
    return copy


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_a_transformers_4_rope_scaling_converts_the_same(hf_dirs, exports, tmp_path):
    """Files written by transformers 4 (Llama-3.2's on the hub) hold rope_theta beside rope_scaling,
    its kind as "type" in older ones, and no rope_parameters: the same model as transformers 5's
    file."""
    scaling = {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    old = edit_config(hf_dirs["llama3"], tmp_path, rope_parameters="DELETE", rope_theta=500.0,
                      rope_scaling=scaling)
    convert.from_hf(str(old), tmp_path / "export")
    assert (runs.saved_config(tmp_path / "export").model
            == runs.saved_config(exports["llama3"][0]).model)
    assert leaves_equal(runs.load(tmp_path / "export").params,
                        runs.load(exports["llama3"][0]).params)


def test_bad_inputs_fail_in_one_line(hf_dirs, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json: not found" in one_line_error(capsys, ["from-hf", str(empty), out])
    llama = hf_dirs["tied"]
    bad = edit_config(llama, tmp_path / "a", architectures=["MistralForCausalLM"],
                      model_type="mistral")
    assert "architectures=" in one_line_error(capsys, ["from-hf", str(bad), out])
    bad = edit_config(llama, tmp_path / "b", rope_parameters={"rope_type": "yarn", "factor": 2.0})
    assert 'rope_parameters.rope_type="yarn" is not supported' in one_line_error(
        capsys, ["from-hf", str(bad), out])
    bad = edit_config(llama, tmp_path / "b2",
                      rope_parameters={"rope_type": "llama3", "factor": 2.0})
    assert ("rope_parameters.low_freq_factor=null: rope_type llama3 needs a number"
            in one_line_error(capsys, ["from-hf", str(bad), out]))
    bad = edit_config(llama, tmp_path / "b3", partial_rotary_factor=0.5)
    assert "partial_rotary_factor=0.5" in one_line_error(capsys, ["from-hf", str(bad), out])
    bad = edit_config(hf_dirs["qwen2"], tmp_path / "b4", use_sliding_window=True)
    assert "use_sliding_window=true" in one_line_error(capsys, ["from-hf", str(bad), out])
    bad = edit_config(llama, tmp_path / "c", attention_bias=True)
    assert "attention_bias=true" in one_line_error(capsys, ["from-hf", str(bad), out])
    bad = edit_config(llama, tmp_path / "d", head_dim=8)
    assert "head_dim=8" in one_line_error(capsys, ["from-hf", str(bad), out])
    # the checkpoint holds only 2 layers
    bad = edit_config(llama, tmp_path / "e", num_hidden_layers=3)
    assert "model.safetensors: tensor model.layers.2." in one_line_error(
        capsys, ["from-hf", str(bad), out])
    cut = edit_config(llama, tmp_path / "g")  # the weights cut short: their header is incomplete
    (cut / "model.safetensors").unlink()  # a link to the original: write a file of its own
    (cut / "model.safetensors").write_bytes((llama / "model.safetensors").read_bytes()[:1000])
    assert one_line_error(capsys, ["from-hf", str(cut), out]).startswith(
        f"error: {cut / 'model.safetensors'}: not a readable safetensors file (SafetensorError: ")
    assert "gelu_fast" in one_line_error(capsys, ["from-hf", str(edit_config(
        hf_dirs["gpt2"], tmp_path / "f", activation_function="gelu_fast")), out])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "hub download failed" in one_line_error(
        capsys, ["from-hf", "no-such-org/no-such-model", out])
    assert "model.bad" in one_line_error(capsys, ["to-hf", str(empty), out, "model.bad=1"])


def test_help_lists_the_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main(["from-hf", "--help"])
    assert exit_info.value.code == 0 and "from_hf.tokenizer=" in capsys.readouterr().out

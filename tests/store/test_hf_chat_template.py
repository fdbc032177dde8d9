"""Tests for reading a Hugging Face chat template: its format and the default system message it
writes when a conversation has none (SmolLM2's), against transformers' apply_chat_template."""
import json

import pytest
from conftest import corpus

from jaxgpt.data import chat
from jaxgpt.store.hf.tokenizer import default_system_of, template_chat_format, tokenizer_for

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

# SmolLM2-135M-Instruct's template, as its tokenizer_config.json holds it
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
           "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
           "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# a Llama 3 layout with a default system message, written with whitespace control
LLAMA3 = ("{{- bos_token }}\n{%- if messages[0]['role'] == 'system' %}\n"
          "    {%- set system = messages[0]['content'] %}\n"
          "    {%- set messages = messages[1:] %}\n{%- else %}\n"
          "    {%- set system = 'You are a helpful assistant.' %}\n{%- endif %}\n"
          "<|start_header_id|>system<|end_header_id|>\n\n{{ system }}<|eot_id|>\n"
          "{%- for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}")
CHATML_SPECIALS = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
LLAMA3_SPECIALS = {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}
CHATS = [[{"role": "user", "content": "Hello there, how are you?"}],
         [{"role": "system", "content": "You answer briefly."},
          {"role": "user", "content": "ROMEO: the night"},
          {"role": "assistant", "content": "Is sweet, my lord!\nGood night."},
          {"role": "user", "content": "And then?"}],
         [{"role": "user", "content": "ROMEO: the night"},
          {"role": "assistant", "content": "Is sweet, my lord!\nGood night."},
          {"role": "user", "content": "And then?"}]]


def test_the_default_system_message_is_read_off_the_template():
    assert template_chat_format(SMOLLM2, CHATML_SPECIALS) == ("chatml", SMOLLM2_SYSTEM)
    assert template_chat_format(CHATML, CHATML_SPECIALS) == ("chatml", "")
    assert template_chat_format(LLAMA3, LLAMA3_SPECIALS) == (
        "llama3", "You are a helpful assistant.")
    # a template jaxgpt does not follow gives no default either, nor does no template
    assert template_chat_format(SMOLLM2, {"<|endoftext|>"}) == ("jaxgpt", "")
    assert template_chat_format(None, CHATML_SPECIALS) == ("jaxgpt", "")


@pytest.mark.parametrize("template", [
    "<|im_start|><|im_end|>{% for m in messages %",  # a syntax error
    "<|im_start|><|im_end|>{{ raise_exception('a system message first') }}",
    "<|im_start|><|im_end|>{{ messages[0]['content'].nope() }}",  # an error while rendering
    "<|im_start|><|im_end|>{{ messages.__class__.__mro__ }}",  # the sandbox refuses it
    "<|im_start|><|im_end|>{% for m in messages %}{{ m['content'] }}{% endfor %}",  # no roles
    "<|im_start|><|im_end|>{{ messages[0]['content'] }}{{ messages[0]['content'] }}",  # twice
])
def test_a_template_that_fails_or_has_another_shape_gives_no_default(template):
    assert default_system_of(template) == ""
    assert template_chat_format(template, CHATML_SPECIALS) == ("chatml", "")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """A small byte-level BPE with ChatML's specials and SmolLM2's template, read as convert reads
    a model's tokenizer, and transformers' own tokenizer of the same files."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([corpus(20_000)], trainers.BpeTrainer(
        vocab_size=300, special_tokens=sorted(CHATML_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory = tmp_path_factory.mktemp("smollm2")
    (directory / "tokenizer.json").write_text(hf.to_str())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": SMOLLM2,
         "eos_token": "<|im_end|>"}))
    return (tokenizer_for(directory, {}, "", "smollm2"),
            transformers.AutoTokenizer.from_pretrained(directory))


def template_ids(fast, conversation) -> list[int]:
    ids = fast.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_conversations_render_as_the_template_does(smollm2):
    """With or without a system message, a prompt's ids are apply_chat_template's; without one it
    starts with SmolLM2's default system message, which is never trained."""
    tok, fast = smollm2
    assert (tok.chat_format, tok.default_system) == ("chatml", SMOLLM2_SYSTEM)
    for conversation in CHATS:
        assert (chat.render(conversation, tok, for_generation=True)[0].tolist()
                == template_ids(fast, conversation))
    start, end = tok.special_id("<|im_start|>"), tok.special_id("<|im_end|>")
    system = ([start] + tok.encode("system\n") + tok.encode(SMOLLM2_SYSTEM) + [end]
              + tok.encode("\n"))
    ids, mask = chat.render(CHATS[2][:2], tok)
    assert ids[:len(system)].tolist() == system and not mask[:len(system)].any()
    assert ids[mask].tolist() == tok.encode(CHATS[2][1]["content"]) + [end] + tok.encode("\n")
    assert chat.render(CHATS[1], tok)[0][:2].tolist() == [start] + tok.encode("system\n")[:1]


def test_a_truncated_prompt_keeps_the_default_system_message(smollm2):
    tok, fast = smollm2
    last = CHATS[2][-1:]
    smallest = template_ids(fast, last)
    assert chat.render_prompt(CHATS[2], tok, len(smallest)).tolist() == smallest
    assert chat.render_prompt(CHATS[2], tok, len(smallest) - 1) is None
    assert (chat.render_prompt(CHATS[2], tok, len(template_ids(fast, CHATS[2]))).tolist()
            == template_ids(fast, CHATS[2]))

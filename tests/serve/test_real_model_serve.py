"""The server on a real pretrained model: SmolLM2-135M-Instruct (converted from its GGUF,
tests/conftest.py) answering the official OpenAI client, streamed, in its own chat template."""
from __future__ import annotations

import pytest
from conftest import serving

from jaxgpt.data import chat
from jaxgpt.generate.engine import Engine
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.generate.service import Service
from jaxgpt.model.gpt import GPT
from jaxgpt.serve.app import ServeConfig, make_app
from jaxgpt.store import runs

openai = pytest.importorskip("openai")


@pytest.mark.slow
def test_smollm2_answers_the_openai_client_streamed(smollm2_export):
    loaded = runs.load(smollm2_export[1])
    model, tok = GPT(loaded.cfg.model), loaded.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = chat.render(messages, tok, for_generation=True)[0].tolist()
    want = Engine(model, loaded.params, slots=1).generate([prompt], SamplingParams(
        max_tokens=24, temperature=0.0, stop_ids=chat.layout(tok).stop_ids))[0]
    with Service(Engine(model, loaded.params, tok, slots=2), tok) as service, \
            serving(make_app(service, tok, ServeConfig(slots=2), "smollm2")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
        stream = client.chat.completions.create(model="smollm2", messages=messages,
                                                temperature=0, max_tokens=24, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == tok.decode(want)
    assert "Paris" in text  # a model that speaks, not only one that runs

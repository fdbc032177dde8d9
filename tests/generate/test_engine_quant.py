"""The engine on int8 / int4 weights (model.weights, model/quant.py)."""
import dataclasses

import jax
import numpy as np
import pytest

from jaxgpt.config import ModelConfig
from jaxgpt.generate.engine import Engine
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.model import quant
from jaxgpt.model.gpt import GPT


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_greedy_decoding_on_quantized_weights_is_the_dequantized_models(weights):
    cfg = ModelConfig(preset="llama", vocab_size=50, n_layer=2, n_head=2, n_kv_head=1,
                      d_model=64, seq_len=32, tie_embeddings=True).resolved()
    float_model, quantized = GPT(cfg), GPT(dataclasses.replace(cfg, weights=weights))
    params = float_model.init(jax.random.key(3))
    # the float model on the very values the quantized one multiplies with
    back = quant.float_params(quant.decode_params(quantized, params),
                              jax.eval_shape(float_model.init, jax.random.key(0)))
    prompts = [np.random.default_rng(i).integers(0, 50, 5 + i).tolist() for i in range(2)]
    greedy = SamplingParams(temperature=0, max_tokens=12)
    got = Engine(quantized, params, slots=2).generate(prompts, greedy)
    assert got == Engine(float_model, back, slots=2).generate(prompts, greedy)
    assert all(len(ids) == 12 for ids in got)

"""SmolLM2-135M's architecture (Llama: 30 layers, 576 wide, 9 query and 3 key/value heads, SwiGLU
1536, tied embeddings, RoPE theta 1e5, context 8192) at random init: decoding speed on a machine
that cannot fetch the weights (experiments/gpu_check.sh). The trained model comes from its GGUF:
`python -m jaxgpt.convert from-gguf smollm2-135m-instruct runs/smollm2`.

    python -m jaxgpt.bench generate experiments/configs/smollm2.py --batch 1 8 --new 128
"""
from jaxgpt.config import Config, ModelConfig


def get_config() -> Config:
    return Config(model=ModelConfig(
        preset="llama", vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576,
        d_ff=1536, seq_len=8192, tie_embeddings=True, rope_theta=100000.0))

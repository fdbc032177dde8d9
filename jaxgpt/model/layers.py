"""The decoder's layers as Flax modules: Norm, Dense, Attention, Mlp and the pre-norm Block.

Each takes the config and the host's resolved Kernels (kernels/choice.py, chosen once when GPT is
built) and runs its hot spots on those kernels. Every parameter carries logical axis names, which
parallel/sharding.py maps onto the mesh; activations carry them too.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.config import ModelConfig
from jaxgpt.model import quant
from jaxgpt.model.cache import CACHE_AXES, attend_cache, write_cache
from jaxgpt.model.kernels import attention, matmul, norm
from jaxgpt.model.kernels.choice import Kernels
from jaxgpt.model.rope import rope, rope_frequencies


def logical(init, *names):
    return nn.with_logical_partitioning(init, names)


class Norm(nn.Module):
    """LayerNorm or RMSNorm (cfg.norm) over the last axis, or with `qk` the RMSNorm of each head's
    vector (QK-norm); computed in fp32."""
    cfg: ModelConfig
    kernels: Kernels
    qk: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        D = x.shape[-1]
        center = not self.qk and cfg.norm == "layernorm"
        axis = "head_dim" if self.qk else "norm"
        scale = self.param("scale", logical(nn.initializers.ones, axis), (D,))
        if center and cfg.bias:
            bias = self.param("bias", logical(nn.initializers.zeros, "norm"), (D,))
        else:
            bias = jnp.zeros((D,), jnp.float32)
        y = norm.normalize(self.kernels.impl, x.astype(jnp.float32), scale, bias, cfg.norm_eps,
                           center)
        return y.astype(cfg.dtype)


class Dense(nn.Module):
    """x @ w (+ b) over the trailing len(shape_in) axes of x, fp32 params cast to the matmul dtype.
    split: the first output axis holds weights used apart (SwiGLU's gate and up): one matmul per
    entry, returned as a list. From one matmul and slices, the backward pass assembled their
    gradients by padding and adding, a loop XLA:CPU ran far slower than the same arithmetic."""
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]
    names: tuple[str | None, ...]
    cfg: ModelConfig
    kernels: Kernels
    std: float
    split: bool = False
    activation: str = ""  # matmul.ACTIVATIONS' name, applied to x @ w + b (not with split)
    bias: bool | None = None  # None: cfg.bias

    @nn.compact
    def __call__(self, x):
        dtype = self.kernels.matmul_dtype
        K, N = math.prod(self.shape_in), math.prod(self.shape_out)
        batch_shape = x.shape[:x.ndim - len(self.shape_in)]
        # One 2-D matmul: XLA:CPU picks much better layouts for it than for the N-D einsum
        # (the N-D form made it transpose the MLP's hidden gradient in the backward pass).
        x_MxK = x.reshape(math.prod(batch_shape), K).astype(dtype)
        if self.has_variable("params", "w_scale") and not self.has_variable("params", "lora_a"):
            return self._quantized(x_MxK, self._bias(), batch_shape)
        w_KxN = self._weight(K, N).astype(dtype)  # before b: the init draws them in this order
        b = self._bias()
        xa_MxR, b_RxN = self._adapter(x_MxK)
        if not self.split:
            y_MxN = self._apply(x_MxK, w_KxN, b, xa_MxR, b_RxN)
            return y_MxN.reshape(batch_shape + self.shape_out)
        parts, n = self.shape_out[0], N // self.shape_out[0]
        w_KxPxn = w_KxN.reshape(K, parts, n)
        return [self._apply(x_MxK, w_KxPxn[:, i], None if b is None else b[i], xa_MxR,
                            None if b_RxN is None else b_RxN.reshape(-1, parts, n)[:, i]
                            ).reshape(batch_shape + self.shape_out[1:]) for i in range(parts)]

    def _bias(self):
        has_bias = self.cfg.bias if self.bias is None else self.bias
        return (self.param("b", logical(nn.initializers.zeros, *self.names[len(self.shape_in):]),
                           self.shape_out) if has_bias else None)

    def _quantized(self, x_MxK, b, batch_shape):
        """The layer on int8/int4 weights without adapters (decoding, model/quant.py): one matmul
        that reads the integers, its output split when split (no backward pass to shape)."""
        w = quant.stored(self.variables["params"], "w")
        y_MxN = quant.matmul(x_MxK, w, self.cfg.dtype)
        if b is not None:
            y_MxN = y_MxN + b.reshape(-1).astype(y_MxN.dtype)
        if self.activation:
            y_MxN = matmul.ACTIVATIONS[self.activation](y_MxN)
        if not self.split:
            return y_MxN.reshape(batch_shape + self.shape_out)
        y_MxPxn = y_MxN.reshape(-1, self.shape_out[0], y_MxN.shape[-1] // self.shape_out[0])
        return [y_MxPxn[:, i].reshape(batch_shape + self.shape_out[1:])
                for i in range(self.shape_out[0])]

    def _weight(self, K: int, N: int):
        """w as [K, N]: the fp32 param, or QLoRA's int8/int4 copy dequantized (model/quant.py),
        whose dequantized matrix the tuned backward products of matmul.matmul take."""
        if self.has_variable("params", "w_q"):
            return quant.dequantize(self.get_variable("params", "w_q").reshape(K, N),
                                    self.get_variable("params", "w_scale"), jnp.float32)
        w = self.param("w", logical(nn.initializers.normal(self.std), *self.names),
                       self.shape_in + self.shape_out)
        return w.reshape(K, N)

    def _adapter(self, x_MxK):
        """(scale * x @ lora_a, lora_b) in the matmul dtype where this layer has adapters, else
        (None, None). Added as a product of their own, so the base's weight gets no gradient."""
        if not self.has_variable("params", "lora_a"):
            return None, None
        impl, dtype = self.kernels.impl, self.kernels.matmul_dtype
        a_KxR = self.get_variable("params", "lora_a").astype(dtype)
        scale = self.get_variable("params", "lora_scale")
        xa_MxR = matmul.matmul(impl, x_MxK, a_KxR, jnp.float32) * scale
        return xa_MxR.astype(dtype), self.get_variable("params", "lora_b").astype(dtype)

    def _apply(self, x_MxK, w_KxN, b, xa_MxR, b_RxN):
        impl = self.kernels.impl
        y_MxN = matmul.matmul(impl, x_MxK, w_KxN, self.cfg.dtype)
        if xa_MxR is not None:
            y_MxN = y_MxN + matmul.matmul(impl, xa_MxR, b_RxN, self.cfg.dtype)
        # the bias added to the 2-D product, before any reshape: then cuBLAS adds it as it writes
        # the product, where a bias over two axes (q's heads) took a kernel of its own
        b_N = None if b is None else b.reshape(-1)
        if self.activation:
            return matmul.activation(impl, self.activation, y_MxN, b_N)
        if b_N is not None:
            y_MxN = y_MxN + b_N.astype(y_MxN.dtype)
        return y_MxN


def residual_std(cfg: ModelConfig) -> float:
    """Init std of the projections that write into the residual stream: by default GPT-2's
    init_std / sqrt(2N), so that the stream's variance at init does not grow with depth."""
    return cfg.residual_init_std or cfg.init_std / (2 * cfg.n_layer) ** 0.5


class Attention(nn.Module):
    """Grouped-query self-attention, with RoPE and QK-norm as the config says; with a KV cache,
    the new keys and values written into it and the queries attending over it."""
    cfg: ModelConfig
    kernels: Kernels

    @nn.compact
    def __call__(self, x_BxLxD, mask_BxLxS, positions_BxL, cache=None):
        cfg, kernels = self.cfg, self.kernels
        D, H, K, E = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        dense = functools.partial(Dense, cfg=cfg, kernels=kernels)
        qkv_bias = cfg.bias or cfg.qkv_bias
        q_BxLxHxE = dense((D,), (H, E), ("embed", "heads", "head_dim"), std=cfg.init_std,
                          bias=qkv_bias, name="wq")(x_BxLxD)
        kv_BxLx2xKxE = dense((D,), (2, K, E), ("embed", None, "kv_heads", "head_dim"),
                             std=cfg.init_std, bias=qkv_bias, name="wkv")(x_BxLxD)
        # to heads-first, once for q and once for k and v together
        q_BxHxLxE = q_BxLxHxE.transpose(0, 2, 1, 3)
        k_BxKxLxE, v_BxKxLxE = kv_BxLx2xKxE.transpose(2, 0, 3, 1, 4)
        if cfg.qk_norm:
            q_BxHxLxE = Norm(cfg, kernels, qk=True, name="q_norm")(q_BxHxLxE)
            k_BxKxLxE = Norm(cfg, kernels, qk=True, name="k_norm")(k_BxKxLxE)
        if cfg.position == "rope":  # positions lie below the context length and the keys' count
            length = max(cfg.seq_len,
                         x_BxLxD.shape[1] if mask_BxLxS is None else mask_BxLxS.shape[-1])
            inv_freq_E2 = rope_frequencies(cfg)
            q_BxHxLxE = rope(q_BxHxLxE, positions_BxL, inv_freq_E2, length)
            k_BxKxLxE = rope(k_BxKxLxE, positions_BxL, inv_freq_E2, length)
        if cache is not None:  # write the new keys at each row's position, attend over the cache
            start_B = positions_BxL[:, 0]
            cache = {"k": write_cache(cache["k"], k_BxKxLxE.astype(cfg.dtype), start_B),
                     "v": write_cache(cache["v"], v_BxKxLxE.astype(cfg.dtype), start_B)}
            cache = {name: nn.with_logical_constraint(x, CACHE_AXES) for name, x in cache.items()}
            out_BxHxLxE = attend_cache(kernels.impl, q_BxHxLxE, cache["k"], cache["v"], mask_BxLxS)
        else:  # in the matmul dtype: scores and probabilities stay fp32 (kernels/attention.py)
            q_BxHxLxE, k_BxKxLxE, v_BxKxLxE = (x.astype(kernels.matmul_dtype)
                                               for x in (q_BxHxLxE, k_BxKxLxE, v_BxKxLxE))
            # the mask is causal within each segment, a segment's tokens contiguous in its row
            out_BxHxLxE = attention.attention(kernels.impl, q_BxHxLxE, k_BxKxLxE, v_BxKxLxE,
                                              mask_BxLxS, causal=True).astype(cfg.dtype)
        out_BxLxHxE = out_BxHxLxE.transpose(0, 2, 1, 3)
        out_BxLxD = dense((H, E), (D,), ("heads", "head_dim", "embed"), std=residual_std(cfg),
                          name="wo")(out_BxLxHxE)
        return out_BxLxD, cache


class Mlp(nn.Module):
    """The feed-forward layer: gelu/relu2 between two matrices, or SwiGLU (cfg.mlp)."""
    cfg: ModelConfig
    kernels: Kernels

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.cfg
        D, F = cfg.d_model, cfg.d_ff
        dense = functools.partial(Dense, cfg=cfg, kernels=self.kernels)
        if cfg.mlp == "swiglu":
            gate_BxLxF, up_BxLxF = dense((D,), (2, F), ("embed", None, "mlp"), std=cfg.init_std,
                                         split=True, name="w_up")(x_BxLxD)
            h_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
        else:
            h_BxLxF = dense((D,), (F,), ("embed", "mlp"), std=cfg.init_std, activation=cfg.mlp,
                            name="w_up")(x_BxLxD)
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
        return dense((F,), (D,), ("mlp", "embed"), std=residual_std(cfg), name="w_down")(h_BxLxF)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""
    cfg: ModelConfig
    kernels: Kernels
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxLxD, mask_BxLxS, positions_BxL, cache=None):
        cfg, kernels = self.cfg, self.kernels
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        attn_BxLxD, cache = Attention(cfg, kernels, name="attn")(
            Norm(cfg, kernels, name="norm_attn")(x_BxLxD), mask_BxLxS, positions_BxL, cache)
        x_BxLxD = x_BxLxD + drop(attn_BxLxD)
        mlp_BxLxD = Mlp(cfg, kernels, name="mlp")(Norm(cfg, kernels, name="norm_mlp")(x_BxLxD))
        x_BxLxD = x_BxLxD + drop(mlp_BxLxD)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
        return x_BxLxD, cache  # (carry, output) so the same block also runs under nn.scan

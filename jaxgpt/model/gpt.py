"""The GPT decoder: two presets (gpt2, llama) behind one config, as Flax modules over a plain pytree.

    model = GPT(cfg)                          # cfg: a resolved ModelConfig
    params = model.init(jax.random.key(0))    # a plain dict of fp32 arrays
    logits_BxLxV = model.apply(params, tokens_BxL)
    cache = model.init_cache(B)               # decoding: per layer k, v of [B, K, S, E]
    logits_BxLxV, cache = model.apply(params, tokens_BxL, segments, positions, cache=cache)

Shapes in names: B batch, L query length, S key length, D width, H heads, K kv heads, G = H/K,
E head dim, F MLP width, V vocab, N layers. Every parameter carries logical axis names
(`GPT.logical_axes`), which `sharding.py` maps onto the mesh; activations carry them too.
Attention, the norms and the matmuls run on `kernels.py`, whose implementation `cfg.attention`
picks (auto: the hand-tuned XLA:CPU forms on a CPU, cuDNN flash attention on a GPU).

With a KV cache (S = cfg.seq_len slots per row) each row's new keys and values are written at
their absolute positions (a row's new tokens are contiguous) and the queries attend over the
static cache, causally: a key at position <= the query's was written by this sequence, at this
call or an earlier one, so nothing else marks which cache entries are valid. Only the cache's
first multiple of KV_CHUNK positions that covers every query is read (attend_cache).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt import hardware
from jaxgpt.model import kernels
from jaxgpt.config import ModelConfig


CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")  # a KV cache's [B, K, S, E], sharded as activations


def logical(init, *names):
    return nn.with_logical_partitioning(init, names)


def positions_from_segments(segment_ids_BxL: jax.Array) -> jax.Array:
    """Position of each token within its segment (packed documents each start at 0)."""
    L = segment_ids_BxL.shape[1]
    idx_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), segment_ids_BxL.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids_BxL[:, :1], bool),
                              segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
    return idx_BxL - jax.lax.cummax(jnp.where(starts, idx_BxL, 0), axis=1)


def attention_mask(q_seg_BxL, q_pos_BxL, kv_seg_BxS, kv_pos_BxS) -> jax.Array:
    """Causal within a segment; segment 0 is padding and is never attended to.

    Positions and segments are given for queries and keys separately, so the same mask serves
    training (S = L) and decoding against a KV cache (L new tokens, S cached ones).
    """
    same_doc = q_seg_BxL[:, :, None] == kv_seg_BxS[:, None, :]
    causal = q_pos_BxL[:, :, None] >= kv_pos_BxS[:, None, :]
    return same_doc & causal & (kv_seg_BxS[:, None, :] != 0)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """RoPE's angle per position for each pair of a head's dims: theta^(-2i/E), stretched as
    cfg.rope_scaling says (Hugging Face's linear and llama3 rope types give the same values)."""
    E = cfg.head_dim
    inv_freq_E2 = cfg.rope_theta ** -(jnp.arange(0, E, 2, dtype=jnp.float32) / E)
    if cfg.rope_scaling == "linear":  # positions p read as p / factor
        return inv_freq_E2 / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        # turns of each frequency over the pretraining context: past high_freq_factor turns it is kept,
        # below low_freq_factor divided by the factor (stretched to the new context), blended between
        turns_E2 = cfg.rope_original_context / (2 * math.pi / inv_freq_E2)
        kept_E2 = jnp.clip((turns_E2 - cfg.rope_low_freq_factor)
                           / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor), 0.0, 1.0)
        return (1 - kept_E2) * inv_freq_E2 / cfg.rope_factor + kept_E2 * inv_freq_E2
    return inv_freq_E2


def rope(x_BxHxLxE: jax.Array, positions_BxL: jax.Array, inv_freq_E2: jax.Array, length: int) -> jax.Array:
    """Rotary position embedding, rotating the two halves of each head (the GPT-NeoX layout) by
    position * inv_freq (rope_frequencies), for positions below `length`. When the rows hold more
    positions than that (training), sin and cos come from a [length, E/2] table looked up by position:
    computed per (row, position), XLA:CPU fused them into every head's rotation and into the backward
    pass again (quickstart step: 40 ms of 390). A decoding step's few positions are cheaper than a
    table of the whole context. Both give the same values: sin and cos of float32(position) * inv_freq."""
    if positions_BxL.size > length:
        angles_TxE2 = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq_E2
        sin_Bx1xLxE2, cos_Bx1xLxE2 = (table[positions_BxL][:, None]
                                      for table in (jnp.sin(angles_TxE2), jnp.cos(angles_TxE2)))
    else:
        angles_Bx1xLxE2 = positions_BxL[:, None, :, None].astype(jnp.float32) * inv_freq_E2
        sin_Bx1xLxE2, cos_Bx1xLxE2 = jnp.sin(angles_Bx1xLxE2), jnp.cos(angles_Bx1xLxE2)
    x1, x2 = jnp.split(x_BxHxLxE.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_Bx1xLxE2 - x2 * sin_Bx1xLxE2, x2 * cos_Bx1xLxE2 + x1 * sin_Bx1xLxE2], axis=-1)
    return out.astype(x_BxHxLxE.dtype)


def matmul_dtype(cfg: ModelConfig):
    """What the matmuls multiply in (model.matmul_dtype; auto: the compute dtype)."""
    return cfg.dtype if cfg.matmul_dtype == "auto" else cfg.matmul_dtype


def cache_dtype(cfg: ModelConfig):
    """What a KV cache stores: the compute dtype, or on XLA:CPU a half-precision one's 16-bit
    patterns as uint16. XLA:CPU runs a bf16 scatter or dynamic-update-slice by converting the
    whole operand to fp32 and back, so every in-place cache write read and wrote the whole cache
    (8 rows of GPT-2 small: 2 ms a layer a step); on integers it writes in place."""
    if kernels.resolve(cfg.attention, cfg.dtype) == "cpu" and jnp.dtype(cfg.dtype) in kernels.HALF_DTYPES:
        return jnp.uint16
    return cfg.dtype


def write_cache(cache_BxKxSxE, x_BxKxLxE, start_B) -> jax.Array:
    """Each row's new keys (or values) into its cache row from its position on, in place (one scatter)."""
    if cache_BxKxSxE.dtype == jnp.uint16:  # half-precision values as their bits (cache_dtype)
        x_BxKxLxE = jax.lax.bitcast_convert_type(x_BxKxLxE, jnp.uint16)
    write = jax.vmap(lambda c_KxSxE, x_KxLxE, p: jax.lax.dynamic_update_slice(c_KxSxE, x_KxLxE, (0, p, 0)))
    return write(cache_BxKxSxE, x_BxKxLxE.astype(cache_BxKxSxE.dtype), start_B)


KV_CHUNK = 128  # decoding attends over the cache in multiples of this many positions


def attend_cache(impl: str, q_BxHxLxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS, positions_BxL,
                 window: str = "chunks") -> jax.Array:
    """Attention over a KV cache's first n positions only (window "chunks"): n the smallest
    multiple of KV_CHUNK (or S) above every query's position, so past it the causal mask allows
    nothing anyway; or over all S of them (window "whole", kernels.resolve_cache_window).

    A decode step otherwise reads the whole static cache (8 rows of GPT-2 small at S = 1024:
    600 MB a step, 18 of 45 ms on a CPU) while the rows hold a few hundred tokens. One program
    holds a branch per n (lax.switch on the largest position), so a growing row never recompiles.
    """
    S = k_BxKxSxE.shape[2]
    sizes = [min(S, KV_CHUNK * (i + 1)) for i in range(-(-S // KV_CHUNK))]

    def attend(n, q_BxHxLxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS):
        k_BxKxNxE, v_BxKxNxE = k_BxKxSxE[:, :, :n], v_BxKxSxE[:, :, :n]
        if k_BxKxNxE.dtype == jnp.uint16:  # half-precision bits (cache_dtype): XLA:CPU's half-precision
            # batched dots convert their operands to fp32 anyway; fused with the slice, only n positions
            k_BxKxNxE, v_BxKxNxE = (jax.lax.bitcast_convert_type(x, q_BxHxLxE.dtype).astype(jnp.float32)
                                    for x in (k_BxKxNxE, v_BxKxNxE))
            out_BxHxLxE = kernels.attention(impl, q_BxHxLxE.astype(jnp.float32), k_BxKxNxE, v_BxKxNxE,
                                            mask_BxLxS[..., :n])
            return out_BxHxLxE.astype(q_BxHxLxE.dtype)
        return kernels.attention(impl, q_BxHxLxE, k_BxKxNxE, v_BxKxNxE, mask_BxLxS[..., :n])

    if len(sizes) == 1 or window == "whole":
        return attend(S, q_BxHxLxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS)
    chunk = jnp.minimum(jnp.max(positions_BxL) // KV_CHUNK, len(sizes) - 1)
    return jax.lax.switch(chunk, [functools.partial(attend, n) for n in sizes],
                          q_BxHxLxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS)


class Norm(nn.Module):
    """LayerNorm or RMSNorm (cfg.norm) over the last axis, or with `qk` the RMSNorm of each head's
    vector (QK-norm); computed in fp32."""
    cfg: ModelConfig
    qk: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        D = x.shape[-1]
        center = not self.qk and cfg.norm == "layernorm"
        scale = self.param("scale", logical(nn.initializers.ones, "head_dim" if self.qk else "norm"), (D,))
        if center and cfg.bias:
            bias = self.param("bias", logical(nn.initializers.zeros, "norm"), (D,))
        else:
            bias = jnp.zeros((D,), jnp.float32)
        impl = kernels.resolve(cfg.attention, cfg.dtype)
        return kernels.normalize(impl, x.astype(jnp.float32), scale, bias, cfg.norm_eps, center).astype(cfg.dtype)


class Dense(nn.Module):
    """x @ w (+ b) over the trailing len(shape_in) axes of x, fp32 params cast to the compute dtype.
    split: the first output axis holds weights used apart (SwiGLU's gate and up): one matmul per
    entry, returned as a list. From one matmul and slices, the backward pass assembled their
    gradients into one array by padding and adding, a loop XLA:CPU ran at a third of the speed of
    the same arithmetic without it (the quickstart's MLP: 4.3 ms per layer)."""
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]
    names: tuple[str | None, ...]
    cfg: ModelConfig
    std: float
    split: bool = False
    activation: str = ""  # kernels.ACTIVATIONS' name, applied to x @ w + b (not with split)
    bias: bool | None = None  # None: cfg.bias

    @nn.compact
    def __call__(self, x):
        w = self.param("w", logical(nn.initializers.normal(self.std), *self.names),
                       self.shape_in + self.shape_out)
        b = (self.param("b", logical(nn.initializers.zeros, *self.names[len(self.shape_in):]), self.shape_out)
             if (self.cfg.bias if self.bias is None else self.bias) else None)
        if not self.split:
            return self._apply(x, w, b, self.shape_out)
        axis = len(self.shape_in)  # w's first output axis
        return [self._apply(x, jnp.take(w, i, axis), None if b is None else b[i], self.shape_out[1:])
                for i in range(self.shape_out[0])]

    def _apply(self, x, w, b, shape_out):
        batch_shape = x.shape[:x.ndim - len(self.shape_in)]
        # One 2-D matmul: XLA:CPU picks much better layouts for it than for the N-D einsum
        # (the N-D form made it transpose the MLP's hidden gradient in the backward pass).
        x_MxK = x.reshape(math.prod(batch_shape), math.prod(self.shape_in)).astype(matmul_dtype(self.cfg))
        w_KxN = w.reshape(math.prod(self.shape_in), math.prod(shape_out)).astype(matmul_dtype(self.cfg))
        impl = kernels.resolve(self.cfg.attention, self.cfg.dtype)
        y_MxN = kernels.matmul(impl, x_MxK, w_KxN, self.cfg.dtype)
        # the bias added to the 2-D product, before any reshape: then cuBLAS adds it as it writes the
        # product (a GPU with Triton's matmuls off), where a bias over two axes (q's heads) took a
        # kernel of its own. The same sums; Triton's matmuls and XLA:CPU make the same kernels.
        b_N = None if b is None else b.reshape(-1)
        if self.activation:
            y_MxN = kernels.activate(impl, self.activation, y_MxN, b_N)
        elif b_N is not None:
            y_MxN = y_MxN + b_N.astype(y_MxN.dtype)
        return y_MxN.reshape(batch_shape + shape_out)


def residual_std(cfg: ModelConfig) -> float:
    """Init std of the projections that write into the residual stream: by default GPT-2's
    init_std / sqrt(2N), so that the stream's variance at init does not grow with depth."""
    return cfg.residual_init_std or cfg.init_std / (2 * cfg.n_layer) ** 0.5


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, mask_BxLxS, positions_BxL, cache=None):
        cfg = self.cfg
        D, H, K, E = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        q_BxLxHxE = Dense((D,), (H, E), ("embed", "heads", "head_dim"), cfg, cfg.init_std, bias=qkv_bias,
                          name="wq")(x_BxLxD)
        kv_BxLx2xKxE = Dense((D,), (2, K, E), ("embed", None, "kv_heads", "head_dim"), cfg, cfg.init_std,
                             bias=qkv_bias, name="wkv")(x_BxLxD)
        # to heads-first, once for q and once for k and v together
        q_BxHxLxE = q_BxLxHxE.transpose(0, 2, 1, 3)
        k_BxKxLxE, v_BxKxLxE = kv_BxLx2xKxE.transpose(2, 0, 3, 1, 4)
        if cfg.qk_norm:
            q_BxHxLxE = Norm(cfg, qk=True, name="q_norm")(q_BxHxLxE)
            k_BxKxLxE = Norm(cfg, qk=True, name="k_norm")(k_BxKxLxE)
        if cfg.position == "rope":  # positions lie below the context length and the keys' count
            length = max(cfg.seq_len, x_BxLxD.shape[1] if mask_BxLxS is None else mask_BxLxS.shape[-1])
            inv_freq_E2 = rope_frequencies(cfg)
            q_BxHxLxE = rope(q_BxHxLxE, positions_BxL, inv_freq_E2, length)
            k_BxKxLxE = rope(k_BxKxLxE, positions_BxL, inv_freq_E2, length)
        if cache is not None:  # write the new keys at each row's position, attend over the cache
            cache = {"k": write_cache(cache["k"], k_BxKxLxE.astype(cfg.dtype), positions_BxL[:, 0]),
                     "v": write_cache(cache["v"], v_BxKxLxE.astype(cfg.dtype), positions_BxL[:, 0])}
            cache = {name: nn.with_logical_constraint(x, CACHE_AXES) for name, x in cache.items()}
            k_BxKxLxE, v_BxKxLxE = cache["k"], cache["v"]  # now [B, K, S, E]
        impl = kernels.resolve(cfg.attention, cfg.dtype)
        if cache is not None:
            out_BxHxLxE = attend_cache(impl, q_BxHxLxE, k_BxKxLxE, v_BxKxLxE, mask_BxLxS, positions_BxL,
                                       kernels.resolve_cache_window(cfg.cache_window))
        else:  # in the matmul dtype: scores and probabilities stay fp32 (kernels.attention)
            q_BxHxLxE, k_BxKxLxE, v_BxKxLxE = (x.astype(matmul_dtype(cfg)) for x in (q_BxHxLxE, k_BxKxLxE, v_BxKxLxE))
            # the mask is causal within each segment, and a segment's tokens are contiguous in its row
            out_BxHxLxE = kernels.attention(impl, q_BxHxLxE, k_BxKxLxE, v_BxKxLxE, mask_BxLxS,
                                            causal=True).astype(cfg.dtype)
        out_BxLxHxE = out_BxHxLxE.transpose(0, 2, 1, 3)
        out_BxLxD = Dense((H, E), (D,), ("heads", "head_dim", "embed"), cfg, residual_std(cfg), name="wo")(out_BxLxHxE)
        return out_BxLxD, cache


class Mlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.cfg
        D, F = cfg.d_model, cfg.d_ff
        if cfg.mlp == "swiglu":
            gate_BxLxF, up_BxLxF = Dense((D,), (2, F), ("embed", None, "mlp"), cfg, cfg.init_std, split=True,
                                         name="w_up")(x_BxLxD)
            h_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
        else:
            h_BxLxF = Dense((D,), (F,), ("embed", "mlp"), cfg, cfg.init_std, activation=cfg.mlp,
                            name="w_up")(x_BxLxD)
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
        return Dense((F,), (D,), ("mlp", "embed"), cfg, residual_std(cfg), name="w_down")(h_BxLxF)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""
    cfg: ModelConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxLxD, mask_BxLxS, positions_BxL, cache=None):
        drop = nn.Dropout(self.cfg.dropout, deterministic=self.deterministic)
        attn_BxLxD, cache = Attention(self.cfg, name="attn")(
            Norm(self.cfg, name="norm_attn")(x_BxLxD), mask_BxLxS, positions_BxL, cache)
        x_BxLxD = x_BxLxD + drop(attn_BxLxD)
        x_BxLxD = x_BxLxD + drop(Mlp(self.cfg, name="mlp")(Norm(self.cfg, name="norm_mlp")(x_BxLxD)))
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
        return x_BxLxD, cache  # (carry, output) so the same block also runs under nn.scan


class Transformer(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, tokens_BxL, segment_ids_BxL, positions_BxL, cache=None, logits=True):
        """Logits [B, L, V]; without logits, the head's input and weight ([B, L, D], [D, V] fp32)."""
        cfg = self.cfg
        V, D = cfg.vocab_size, cfg.d_model
        wte = self.param("wte", logical(nn.initializers.normal(cfg.init_std), "vocab", "embed"), (V, D))
        x_BxLxD = wte[tokens_BxL].astype(cfg.dtype)
        if cfg.position == "learned":
            wpe = self.param("wpe", logical(nn.initializers.normal(cfg.init_std), None, "embed"), (cfg.seq_len, D))
            x_BxLxD = x_BxLxD + wpe[positions_BxL].astype(cfg.dtype)
        x_BxLxD = nn.Dropout(cfg.dropout, deterministic=self.deterministic)(x_BxLxD)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))

        if cache is not None:
            if segment_ids_BxL is None:
                segment_ids_BxL = jnp.ones_like(tokens_BxL)
            return self.decode(x_BxLxD, segment_ids_BxL, positions_BxL, cache, wte)
        # one mask for every layer: causal, within a segment, never onto padding; without segments
        # (each row one document, no padding) causality alone, which the kernels apply themselves
        mask_BxLxL = (None if segment_ids_BxL is None else
                      attention_mask(segment_ids_BxL, positions_BxL, segment_ids_BxL, positions_BxL))
        block = nn.remat(Block, prevent_cse=not cfg.scan_layers, static_argnums=()) if cfg.remat else Block
        if cfg.scan_layers:
            blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                             in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layer,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            x_BxLxD, _ = blocks(cfg, self.deterministic, name="blocks")(x_BxLxD, mask_BxLxL, positions_BxL)
        else:
            for i in range(cfg.n_layer):
                x_BxLxD, _ = block(cfg, self.deterministic, name=f"block_{i}")(x_BxLxD, mask_BxLxL, positions_BxL)
        return self.head(x_BxLxD, wte) if logits else self.head_inputs(x_BxLxD, wte)

    def decode(self, x_BxLxD, segment_ids_BxL, positions_BxL, cache, wte):
        """The layers against a KV cache (a list of per-layer {"k", "v"}): (logits, new cache)."""
        cfg = self.cfg
        if cfg.scan_layers:
            raise NotImplementedError("decoding with a KV cache runs unscanned layers: see GPT.for_decoding")
        B, S = x_BxLxD.shape[0], cache[0]["k"].shape[2]
        kv_pos_BxS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        mask_BxLxS = attention_mask(segment_ids_BxL, positions_BxL, jnp.ones_like(kv_pos_BxS), kv_pos_BxS)
        new_cache = []
        for i in range(cfg.n_layer):
            x_BxLxD, layer_cache = Block(cfg, True, name=f"block_{i}")(x_BxLxD, mask_BxLxS, positions_BxL, cache[i])
            new_cache.append(layer_cache)
        return self.head(x_BxLxD, wte), new_cache

    def head_inputs(self, x_BxLxD, wte):
        """The final norm of the residual stream, and the output head's [D, V] fp32 weight."""
        cfg = self.cfg
        V, D = cfg.vocab_size, cfg.d_model
        x_BxLxD = Norm(cfg, name="norm_out")(x_BxLxD)
        if cfg.tie_embeddings:
            return x_BxLxD, wte.T
        return x_BxLxD, self.param("lm_head", logical(nn.initializers.normal(cfg.init_std), "embed", "vocab"), (D, V))

    def head(self, x_BxLxD, wte):
        cfg = self.cfg
        V, D = cfg.vocab_size, cfg.d_model
        x_BxLxD, w_DxV = self.head_inputs(x_BxLxD, wte)
        x_BxLxD, w_DxV = x_BxLxD.astype(matmul_dtype(cfg)), w_DxV.astype(matmul_dtype(cfg))
        if (x_BxLxD.shape[0] * x_BxLxD.shape[1] == 1 and w_DxV.dtype in kernels.HALF_DTYPES
                and hardware.compute_platform() == "cpu"):
            # one row (decoding one sequence): XLA:CPU fuses this upcast into its matvec loop, 5x
            # faster than a half-precision matvec (768x50304: 33 vs 6 GFLOP/s), the same products
            x_BxLxD, w_DxV = x_BxLxD.astype(jnp.float32), w_DxV.astype(jnp.float32)
        # one 2-D matmul, as in Dense: from the 3-D einsum XLA:CPU made a transposed copy of the [B*L, V]
        # logits gradient for the weight gradient (quickstart step, head forward + backward: 272 vs 115 ms)
        B, L = x_BxLxD.shape[:2]
        impl = kernels.resolve(cfg.attention, cfg.dtype)
        logits_MxV = kernels.matmul(impl, x_BxLxD.reshape(B * L, D), w_DxV, cfg.logits_dtype)
        logits_BxLxV = logits_MxV.astype(jnp.float32).reshape(B, L, V)
        if cfg.logit_softcap > 0:
            logits_BxLxV = cfg.logit_softcap * jnp.tanh(logits_BxLxV / cfg.logit_softcap)
        return logits_BxLxV


def token_losses(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Cross-entropy of each target token, in fp32."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits_BxLxV, axis=-1) - target_logit_BxL


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: usable as a static jit argument
class GPT:
    """The functional face of the model: params are a plain pytree of fp32 arrays."""
    cfg: ModelConfig

    def module(self, deterministic: bool = True) -> Transformer:
        return Transformer(self.cfg, deterministic)

    def _boxed_init(self, rng):
        tokens = jnp.zeros((1, self.cfg.seq_len), jnp.int32)
        segments = jnp.ones_like(tokens)
        return self.module().init({"params": rng}, tokens, segments, positions_from_segments(segments))["params"]

    def init(self, rng: jax.Array) -> dict:
        if isinstance(rng, jax.core.Tracer):  # traced (jax.eval_shape, inside a jit): that program compiles it
            return nn.meta.unbox(self._boxed_init(rng))
        return self._compiled_init(rng)

    @functools.cached_property
    def _compiled_init(self):
        # One XLA program, not the init's ops dispatched one by one (each compiled on its first use). On a CPU
        # at XLA's backend optimization level 1, as train.Trainer.init_state: its random draws are most of the
        # compile, and the values are level 2's to the bit. First call in a fresh process on the 2-core host,
        # by ops / compiled at level 2 / level 1: a 2-layer toy 7.0 / 3.4 / 1.3 s, the quickstart's model
        # 5.7 / 3.2 / 1.8 s, GPT-2 124M 10.5 / 6.7 / 5.0 s.
        cpu = jax.default_backend() == "cpu"
        return jax.jit(lambda rng: nn.meta.unbox(self._boxed_init(rng)),
                       compiler_options={"xla_backend_optimization_level": 1} if cpu else None)

    @functools.cached_property
    def logical_axes(self) -> dict:
        """A pytree like params whose leaves are PartitionSpecs of logical axis names."""
        return nn.get_partition_spec(jax.eval_shape(self._boxed_init, jax.random.key(0)))

    def for_decoding(self, params) -> tuple["GPT", dict]:
        """The same model without scan_layers (decoding against a cache runs the layers one by one):
        a scanned run's stacked block params split into block_0 .. block_{N-1}."""
        if not self.cfg.scan_layers:
            return self, params
        rest = {name: value for name, value in params.items() if name != "blocks"}
        layers = {f"block_{i}": jax.tree.map(lambda x, i=i: x[i], params["blocks"]) for i in range(self.cfg.n_layer)}
        return GPT(dataclasses.replace(self.cfg, scan_layers=False)), {**rest, **layers}

    def init_cache(self, batch: int, length: int | None = None) -> list[dict]:
        """An empty KV cache: per layer k and v of [batch, K, length (default seq_len), E] in the
        compute dtype (on XLA:CPU a half-precision one as uint16 bits: see cache_dtype)."""
        cfg = self.cfg
        shape = (batch, cfg.n_kv_head, length or cfg.seq_len, cfg.head_dim)
        dtype = cache_dtype(cfg)
        return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layer)]

    def apply(self, params, tokens_BxL, segment_ids_BxL=None, positions_BxL=None, *, dropout_rng=None,
              cache=None, logits=True):
        """Logits [B, L, V]; with a cache (see init_cache), (logits, new cache) with the new tokens'
        keys written at positions_BxL (absolute positions, contiguous within a row); without logits,
        what the output head would multiply: the normed [B, L, D] and the [D, V] fp32 weight.
        No segment ids: each row is one document without padding, and attention is causal alone."""
        if positions_BxL is None:
            positions_BxL = (positions_from_segments(segment_ids_BxL) if segment_ids_BxL is not None else
                             jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1], dtype=jnp.int32), tokens_BxL.shape))
        deterministic = dropout_rng is None or self.cfg.dropout == 0
        rngs = {} if deterministic else {"dropout": dropout_rng}
        return self.module(deterministic).apply({"params": params}, tokens_BxL, segment_ids_BxL, positions_BxL,
                                                cache, logits, rngs=rngs)

    def loss(self, params, batch: dict, dropout_rng=None, *, segments: bool = True) -> tuple[jax.Array, jax.Array]:
        """(sum of masked token losses, number of masked tokens) for a batch dict of [B, L] arrays;
        with cfg.loss_chunks, by the fused head (kernels.head_loss), which never holds all the logits.
        segments=False: the caller knows each row is one document without padding (plain packed text,
        segment ids all ones), so attention is causal alone and reads no mask (cuDNN skips it)."""
        cfg = self.cfg
        mask_BxL = batch["loss_mask"].astype(jnp.float32)
        segment_ids_BxL = batch["segment_ids"] if segments else None
        if cfg.loss_chunks:
            x_BxLxD, w_DxV = self.apply(params, batch["inputs"], segment_ids_BxL, batch.get("positions"),
                                        dropout_rng=dropout_rng, logits=False)
            impl = kernels.resolve(cfg.attention, cfg.dtype)
            total = kernels.head_loss(impl, x_BxLxD, w_DxV, batch["targets"], mask_BxL, cfg.loss_chunks,
                                      matmul_dtype(cfg), cfg.logit_softcap, cfg.logits_dtype)
            return total, mask_BxL.sum()
        logits_BxLxV = self.apply(params, batch["inputs"], segment_ids_BxL, batch.get("positions"),
                                  dropout_rng=dropout_rng)
        return (token_losses(logits_BxLxV, batch["targets"]) * mask_BxL).sum(), mask_BxL.sum()

    def num_params(self, params) -> int:
        return sum(x.size for x in jax.tree.leaves(params))

    def flops_per_token(self, params) -> float:
        """Training FLOPs per token: 6 per matmul weight plus attention scores (PaLM's count).

        Embedding lookups are not matmuls: the position table never counts, and the token table
        counts only when it doubles as the output head.
        """
        cfg = self.cfg
        n = self.num_params(params) - (cfg.seq_len * cfg.d_model if cfg.position == "learned" else 0)
        if not cfg.tie_embeddings:
            n -= cfg.vocab_size * cfg.d_model
        return 6 * n + 12 * cfg.n_layer * cfg.d_model * cfg.seq_len

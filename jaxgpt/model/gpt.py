"""The GPT decoder: two presets (gpt2, llama) behind one config, Flax modules over a plain pytree.

    model = GPT(cfg)                          # cfg: a resolved ModelConfig; its kernels chosen here
    params = model.init(jax.random.key(0))    # a plain dict of fp32 arrays
    logits_BxLxV = model.apply(params, tokens_BxL)
    cache = model.init_cache(B)               # decoding: per layer k, v of [B, K, S, E]
    logits_BxLxV, cache = model.apply(params, tokens_BxL, segments, positions, cache=cache)

Shapes in names: B batch, L query length, S key length, D width, H heads, K kv heads, G = H/K,
E head dim, F MLP width, V vocab, N layers. Every parameter carries logical axis names
(`GPT.logical_axes`), which parallel/sharding.py maps onto the mesh. The layers (layers.py) run
attention, the norms and the matmuls on the kernels (kernels/) that GPT picks once for this host
(kernels/choice.py: `model.kernels=auto` is the XLA:CPU forms on a CPU, cuDNN on a GPU). The KV
cache is cache.py's; rotary positions rope.py's.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.config import ModelConfig
from jaxgpt.model import quant
from jaxgpt.model.cache import cache_dtype
from jaxgpt.model.kernels import matmul
from jaxgpt.model.kernels.choice import HALF_DTYPES, Kernels, choose
from jaxgpt.model.kernels.head_loss import head_loss
from jaxgpt.model.layers import Block, Norm, logical


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


class Transformer(nn.Module):
    """Token (and learned position) embeddings, the blocks, the final norm and the output head."""
    cfg: ModelConfig
    kernels: Kernels
    deterministic: bool = True

    @nn.compact
    def __call__(self, tokens_BxL, segment_ids_BxL, positions_BxL, cache=None, logits=True):
        """Logits [B, L, V]; without logits, the head's input and weight ([B, L, D], [D, V] in
        fp32)."""
        cfg = self.cfg
        V, D = cfg.vocab_size, cfg.d_model
        init = nn.initializers.normal(cfg.init_std)
        if self.has_variable("params", "wte_scale"):  # int8/int4 rows (model/quant.py)
            wte = quant.stored(self.variables["params"], "wte")
            x_BxLxD = quant.embed(wte, tokens_BxL).astype(cfg.dtype)
        else:
            wte = self.param("wte", logical(init, "vocab", "embed"), (V, D))
            x_BxLxD = wte[tokens_BxL].astype(cfg.dtype)
        if cfg.position == "learned":
            wpe = self.param("wpe", logical(init, None, "embed"), (cfg.seq_len, D))
            x_BxLxD = x_BxLxD + wpe[positions_BxL].astype(cfg.dtype)
        x_BxLxD = nn.Dropout(cfg.dropout, deterministic=self.deterministic)(x_BxLxD)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))

        if cache is not None:
            if segment_ids_BxL is None:
                segment_ids_BxL = jnp.ones_like(tokens_BxL)
            return self.decode(x_BxLxD, segment_ids_BxL, positions_BxL, cache, wte)
        # one mask for every layer: causal, within a segment, never onto padding; without segments
        # (each row one document, no padding) causality alone, which the kernels apply themselves
        mask_BxLxL = None
        if segment_ids_BxL is not None:
            mask_BxLxL = attention_mask(segment_ids_BxL, positions_BxL, segment_ids_BxL,
                                        positions_BxL)
        x_BxLxD = self.blocks(x_BxLxD, mask_BxLxL, positions_BxL)
        return self.head(x_BxLxD, wte) if logits else self.head_inputs(x_BxLxD, wte)

    def blocks(self, x_BxLxD, mask_BxLxL, positions_BxL):
        """The N blocks of a forward pass without a cache: scanned, rematerialized, as cfg says."""
        cfg, args = self.cfg, (self.cfg, self.kernels, self.deterministic)
        block = (nn.remat(Block, prevent_cse=not cfg.scan_layers, static_argnums=()) if cfg.remat
                 else Block)
        if cfg.scan_layers:
            blocks = nn.scan(block, variable_axes={"params": 0},
                             split_rngs={"params": True, "dropout": True},
                             in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layer,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            x_BxLxD, _ = blocks(*args, name="blocks")(x_BxLxD, mask_BxLxL, positions_BxL)
            return x_BxLxD
        for i in range(cfg.n_layer):
            x_BxLxD, _ = block(*args, name=f"block_{i}")(x_BxLxD, mask_BxLxL, positions_BxL)
        return x_BxLxD

    def decode(self, x_BxLxD, segment_ids_BxL, positions_BxL, cache, wte):
        """The layers against a KV cache (a list of per-layer {"k", "v"}): (logits, new cache)."""
        cfg = self.cfg
        if cfg.scan_layers:
            raise NotImplementedError("decoding with a KV cache runs unscanned layers: "
                                      "see GPT.for_decoding")
        B, S = x_BxLxD.shape[0], cache[0]["k"].shape[2]
        kv_pos_BxS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        mask_BxLxS = attention_mask(segment_ids_BxL, positions_BxL, jnp.ones_like(kv_pos_BxS),
                                    kv_pos_BxS)
        new_cache = []
        for i in range(cfg.n_layer):
            x_BxLxD, layer_cache = Block(cfg, self.kernels, True, name=f"block_{i}")(
                x_BxLxD, mask_BxLxS, positions_BxL, cache[i])
            new_cache.append(layer_cache)
        return self.head(x_BxLxD, wte), new_cache

    def head_inputs(self, x_BxLxD, wte):
        """The final norm of the residual stream, and the output head's [D, V] fp32 weight."""
        cfg = self.cfg
        V, D = cfg.vocab_size, cfg.d_model
        x_BxLxD = Norm(cfg, self.kernels, name="norm_out")(x_BxLxD)
        if cfg.tie_embeddings:  # quantized: the dict of its [V, D] rows, which head() reads
            return x_BxLxD, wte if isinstance(wte, dict) else wte.T
        if self.has_variable("params", "lm_head_scale"):
            return x_BxLxD, quant.stored(self.variables["params"], "lm_head")
        init = nn.initializers.normal(cfg.init_std)
        return x_BxLxD, self.param("lm_head", logical(init, "embed", "vocab"), (D, V))

    def head(self, x_BxLxD, wte):
        cfg, kernels = self.cfg, self.kernels
        V, D = cfg.vocab_size, cfg.d_model
        x_BxLxD, w_DxV = self.head_inputs(x_BxLxD, wte)
        B, L = x_BxLxD.shape[:2]
        if isinstance(w_DxV, dict):  # int8/int4 for decoding (model/quant.py)
            logits_MxV = quant.matmul(x_BxLxD.reshape(B * L, D), w_DxV, cfg.logits_dtype,
                                      rows=cfg.tie_embeddings)
        else:
            x_BxLxD = x_BxLxD.astype(kernels.matmul_dtype)
            w_DxV = w_DxV.astype(kernels.matmul_dtype)
            if B * L == 1 and w_DxV.dtype in HALF_DTYPES and kernels.platform == "cpu":
                # one row (decoding one sequence): XLA:CPU fuses this upcast into its matvec loop,
                # which then runs several times faster than a half-precision matvec, with the same
                # products
                x_BxLxD, w_DxV = x_BxLxD.astype(jnp.float32), w_DxV.astype(jnp.float32)
            # one 2-D matmul, as in Dense: from the 3-D einsum XLA:CPU made a transposed copy of
            # the [B*L, V] logits gradient for the weight gradient, doubling the head's time
            logits_MxV = matmul.matmul(kernels.impl, x_BxLxD.reshape(B * L, D), w_DxV,
                                       cfg.logits_dtype)
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
    """The functional face of the model: params are a plain pytree of fp32 arrays. Built for a host:
    `kernels` holds every host-dependent choice of cfg, resolved here once (kernels/choice.py)."""
    cfg: ModelConfig
    kernels: Kernels = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "kernels", choose(self.cfg))

    def module(self, deterministic: bool = True) -> Transformer:
        return Transformer(self.cfg, self.kernels, deterministic)

    def _boxed_init(self, rng):
        tokens = jnp.zeros((1, self.cfg.seq_len), jnp.int32)
        segments = jnp.ones_like(tokens)
        positions = positions_from_segments(segments)
        return self.module().init({"params": rng}, tokens, segments, positions)["params"]

    def init(self, rng: jax.Array) -> dict:
        if isinstance(rng, jax.core.Tracer):  # traced (eval_shape, inside a jit): that compiles it
            return nn.meta.unbox(self._boxed_init(rng))
        return self._compiled_init(rng)

    @functools.cached_property
    def _compiled_init(self):
        # One XLA program, not the init's ops dispatched one by one (each compiled on its first
        # use). On a CPU at XLA's backend optimization level 1, as train.Trainer.init_state: its
        # random draws are most of the compile, and the values are level 2's to the bit.
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
        layers = {f"block_{i}": jax.tree.map(lambda x, i=i: x[i], params["blocks"])
                  for i in range(self.cfg.n_layer)}
        return GPT(dataclasses.replace(self.cfg, scan_layers=False)), {**rest, **layers}

    def init_cache(self, batch: int, length: int | None = None) -> list[dict]:
        """An empty KV cache: per layer k and v of [batch, K, length (default seq_len), E] in the
        compute dtype (on XLA:CPU a half-precision one as uint16 bits: see cache.cache_dtype)."""
        cfg = self.cfg
        shape = (batch, cfg.n_kv_head, length or cfg.seq_len, cfg.head_dim)
        dtype = cache_dtype(cfg, self.kernels)
        return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                for _ in range(cfg.n_layer)]

    def apply(self, params, tokens_BxL, segment_ids_BxL=None, positions_BxL=None, *,
              dropout_rng=None, cache=None, logits=True):
        """Logits [B, L, V]; with a cache (see init_cache), (logits, new cache) with the new tokens'
        keys written at positions_BxL (absolute positions, contiguous within a row); without logits,
        what the output head would multiply: the normed [B, L, D] and the [D, V] fp32 weight.
        No segment ids: each row is one document without padding, and attention is causal alone."""
        if positions_BxL is None and segment_ids_BxL is not None:
            positions_BxL = positions_from_segments(segment_ids_BxL)
        elif positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1], dtype=jnp.int32),
                                             tokens_BxL.shape)
        deterministic = dropout_rng is None or self.cfg.dropout == 0
        rngs = {} if deterministic else {"dropout": dropout_rng}
        return self.module(deterministic).apply({"params": params}, tokens_BxL, segment_ids_BxL,
                                                positions_BxL, cache, logits, rngs=rngs)

    def loss(self, params, batch: dict, dropout_rng=None, *,
             segments: bool = True) -> tuple[jax.Array, jax.Array]:
        """(sum of masked token losses, number of masked tokens) for a batch dict of [B, L] arrays;
        with cfg.loss_chunks, by the fused head (kernels/head_loss.py), which never holds all the
        logits. segments=False: the caller knows each row is one document without padding (plain
        packed text, segment ids all ones), so attention is causal alone and reads no mask."""
        cfg = self.cfg
        mask_BxL = batch["loss_mask"].astype(jnp.float32)
        segment_ids_BxL = batch["segment_ids"] if segments else None
        if cfg.loss_chunks:
            x_BxLxD, w_DxV = self.apply(params, batch["inputs"], segment_ids_BxL,
                                        batch.get("positions"), dropout_rng=dropout_rng,
                                        logits=False)
            total = head_loss(self.kernels.impl, x_BxLxD, w_DxV, batch["targets"], mask_BxL,
                              cfg.loss_chunks, self.kernels.matmul_dtype, cfg.logit_softcap,
                              cfg.logits_dtype)
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
        n = self.num_params(params)
        if cfg.position == "learned":
            n -= cfg.seq_len * cfg.d_model
        if not cfg.tie_embeddings:
            n -= cfg.vocab_size * cfg.d_model
        return 6 * n + 12 * cfg.n_layer * cfg.d_model * cfg.seq_len

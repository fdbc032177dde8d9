"""Tests for jaxgpt.optim: schedules by hand, the weight-decay mask, clipping, Muon, grad
accumulation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt.config import ModelConfig, OptimConfig
from jaxgpt.model.gpt import GPT
from jaxgpt.train import optim
from jaxgpt.train.step import TrainState, make_train_step

PEAK, FLOOR, WARMUP, STEPS = 1e-3, 1e-4, 100, 2000


def lr_at(schedule_name, step, **kw):
    cfg = OptimConfig(lr=PEAK, min_lr=FLOOR, warmup_steps=WARMUP, schedule=schedule_name, **kw)
    return float(optim.schedule(cfg, STEPS)(step))


@pytest.mark.parametrize("name", ["constant", "cosine", "wsd"])
def test_linear_warmup(name):
    # nanoGPT's warmup: lr * (step + 1) / (warmup + 1), reaching the peak at step == warmup
    assert lr_at(name, 0) == pytest.approx(PEAK / 101, rel=1e-6)
    assert lr_at(name, 49) == pytest.approx(PEAK * 50 / 101, rel=1e-6)
    assert lr_at(name, 99) == pytest.approx(PEAK * 100 / 101, rel=1e-6)
    assert lr_at(name, 100) == pytest.approx(PEAK, rel=1e-6)


def test_cosine_values():
    # halfway: 5.5e-4
    assert lr_at("cosine", 1050) == pytest.approx(FLOOR + 0.5 * (PEAK - FLOOR), rel=1e-6)
    assert lr_at("cosine", 575) == pytest.approx(
        FLOOR + 0.5 * (1 + math.cos(math.pi / 4)) * (PEAK - FLOOR), rel=1e-6)
    assert lr_at("cosine", 1999) == pytest.approx(
        FLOOR + 0.5 * (1 + math.cos(math.pi * 1899 / 1900)) * (PEAK - FLOOR), rel=1e-6)
    assert lr_at("cosine", 2000) == pytest.approx(FLOOR, rel=1e-6)
    assert lr_at("cosine", 5000) == pytest.approx(FLOOR, rel=1e-6)  # past the end: the floor
    # decay_steps ends the decay early
    assert lr_at("cosine", 550, decay_steps=1000) == pytest.approx(5.5e-4, rel=1e-6)
    assert lr_at("cosine", 1500, decay_steps=1000) == pytest.approx(FLOOR, rel=1e-6)


def test_constant_values():
    assert [lr_at("constant", s) for s in (100, 1000, 1999, 3000)] == pytest.approx(
        [PEAK] * 4, rel=1e-6)


def test_wsd_values():
    # the last 20% of the 1900 post-warmup steps decay linearly: from step 1620 to 2000
    assert lr_at("wsd", 1000) == pytest.approx(PEAK, rel=1e-6)
    assert lr_at("wsd", 1620) == pytest.approx(PEAK, rel=1e-6)
    assert lr_at("wsd", 1810) == pytest.approx(5.5e-4, rel=1e-6)
    # fp32 cancellation
    assert lr_at("wsd", 1999) == pytest.approx(PEAK - 379 / 380 * (PEAK - FLOOR), rel=1e-5)
    assert lr_at("wsd", 2000) == pytest.approx(FLOOR, rel=1e-6)
    assert lr_at("wsd", 1810, wsd_decay_fraction=0.5) == pytest.approx(
        PEAK - 760 / 950 * (PEAK - FLOOR), rel=1e-6)


@pytest.mark.parametrize("name", ["constant", "cosine", "wsd"])
def test_schedule_stays_between_floor_and_peak(name):
    cfg = OptimConfig(lr=PEAK, min_lr=FLOOR, warmup_steps=WARMUP, schedule=name)
    lrs = np.asarray(jax.vmap(optim.schedule(cfg, STEPS))(jnp.arange(3000)))
    assert lrs.max() <= PEAK * (1 + 1e-6)
    assert lrs[WARMUP:].min() >= FLOOR * (1 - 1e-6)
    assert (np.diff(lrs[:WARMUP + 1]) > 0).all() and (np.diff(lrs[WARMUP:]) <= 1e-12).all()


def test_floor_never_exceeds_peak():
    # a peak below min_lr (Muon's own peak, or a tiny lr) decays to the peak itself, never up
    cfg = OptimConfig(lr=1e-5, min_lr=1e-4, warmup_steps=0, schedule="cosine")
    assert [float(optim.schedule(cfg, 100)(s)) for s in (0, 50, 99)] == pytest.approx(
        [1e-5] * 3, rel=1e-6)
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0, muon_lr=0.02)
    assert float(optim.schedule(cfg, 100, peak=0.02)(0)) == pytest.approx(0.02, rel=1e-6)
    assert float(optim.schedule(cfg, 100, peak=0.02)(100)) == pytest.approx(1e-4, rel=1e-6)


def tiny_model(preset="gpt2", **kw) -> GPT:
    base = dict(vocab_size=29, n_layer=2, n_head=2, d_model=16, seq_len=8)
    return GPT(ModelConfig(preset=preset, **{**base, **kw}).resolved())


def mask_by_path(params, cfg):
    mask = optim.decay_mask(params, cfg)
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}


@pytest.mark.parametrize("scan", [False, True])
def test_decay_mask_gpt2(scan):
    params = jax.eval_shape(tiny_model("gpt2", bias=True, scan_layers=scan).init, jax.random.key(0))
    mask = mask_by_path(params, OptimConfig())
    block = "['blocks']" if scan else "['block_0']"
    assert mask[f"{block}['attn']['wq']['w']"] and mask[f"{block}['mlp']['w_down']['w']"]
    assert not mask[f"{block}['attn']['wq']['b']"] and not mask[f"{block}['mlp']['w_up']['b']"]
    assert not mask[f"{block}['norm_attn']['scale']"] and not mask[f"{block}['norm_attn']['bias']"]
    assert not mask["['norm_out']['scale']"] and not mask["['wte']"] and not mask["['wpe']"]
    # exactly the matrices decay
    assert {k for k, v in mask.items() if v} == {k for k in mask if k.endswith("['w']")}
    with_embeddings = mask_by_path(params, OptimConfig(decay_embeddings=True))
    assert with_embeddings["['wte']"] and with_embeddings["['wpe']"]
    assert not with_embeddings[f"{block}['norm_mlp']['scale']"]


def test_decay_mask_llama_head():
    params = jax.eval_shape(tiny_model("llama", qk_norm=True).init, jax.random.key(0))
    mask = mask_by_path(params, OptimConfig())
    assert mask["['lm_head']"] and not mask["['wte']"]
    assert not mask["['block_1']['attn']['q_norm']['scale']"]
    assert ({k for k, v in mask.items() if v}
            == {k for k in mask if k.endswith("['w']")} | {"['lm_head']"})


def test_muon_dimension_numbers():
    model = tiny_model("llama", scan_layers=True)
    params = jax.eval_shape(model.init, jax.random.key(0))
    dims = optim.muon_dims(params, model.logical_axes)
    attn, mlp = dims["blocks"]["attn"], dims["blocks"]["mlp"]
    as_tuple = lambda d: (tuple(d.reduction_axis), tuple(d.output_axis))  # noqa: E731
    # axis 0 is "layers" (a batch axis);
    # w_up's unnamed axis 2 is the gate-up pair, another batch axis
    assert as_tuple(attn["wq"]["w"]) == ((1,), (2, 3))
    assert as_tuple(attn["wo"]["w"]) == ((1, 2), (3,))
    assert as_tuple(mlp["w_up"]["w"]) == ((1,), (3,))
    assert as_tuple(mlp["w_down"]["w"]) == ((1,), (2,))
    assert dims["wte"] is None and dims["lm_head"] is None and dims["norm_out"]["scale"] is None
    # every hidden matrix: each named axis is reduced or output, exactly once, and embed is one side
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    is_dims = lambda x: x is None or hasattr(x, "reduction_axis")  # noqa: E731
    axes = jax.tree_util.tree_leaves_with_path(model.logical_axes, is_leaf=is_spec)
    for (path, spec), d in zip(axes, jax.tree.leaves(dims, is_leaf=is_dims), strict=False):
        if jax.tree_util.keystr(path).endswith("['w']"):
            named = sorted(i for i, a in enumerate(spec) if a not in (None, "layers"))
            assert sorted(d.reduction_axis + d.output_axis) == named, path
            embed = tuple(i for i in named if spec[i] == "embed")
            assert embed in (tuple(d.reduction_axis), tuple(d.output_axis)), path
        else:
            assert d is None, path


def adam_updates(clip_norm, grads_seq):
    cfg = OptimConfig(lr=0.1, schedule="constant", warmup_steps=0, weight_decay=0.0,
                      clip_norm=clip_norm)
    params = {"w": jnp.zeros((3, 2))}
    opt = optim.build(cfg, 10, params)
    state, out = opt.init(params), []
    for g in grads_seq:
        updates, state = opt.update({"w": g}, state, params)
        out.append(np.asarray(updates["w"]))
    return out


def test_clipping_rescales_to_the_global_norm():
    """Adam ignores one global scale, so clipping shows in how step 2 weighs step 1's gradient."""
    rng = np.random.default_rng(0)
    g1 = jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)
    g1 = 100 * g1 / jnp.linalg.norm(g1)  # norm 100: clipped to 1
    g2 = jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)
    g2 = 0.5 * g2 / jnp.linalg.norm(g2)  # norm 0.5: untouched
    clipped = adam_updates(1.0, [g1, g2])
    by_hand = adam_updates(0.0, [g1 / 100, g2])
    unclipped = adam_updates(0.0, [g1, g2])
    np.testing.assert_allclose(clipped[1], by_hand[1], rtol=1e-5)
    assert not np.allclose(clipped[1], unclipped[1], rtol=1e-2)


def make_state(model, optimizer, seed=0):
    params = model.init(jax.random.key(seed))
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), jax.random.key(1),
                      jnp.zeros((), jnp.int32))


def random_batch(B, L, V, seed=0, mask=None):
    seq = np.random.default_rng(seed).integers(0, V, (B, L + 1))
    return {"inputs": jnp.asarray(seq[:, :-1], jnp.int32),
            "targets": jnp.asarray(seq[:, 1:], jnp.int32),
            "segment_ids": jnp.ones((B, L), jnp.int32),
            "loss_mask": (jnp.ones((B, L), jnp.float32) if mask is None
                          else jnp.asarray(mask, jnp.float32))}


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_muon_trains_a_tiny_model(preset):
    model = tiny_model(preset)
    cfg = OptimConfig(name="muon", lr=3e-3, muon_lr=0.02, warmup_steps=0, schedule="constant")
    params = jax.eval_shape(model.init, jax.random.key(0))
    optimizer = optim.build(cfg, 10, params, model.logical_axes)
    step = jax.jit(make_train_step(model, optimizer, 1))
    state, batch = make_state(model, optimizer), random_batch(4, 8, 29)
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses
    # Muon keeps momentum for exactly the hidden matrices ("w"); AdamW has the rest
    is_muon = lambda x: isinstance(x, optax.contrib.MuonState)  # noqa: E731
    (muon_state,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_muon) if is_muon(s)]
    momentum = {jax.tree_util.keystr(p)
                for p, _ in jax.tree_util.tree_leaves_with_path(muon_state.mu)}
    assert momentum == {jax.tree_util.keystr(p)
                        for p, _ in jax.tree_util.tree_leaves_with_path(state.params)
                        if jax.tree_util.keystr(p).endswith("['w']")}


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_grad_accumulation_matches_one_big_batch(preset):
    """grad_accum=2 over the same global batch: same loss and params as grad_accum=1 (sums over the
    whole batch divided once by its token count, so uneven masks between micro-batches are exact
    too)."""
    # No biases: the key bias has an exactly zero gradient (softmax ignores a per-row constant), so
    # its gradient is rounding noise that Adam would scale up to the size of the tolerance.
    model = tiny_model(preset, bias=False)
    cfg = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant")
    optimizer = optim.build(cfg, 10, jax.eval_shape(model.init, jax.random.key(0)))
    mask = np.ones((4, 8))
    mask[2:, 3:] = 0  # the second micro-batch scores far fewer tokens than the first
    batches = [random_batch(4, 8, 29, seed=s, mask=mask) for s in range(3)]
    results = {}
    for accum in (1, 2):
        step = jax.jit(make_train_step(model, optimizer, accum))
        state, losses = make_state(model, optimizer), []
        for batch in batches:
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
            assert float(metrics["tokens"]) == mask.sum()
        results[accum] = (losses, jax.device_get(state.params))
    np.testing.assert_allclose(results[2][0], results[1][0], atol=1e-6)
    for a, b in zip(jax.tree.leaves(results[2][1]), jax.tree.leaves(results[1][1]), strict=False):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_train_step_without_clipping_applies_adamw_exactly():
    """One step by hand: AdamW's first update is -lr * g / (|g| + eps) plus decoupled decay on
    matrices."""
    model = tiny_model("gpt2")
    cfg = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", clip_norm=0.0, weight_decay=0.1,
                      eps=1e-8)
    optimizer = optim.build(cfg, 10, jax.eval_shape(model.init, jax.random.key(0)))
    state, batch = make_state(model, optimizer), random_batch(2, 8, 29)
    before = jax.device_get(state.params)
    grads = jax.jit(jax.grad(lambda p: (lambda s, c: s / c)(*model.loss(p, batch))))(state.params)
    state, _ = jax.jit(make_train_step(model, optimizer, 1))(state, batch)
    g, w = np.asarray(grads["block_0"]["attn"]["wq"]["w"]), before["block_0"]["attn"]["wq"]["w"]
    expected = w - 1e-2 * (g / (np.abs(g) + 1e-8) + 0.1 * w)
    np.testing.assert_allclose(state.params["block_0"]["attn"]["wq"]["w"], expected, atol=1e-6)
    g, w = np.asarray(grads["wte"]), before["wte"]
    # no decay
    np.testing.assert_allclose(state.params["wte"], w - 1e-2 * g / (np.abs(g) + 1e-8), atol=1e-6)
    assert optax.tree.norm(grads) > 0


def test_all_masked_micro_batch_adds_nothing_and_all_masked_batch_is_no_update():
    """SFT batches can hold prompts only: a micro-batch without a trained token contributes zero
    (finite, never NaN), and a whole batch without one leaves params and optimizer state as they
    were."""
    model = tiny_model("gpt2", bias=False)
    cfg = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant")
    optimizer = optim.build(cfg, 10, jax.eval_shape(model.init, jax.random.key(0)))
    half_masked = np.ones((4, 8))
    half_masked[2:] = 0  # the second micro-batch has no trained token
    batch = random_batch(4, 8, 29, seed=0, mask=half_masked)
    first_half = {k: v[:2] for k, v in batch.items()}
    accum = jax.jit(make_train_step(model, optimizer, 2))(make_state(model, optimizer), batch)
    alone = jax.jit(make_train_step(model, optimizer, 1))(make_state(model, optimizer), first_half)
    assert np.isfinite(float(accum[1]["loss"]))
    np.testing.assert_allclose(float(accum[1]["loss"]), float(alone[1]["loss"]), atol=1e-6)
    for a, b in zip(jax.tree.leaves(accum[0].params), jax.tree.leaves(alone[0].params),
                    strict=False):
        np.testing.assert_allclose(a, b, atol=1e-6)

    empty = random_batch(4, 8, 29, seed=1, mask=np.zeros((4, 8)))
    state = make_state(model, optimizer)
    before = jax.device_get((state.params, state.opt_state))
    state, metrics = jax.jit(make_train_step(model, optimizer, 2))(state, empty)
    assert (float(metrics["loss"]) == 0.0 and float(metrics["tokens"]) == 0.0
            and int(metrics["skipped"]) == 0)
    after = jax.device_get((state.params, state.opt_state))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=False):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_embed_lr_scale_multiplies_the_embeddings_updates_only(name):
    model = tiny_model("gpt2")
    params = model.init(jax.random.key(0))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01) + 0.001 * p, params)
    updates = {}
    for scale in (1.0, 4.0):
        cfg = OptimConfig(name=name, lr=1e-3, muon_lr=0.02, warmup_steps=0, schedule="constant",
                          embed_lr_scale=scale)
        optimizer = optim.build(cfg, 10, params, model.logical_axes)
        updates[scale], _ = optimizer.update(grads, optimizer.init(params), params)
    for path, base in jax.tree_util.tree_leaves_with_path(updates[1.0]):
        scaled = dict(jax.tree_util.tree_leaves_with_path(updates[4.0]))[path]
        key = jax.tree_util.keystr(path)
        expected = 4.0 * base if key in ("['wte']", "['wpe']") else base
        np.testing.assert_array_equal(np.asarray(scaled), np.asarray(expected), err_msg=key)
        assert np.abs(np.asarray(base)).max() > 0, key

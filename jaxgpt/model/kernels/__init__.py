"""The model's hot spots, one implementation per backend, each a function whose first argument
names the implementation ("cpu" | "xla" | "cudnn", chosen once per host: choice.py):

    out_BxHxLxE = attention.attention(impl, q_BxHxLxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS)
    y = norm.normalize(impl, x, scale_D, bias_D, eps, center)
    y_MxN = matmul.matmul(impl, x_MxK, w_KxN)
    loss = head_loss.head_loss(impl, x_BxLxD, w_DxV, targets_BxL, weights_BxL, chunks, matmul_dtype)

"cpu": hand-written backward passes, each faster on XLA:CPU than autodiff's (the golden values
in tests/model/test_gpt.py are this path's numbers). "xla": plain jnp, differentiated by
autodiff, which leaves the compiler free to fuse (TPU, and a GPU in fp32); a few backward passes
are shaped by what XLA:GPU's own plan reads and writes (`bench compile bench.target=CARD`,
perf/aot.py). "cudnn": cuDNN's fused flash attention (a GPU in bf16/fp16), which never stores
the probabilities; norms and matmuls as "xla". Shapes in names as in model/gpt.py.
"""

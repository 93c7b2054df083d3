"""cuDNN fused attention against the einsum kernel; needs an NVIDIA GPU (run on the H200, see BUILD_NOTES)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crucible_jax.models.layers import MultiHeadAttention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs on NVIDIA GPUs only")


def test_cudnn_attention_matches_the_einsum_kernel_with_padding_and_empty_rows():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 96, 128)), jnp.bfloat16)
  lengths = np.array([96, 70, 1, 0])  # the last sample has no valid key: its rows must come out zero
  mask = jnp.asarray(np.arange(96)[None] < lengths[:, None])
  xla, cudnn = (MultiHeadAttention(4, dtype=jnp.bfloat16, kernel=k) for k in ("xla", "cudnn"))
  params = xla.init(jax.random.key(0), x, mask=mask)

  def loss(module, params, x):
    out = module.apply(params, x, mask=mask)
    return jnp.sum(out.astype(jnp.float32) ** 2), out

  (l_xla, out_xla), g_xla = jax.value_and_grad(lambda p: loss(xla, p, x), has_aux=True)(params)
  (l_cudnn, out_cudnn), g_cudnn = jax.value_and_grad(lambda p: loss(cudnn, p, x), has_aux=True)(params)
  out_xla, out_cudnn = np.asarray(out_xla, np.float32), np.asarray(out_cudnn, np.float32)
  np.testing.assert_allclose(out_cudnn, out_xla, atol=3e-2, rtol=3e-2)
  assert np.all(np.isfinite(out_cudnn)) and float(l_cudnn) == pytest.approx(float(l_xla), rel=1e-2)
  np.testing.assert_array_equal(out_cudnn[3], np.broadcast_to(out_cudnn[3, :1], out_cudnn[3].shape))  # bias only
  for a, b in zip(jax.tree.leaves(g_cudnn), jax.tree.leaves(g_xla)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, atol=5e-2 * float(np.abs(b).max()) + 1e-3, rtol=5e-2)

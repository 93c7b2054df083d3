"""Test setup: 8 simulated CPU devices before JAX initialises."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# No persistent compilation cache: with it, the resumed run in test_train aborted inside XLA under pytest-xdist
# (never serially); it is not proven safe here, so every process compiles for itself.

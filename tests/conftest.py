"""Test setup: 8 simulated CPU devices before JAX initialises, and a per-session compilation cache."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Identical programs (the resumed run recompiles the uninterrupted run's steps) are compiled once per session.
# Safe by test: test_train's resume check asserts bitwise-equal params between cached and fresh compilations.
jax.config.update("jax_compilation_cache_dir", os.environ.get("CRUCIBLE_TEST_JAX_CACHE",
                                                              tempfile.mkdtemp(prefix="crucible_jax_cache_")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

"""Test setup: 8 simulated CPU devices before JAX initialises."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# No persistent compilation cache: with it, the resumed run in test_train aborted inside XLA under pytest-xdist
# (never serially); it is not proven safe here, so every process compiles for itself.

# The slowest modules first: with `--dist loadscope --no-loadscope-reorder` each worker starts on one at once, rather
# than one worker picking up test_train.py (~10 CPU minutes) last while the other sits idle.
SLOWEST_MODULES = ("test_train.py", "test_notebook.py", "test_distributed.py", "test_cli.py", "test_precision_train.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_MODULES)))

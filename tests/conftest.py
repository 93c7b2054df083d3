"""Test setup: 8 simulated CPU devices before JAX initialises."""

import os

import pytest

# Compile fast, not run fast: the suite's tiny programs run a few steps each, so XLA:CPU's compile (LLVM at O2 with
# the fusion emitters: ~100 s of a tiny three-stage run's 150) dominates it. Subprocesses (CLI, notebook kernel)
# inherit these, and they win over the per-program CPU options of crucible_jax/train/step.py that production uses.
TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
                  "--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join((*TEST_XLA_FLAGS, os.environ.get("XLA_FLAGS", "")))  # XLA: a later flag wins
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# No persistent compilation cache: with it, the resumed run in test_train aborted inside XLA under pytest-xdist
# (never serially); it is not proven safe here, so every process compiles for itself.

# The slowest modules first: with `--dist loadscope --no-loadscope-reorder` each worker starts on one at once, rather
# than one worker picking up test_train.py (~10 CPU minutes) last while the other sits idle.
SLOWEST_MODULES = ("test_train.py", "test_notebook.py", "test_distributed.py", "test_cli.py", "test_precision_train.py",
                   "test_own_data.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_MODULES)))


@pytest.fixture(scope="session")
def own_collection(tmp_path_factory) -> dict[str, str]:
  """A 300-record own-data collection (digit PNGs, spoken-digit WAVs, captions): manifest, csv and shards paths."""
  from crucible_jax.data.own.demo import write_demo_collection  # pylint: disable=g-import-not-at-top
  return write_demo_collection(tmp_path_factory.mktemp("own_collection"), count=300)

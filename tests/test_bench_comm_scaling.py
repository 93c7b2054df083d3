"""Communication and memory figures of `crucible bench comm|scaling` on small configs (compiled, never timed)."""

import pathlib

import jax
import pytest

from crucible_jax.bench import comm, scaling
from crucible_jax.config import load_experiment

DIGIT_WORLD = str(pathlib.Path(__file__).parent.parent / "experiments" / "digit_world.py")
IMAGE_ONLY = ["--config.model.modalities=('image',)", "--config.stages.unimodal.objective={'pretrain/image': 1.0}",
              "--config.evals={}", "--config.stage_order=('unimodal',)"]

HLO = """
  %ar = f32[1000]{0} all-reduce(%a), channel_id=1, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, metadata={op_name="jit(f)/transpose(jvp(M))/dot"}
  %ag = s8[64,8]{1,0} all-gather(%b), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, metadata={op_name="jit(f)/shard_map/all_gather"}
  %x = (f32[4,10]{1,0}, f32[4,10]{1,0}) all-to-all(%c, %d), replica_groups=[4,2]<=[8], metadata={op_name="jit(f)/jvp(M)/fft"}
  %s = f32[16]{0} all-gather-start(%e), replica_groups=[1,8]<=[8], metadata={op_name="jit(f)/jvp(M)/gather"}
  %d2 = f32[16]{0} all-gather-done(%s)
"""


def test_parse_collectives_reads_sizes_groups_and_async_pairs():
  ops = comm.parse_collectives(HLO, num_devices=8)
  assert [(c.op, c.result_bytes, c.group_size) for c in ops] == [
      ("all-reduce", 4000, 4), ("all-gather", 512, 8), ("all-to-all", 320, 2), ("all-gather", 64, 8)]
  assert [c.is_activation for c in ops] == [False, False, True, True]
  t = comm.traffic(HLO, num_devices=8)
  assert t["gradient_bytes"] == pytest.approx(2 * 3 / 4 * 4000 + 7 / 8 * 512)
  assert t["activation_bytes"] == pytest.approx(1 / 2 * 320 + 7 / 8 * 64)
  assert t["async_start_done_pairs"] == 1


# Image-only :tiny at width 64 with the conv stem frozen: the stage trains some params, freezes some (the stem) and
# never reads the rest (other modalities' encoders, heads), so every exclusion shows in the bytes.
FROZEN_STEM = IMAGE_ONLY + ["--config.stages.unimodal.frozen=('^encoders_image/stem',)",
                            "--config.model.image.width=64", "--config.model.image.mlp=256"]


@pytest.fixture(scope="module")
def comm_report():
  return comm.run(load_experiment(f"{DIGIT_WORLD}:tiny", FROZEN_STEM), steps=0, stages=("unimodal",))


def test_compressed_methods_meet_their_byte_goals_against_the_same_stage_uncompressed(comm_report):
  stage = comm_report["stages"]["unimodal"]
  methods = stage["methods"]
  assert 0 < stage["trained_params"] < 0.5 * stage["params"]
  for method, goal in comm.GOALS.items():
    assert methods[method]["bytes_ratio_vs_none"] >= goal, (method, methods[method]["bytes_ratio_vs_none"])
  assert methods["none"]["gradient_dtypes"] == ["f32"]
  assert "u16" in methods["bf16"]["gradient_dtypes"] and "s8" in methods["int8"]["gradient_dtypes"]
  assert {"u16", "s8"} <= set(methods["powersgd"]["gradient_dtypes"])  # low-rank factors in bf16, the rest int8
  assert methods["powersgd"]["bytes_ratio_vs_trained_f32_allreduce"] >= comm.GOALS["powersgd"]
  # the uncompressed program reduces every trained gradient in float32: at least 4 bytes per trained param
  assert methods["none"]["gradient_bytes"] >= 2 * 7 / 8 * 4 * stage["trained_params"]
  assert comm_report["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert comm_report["backend_bf16_collectives"]["all_gather(bf16 bits as uint16)"]["wire_dtype"] == "u16"


def test_fsdp_shards_params_and_optimizer_state_over_8_devices():
  config = load_experiment(f"{DIGIT_WORLD}:tiny", IMAGE_ONLY + ["--config.model.image.width=64",
                                                                "--config.model.image.mlp=256"])
  _, replicated, _ = scaling.layout_setup(config, "dp", 1)
  full = scaling.state_bytes(replicated)
  measured = scaling.measure(config, "fsdp", 8)
  fraction = (measured["params_bytes"] + measured["opt_state_bytes"]) / (full["params_bytes"] + full["opt_state_bytes"])
  assert fraction <= 1 / 8 + 0.1, fraction
  assert measured["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  # The compiled program's arguments (state + batch shard) are per device too, not the replicated state.
  assert measured["memory_analysis"]["argument"] < 0.5 * (full["params_bytes"] + full["opt_state_bytes"])
  assert measured["comm"]["wire_bytes_by_op"].get("all-gather", 0) > 0  # params are gathered for compute


def test_projection_is_labelled_and_degrades_with_slower_links():
  p = scaling.project(num_params=100_000_000, flops_per_step=6 * 100_000_000 * 64 * 256)
  slow, fast = p["by_inter_node_bandwidth"]["25GB/s"], p["by_inter_node_bandwidth"]["50GB/s"]
  assert slow["8"] == fast["8"]  # one node: NVLink only
  assert slow["32"]["efficiency_no_overlap"] < fast["32"]["efficiency_no_overlap"] < fast["8"]["efficiency_no_overlap"]
  assert all(0 < r["efficiency_no_overlap"] <= r["efficiency_full_overlap"] <= 1 for r in slow.values())
  assert slow["16"]["claimed"] == 0.89


def test_per_method_projection_follows_the_measured_ratios():
  p = scaling.project_methods(4e8, 6 * 100_000_000 * 64 * 256, {"none": 1.0, "int8": 3.9})
  nvlink, ethernet = "nvlink_300GB/s", "ethernet_100Gb/s_per_host"
  assert p["none"]["gradient_bytes"] == 4e8  # the measured uncompressed all-reduce payload, as given
  assert p["int8"]["gradient_bytes"] == pytest.approx(4e8 / 3.9)
  for method in ("none", "int8"):
    assert p[method][nvlink]["8"] == p[method][ethernet]["8"]  # one node: NVLink only
    assert p[method][ethernet]["32"] < p[method][nvlink]["32"]
  for n in ("8", "16", "32"):
    assert p["none"][ethernet][n] < p["int8"][ethernet][n] <= 1

"""LoRA and fine-tuning a converted CLIP, the user's path: `crucible convert` of a random-weight open_clip model,
`crucible train` of own data from it with adapters on an 8-device FSDP mesh, then `crucible embed --workdir`."""

import json

import flax.traverse_util
import jax
import numpy as np
import pytest

from crucible_jax import inference, load_experiment
from crucible_jax.cli import main
from crucible_jax.config import ConfigError
from crucible_jax.interop.preprocess import load_image
from crucible_jax.interop.tokenizers import from_spec
from crucible_jax.models import lora
from crucible_jax.train.loop import Trainer
from test_grad_cache import OWN_DATA, write_manifest
from test_interop import save_safetensors, tiny_open_clip

LORA = "--config.stages.align.lora={'towers': ('image', 'text'), 'rank': 4, 'alpha': 8}"
FSDP = ["--config.mesh={'data': 1, 'fsdp': 8, 'tensor': 1}", "--config.sharding.layout=fsdp"]
TEXTS = ["a photo of thing number 3", "something else entirely"]


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(tree, sep="/")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(converted params dir, its params, manifest, workdir, the run's experiment, its final params with adapters)."""
  tmp = tmp_path_factory.mktemp("lora")
  save_safetensors(tiny_open_clip(), tmp / "model.safetensors")
  assert main(["convert", "--from", "open_clip", "--checkpoint", str(tmp / "model.safetensors"),
               "--out", str(tmp / "clip")]) == 0
  manifest = write_manifest(tmp)
  config = load_experiment(f"{OWN_DATA}:tiny", [
      f"--config.data.manifest={manifest}", f"--config.init_from={tmp / 'clip'}", LORA, *FSDP,
      "--config.stages.align.steps=2", "--config.stages.align.warmup=0", "--config.eval_splits=()"])
  trainer = Trainer(config, tmp / "run")
  try:
    trainer.run()
    final = jax.device_get(trainer.restore_final_params())
  finally:
    trainer.close()
  base = jax.device_get(inference.load(tmp / "clip").params)
  return tmp / "clip", base, manifest, tmp / "run", trainer.experiment, final


def test_the_run_takes_the_checkpoints_towers_tokenizer_and_preprocessing(run):
  clip_dir, _, _, workdir, experiment, _ = run
  config = experiment.config
  assert config.model.text.pool == "eot" and config.model.image.cls_token and config.loss_kind == "clip"
  assert config.data.tokenizer.kind == "clip_bpe" and tuple(config.data.image_size) == (32, 32)
  assert tuple(config.data.image_std) == tuple(config.pretrained.preprocess.std)
  spec = from_spec(config.pretrained.tokenizer, workdir)  # an absolute file: the workdir embeds like the checkpoint
  assert spec.encode(TEXTS).tolist() == from_spec(inference.read_config(clip_dir).pretrained.tokenizer,
                                                  clip_dir).encode(TEXTS).tolist()
  report = json.loads((workdir / "init_from_report.json").read_text())
  assert not (report["missing"] or report["unexpected"] or report["mismatched"])
  assert not any("lora_" in k for k in report["loaded"])


def test_only_the_adapters_train_and_they_are_sharded_by_the_rules(run):
  _, base, _, _, experiment, final = run
  base_flat, final_flat = _flat(base), _flat(final)
  adapters = {k: v for k, v in final_flat.items() if k.endswith(lora.ADAPTERS)}
  assert len(adapters) == 2 * 2 * 4 * 2  # towers x blocks x (qkv, out, fc1, fc2) x (lora_a, lora_b)
  assert all(np.any(v != 0) for k, v in adapters.items() if k.endswith("lora_b"))  # B starts at 0 and moved
  towers = [k for k in base_flat if k.startswith(("encoders_image/", "encoders_text/"))]
  assert towers and all(np.array_equal(final_flat[k], base_flat[k]) for k in towers)  # bit-identical base
  assert not np.array_equal(final_flat["projections_image/proj/kernel"], base_flat["projections_image/proj/kernel"])
  shardings = _flat(experiment.param_shardings)
  fc1 = "encoders_image/encoder/transformer/block_0/mlp/fc1"
  assert shardings[f"{fc1}/lora_a"].spec == jax.sharding.PartitionSpec("fsdp", None)  # (embed, lora_rank)
  assert shardings[f"{fc1}/lora_b"].spec == jax.sharding.PartitionSpec(None, "fsdp")  # (lora_rank, mlp)


def test_adapters_start_as_the_base_model(run):
  clip_dir, base, _, _, experiment, _ = run
  fresh = _flat(jax.device_get(experiment.init_params(jax.random.key(3))))
  params = flax.traverse_util.unflatten_dict({**fresh, **_flat(base)}, sep="/")  # base weights, fresh adapters
  adapted = inference.InferenceModel(experiment.config, experiment, params)
  plain = inference.load(clip_dir)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
  ids = from_spec(plain.config.pretrained.tokenizer, clip_dir).encode(TEXTS * 4)
  for modality, inputs in (("image", {"image": images}), ("text", {"text": ids})):
    np.testing.assert_allclose(adapted.embed(modality, inputs), plain.embed(modality, inputs), atol=1e-6)


def test_embed_reads_the_merged_model_and_equals_the_adapter_model(run, tmp_path):
  _, _, manifest, workdir, experiment, final = run
  images = [str(manifest.parent / "img" / f"{i}.png") for i in range(8)]
  out = tmp_path / "e.json"
  assert main(["embed", "--workdir", str(workdir), "--images", *images, "--texts", *TEXTS * 4,
               "--json", str(out)]) == 0
  got = json.loads(out.read_text())
  merged = inference.load(workdir)
  assert not any("lora_" in k for k in _flat(merged.params)) and not merged.experiment.adapters
  assert "lora" not in merged.config.stages.align
  adapted = inference.InferenceModel(experiment.config, experiment, final)
  pretrained = experiment.config.pretrained
  pixels = np.stack([load_image(p, pretrained.preprocess) for p in images])
  ids = from_spec(pretrained.tokenizer, workdir).encode(TEXTS * 4)
  np.testing.assert_allclose(got["image"], adapted.embed("image", {"image": pixels}), atol=1e-5)
  np.testing.assert_allclose(got["text"], adapted.embed("text", {"text": ids}), atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("--config.stages.align.lora={'towers': ('image',), 'rank': 0}", "lora.rank=0 must be an integer >= 1"),
    ("--config.stages.align.lora={'towers': ('video',), 'rank': 2}", r"name \['video'\], not in model.modalities"),
    ("--config.stages.align.lora={'towers': ('image',), 'rank': 2, 'dropout': 0.1}", r"unknown fields \['dropout'\]"),
])
def test_bad_lora_is_a_config_error(run, override, message):
  with pytest.raises(ConfigError, match=message):
    load_experiment(f"{OWN_DATA}:tiny", [f"--config.data.manifest={run[2]}", override])


def test_clip_bpe_text_with_a_padding_mask_is_a_config_error(run):
  """CLIP's id 0 is the token '!': a padding mask would hide it."""
  adopted = load_experiment(f"{OWN_DATA}:tiny", [f"--config.data.manifest={run[2]}", f"--config.init_from={run[0]}"])
  tokenizer = adopted.data.tokenizer
  with pytest.raises(ConfigError, match="clip_bpe.*model.text.mask='padding'"):
    load_experiment(f"{OWN_DATA}:tiny", [f"--config.data.manifest={run[2]}", "--config.data.tokenizer.kind=clip_bpe",
                                         f"--config.data.tokenizer.path={tokenizer.path}"])

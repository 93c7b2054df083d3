"""`crucible export`: each encoder, the fusion and the heads as separate `jax.export` artifacts with a manifest.

Beside them: `manifest.json` and `config.json` (the model's resolved config, which indexing a data source reads).
Every artifact takes `(params, inputs)`: params a flat dict ("a/b/c" keys, saved beside it as .npz), inputs a dict
of arrays whose leading (batch) dimension is symbolic. Encoders return the normalised joint embedding, the pooled
features the fusion reads and their tokens (with the token mask); `fusion` maps pooled features and presence flags
to the fused vector and its weights; heads map those to logits: `head_fused`, `head_tagging` (pooled audio),
`head_asr` (audio tokens: CTC logits per token), `head_vqa` (question tokens + image tokens). A routed model also gets
`router`: its importance estimator's scores per sample for the `router_modalities` the manifest names.
`serve.artifact` runs them with jax and numpy alone.
"""

import argparse
import json
import pathlib
import sys
from typing import Any, Callable

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from crucible_jax.common_types import AUDIO, IMAGE, MODALITIES, TEXT, present_key
from crucible_jax.data.schema import BATCH_SCHEMA, example_batch
from crucible_jax.inference import CONFIG_FILE, InferenceModel, load
from crucible_jax.models.router import ImportanceEstimator
from crucible_jax.serve.artifact import FORMAT_VERSION, MANIFEST

SHARED_PARAMS = ("logit_scale", "logit_bias")  # created in the model's setup: every apply needs them
PREPROCESSING_KEYS = ("image_size", "channels", "video_frames", "video_size", "sample_rate", "audio_seconds",
                      "text_len")


def input_keys(modality: str) -> tuple[str, ...]:
  """Batch keys an encoder reads: the modality's own key and its length key when the schema has one."""
  return tuple(k for k in (modality, f"{modality}_len") if k in BATCH_SCHEMA)


def _flat(params: Any, prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
  """The params under top-level `prefixes` (and the shared scalars), flattened to "a/b/c" numpy arrays."""
  chosen = {k: v for k, v in params.items() if k in prefixes or k in SHARED_PARAMS}
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(chosen, sep="/").items()}


def _encoder(model: InferenceModel, modality: str) -> tuple[Callable, dict[str, np.ndarray]]:
  """(fn(params, inputs) -> {embedding, pooled, tokens, token_mask}, its params) for one modality."""

  def apply(module, inputs):
    tokens, mask = module.encode(inputs, False, (modality,), None, route=False)[modality]
    pooled = module.pools[modality](tokens, mask).reshape(tokens.shape[0], -1)
    joint = module.projections[modality](pooled)
    joint = joint / jnp.maximum(jnp.linalg.norm(joint, axis=-1, keepdims=True), 1e-12)
    return {"embedding": joint, "pooled": pooled, "tokens": tokens, "token_mask": mask}

  return _bind(model, apply), _flat(model.params, tuple(f"{p}_{modality}" for p in ("encoders", "pools",
                                                                                      "projections")))


def _bind(model: InferenceModel, apply: Callable) -> Callable:
  def fn(params: dict[str, jax.Array], inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    tree = flax.traverse_util.unflatten_dict(params, sep="/")
    return model.experiment.model.apply({"params": tree}, inputs, method=apply)
  return fn


def _fusion(model: InferenceModel) -> tuple[Callable, dict[str, np.ndarray]]:
  def apply(module, inputs):
    features = {m: inputs[f"pooled_{m}"] for m in module.config.modalities}
    present = {m: inputs[present_key(m)] for m in module.config.modalities}
    fused, weights = module.fusion(features, present)
    return {"fused": fused, "fusion_weights": weights}
  return _bind(model, apply), _flat(model.params, ("fusion",))


def _head(model: InferenceModel, name: str, reads: str) -> tuple[Callable, dict[str, np.ndarray]]:
  def apply(module, inputs):
    return {"logits": getattr(module, name)(inputs[reads])}
  return _bind(model, apply), _flat(model.params, (name,))


def _vqa(model: InferenceModel) -> tuple[Callable, dict[str, np.ndarray]]:
  """Answer logits from the question tokens and the image encoder's tokens (the text tower reads the question)."""
  def apply(module, inputs):
    return {"logits": module.answer(inputs["question"], (inputs[f"tokens_{IMAGE}"], inputs[f"token_mask_{IMAGE}"]))}
  reads = (f"encoders_{TEXT}", f"pools_{IMAGE}", *(k for k in model.params if k.startswith("vqa_")))
  return _bind(model, apply), _flat(model.params, reads)


def _router(model: InferenceModel) -> tuple[Callable, dict[str, np.ndarray], tuple[str, ...]]:
  """(fn(params, inputs) -> {scores [b, M]}, its params, the M scored modalities): the router's importance estimator."""
  router = model.experiment.model.config.routing.router()
  scored = tuple(m for m in MODALITIES if m in router.capacity_fraction)
  estimator = ImportanceEstimator(scored, width=router.width, grid=router.grid, audio_bins=router.audio_bins)

  def fn(params: dict[str, jax.Array], inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    present = jnp.stack([inputs[present_key(m)] for m in scored], axis=1)
    tree = flax.traverse_util.unflatten_dict(params, sep="/")
    return {"scores": estimator.apply({"params": tree}, inputs, present)}

  params = {k: np.asarray(v) for k, v in
            flax.traverse_util.flatten_dict(model.params["router"]["estimator"], sep="/").items()}
  return fn, params, scored


def _spec(shape: tuple[int, ...], dtype: Any, batch: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch, *shape), dtype)


def _tokens_spec(artifacts: dict[str, Any], modality: str, batch: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """Inputs `tokens_<m>` and `token_mask_<m>`, as the modality's encoder artifact outputs them."""
  outputs = artifacts[f"encoder_{modality}"]["outputs"]
  return {f"{k}_{modality}": _spec(tuple(outputs[k]["shape"][1:]), outputs[k]["dtype"], batch)
          for k in ("tokens", "token_mask")}


def _describe(tree: dict[str, Any]) -> dict[str, dict[str, Any]]:
  return {k: {"shape": [None, *v.shape[1:]], "dtype": np.dtype(v.dtype).name} for k, v in tree.items()}


def _export_one(out: pathlib.Path, name: str, fn: Callable, params: dict[str, np.ndarray],
                inputs: dict[str, jax.ShapeDtypeStruct], platforms: tuple[str, ...]) -> dict[str, Any]:
  """Serialize `fn` for symbolic batch inputs, save its params; the manifest entry."""
  param_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()}
  exported = jax.export.export(jax.jit(fn), platforms=platforms)(param_specs, inputs)
  (out / f"{name}.jax").write_bytes(exported.serialize())
  np.savez(out / f"{name}.npz", **params)
  outputs = jax.tree.unflatten(exported.out_tree, exported.out_avals)
  return {"file": f"{name}.jax", "params": f"{name}.npz", "inputs": _describe(inputs), "outputs": _describe(outputs)}


def preprocessing(config: Any) -> dict[str, Any]:
  """What an input must look like before an encoder sees it (the manifest's `preprocessing`)."""
  data = {k: config.data.get(k) for k in PREPROCESSING_KEYS}
  pixels = {"channels": int(data["channels"] or 1), "range": [0.0, 1.0], "crop": "centre",
            "mean": list(config.data.get("image_mean") or (0.0,)), "std": list(config.data.get("image_std") or (1.0,))}
  return {
      "image": {"size": list(data["image_size"]), **pixels},
      "video": {"frames": data["video_frames"], "size": list(data["video_size"]), **pixels},
      "audio": {"sample_rate": int(data["sample_rate"]), "samples": int(round(data["audio_seconds"] * data["sample_rate"])),
                "mono": True, "range": [-1.0, 1.0]},
      "text": {"tokenizer": dict(config.data.get("tokenizer") or {"kind": "byte", "path": None}),
               "max_len": int(data["text_len"]), "pad": 0},
  }


def export_model(model: InferenceModel, out: str | pathlib.Path, platforms: tuple[str, ...] = ("cpu",)) -> pathlib.Path:
  """Write every artifact of `model` and `manifest.json` to `out` (new or empty); returns it."""
  out = pathlib.Path(out)
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"{out} exists and is not empty; choose a new --out directory")
  out.mkdir(parents=True, exist_ok=True)
  batch = jax.export.symbolic_shape("b")[0]
  example = example_batch(model.config.data, 1)
  artifacts, pooled = {}, {}
  for m in model.modalities:
    fn, params = _encoder(model, m)
    inputs = {k: _spec(example[k].shape[1:], example[k].dtype, batch) for k in input_keys(m)}
    artifacts[f"encoder_{m}"] = entry = _export_one(out, f"encoder_{m}", fn, params, inputs, platforms)
    pooled[m] = entry["outputs"]["pooled"]["shape"][1:]
  fusion_inputs = {f"pooled_{m}": _spec(tuple(pooled[m]), jnp.float32, batch) for m in model.modalities}
  fusion_inputs.update({present_key(m): _spec((), jnp.bool_, batch) for m in model.modalities})
  fn, params = _fusion(model)
  artifacts["fusion"] = entry = _export_one(out, "fusion", fn, params, fusion_inputs, platforms)
  fused_width = tuple(entry["outputs"]["fused"]["shape"][1:])
  heads = {"head_fused": ("fused_head", "fused", fused_width)}
  if "tag_head" in model.params:
    heads["head_tagging"] = ("tag_head", f"pooled_{AUDIO}", tuple(pooled[AUDIO]))
  for name, (attr, reads, width) in heads.items():
    fn, params = _head(model, attr, reads)
    artifacts[name] = _export_one(out, name, fn, params, {reads: _spec(width, jnp.float32, batch)}, platforms)
  if "ctc_head" in model.params:  # ASR: CTC logits per audio token (the encoder's token_mask marks the real ones)
    fn, params = _head(model, "ctc_head", f"tokens_{AUDIO}")
    artifacts["head_asr"] = _export_one(out, "head_asr", fn, params, _tokens_spec(artifacts, AUDIO, batch), platforms)
  if "vqa_head" in model.params:
    fn, params = _vqa(model)
    inputs = {"question": _spec(example["question"].shape[1:], example["question"].dtype, batch),
              **_tokens_spec(artifacts, IMAGE, batch)}
    artifacts["head_vqa"] = _export_one(out, "head_vqa", fn, params, inputs, platforms)
  router = None
  if "router" in model.params:
    fn, params, router = _router(model)
    inputs = {k: _spec(example[k].shape[1:], example[k].dtype, batch) for m in router for k in input_keys(m)}
    inputs.update({present_key(m): _spec((), jnp.bool_, batch) for m in router})
    artifacts["router"] = _export_one(out, "router", fn, params, inputs, platforms)
  manifest = {"format": FORMAT_VERSION, "jax_version": jax.__version__, "platforms": list(platforms),
              "modalities": list(model.modalities), "joint_dim": int(model.config.model.joint_dim),
              "max_digits": int(model.config.data.max_digits), "preprocessing": preprocessing(model.config),
              "router_modalities": list(router) if router else None, "artifacts": artifacts}
  (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
  (out / CONFIG_FILE).write_text(model.config.to_json_best_effort(indent=2, sort_keys=True))  # for data sources
  return out


def run(args: argparse.Namespace, config: Any) -> int:
  """`crucible export`: 0 on success, 1 when the workdir or output is unusable."""
  try:
    model = load(args.workdir)
    out = export_model(model, args.out, tuple(p.strip() for p in args.platforms.split(",") if p.strip()))
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"crucible: error: {e}", file=sys.stderr)
    return 1
  print(f"exported {', '.join(json.loads((out / MANIFEST).read_text())['artifacts'])} to {out}")
  return 0

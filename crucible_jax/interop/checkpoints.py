"""Checkpoint files → flat {name: float32 numpy array}: safetensors and npz with numpy alone, .pt/.bin via torch."""

import pathlib
import zipfile

import jax
import numpy as np

StateDict = dict[str, np.ndarray]
WRAPPERS = ("state_dict", "model")  # keys a training checkpoint nests its weights under
PREFIXES = ("module.", "_orig_mod.")  # DataParallel / torch.compile prefixes


def _from_torch(path: pathlib.Path) -> tuple[StateDict, bool]:
  """(weights, is an OpenAI TorchScript archive) of a torch file."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional: only .pt/.bin need it)
  except ImportError as e:
    raise ValueError(f"{path}: reading a PyTorch file needs torch (pip install torch), or convert it to "
                     f".safetensors") from e
  jit = _is_torchscript(path)
  if jit:
    state = torch.jit.load(str(path), map_location="cpu").state_dict()
  else:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
  for key in WRAPPERS:
    if isinstance(state, dict) and isinstance(state.get(key), dict):
      state = state[key]
  if not isinstance(state, dict):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
  return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}, jit


def _is_torchscript(path: pathlib.Path) -> bool:
  """A TorchScript archive (OpenAI's CLIP releases) holds constants.pkl; a torch.save zip does not."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any(n.endswith("/constants.pkl") for n in archive.namelist())


def _from_safetensors(path: pathlib.Path) -> StateDict:
  """numpy arrays of a .safetensors file; bfloat16 (no numpy dtype) goes through JAX on the CPU."""
  import safetensors  # pylint: disable=g-import-not-at-top
  from safetensors import flax as st_flax, numpy as st_numpy  # pylint: disable=g-import-not-at-top
  try:
    return st_numpy.load_file(str(path))
  except TypeError:  # "data type 'bfloat16' not understood"
    with jax.default_device(jax.devices("cpu")[0]):
      return {k: np.asarray(v, np.float32) for k, v in st_flax.load_file(str(path)).items()}
  except (safetensors.SafetensorError, ValueError, OSError) as e:
    raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def read_state_dict(path: str | pathlib.Path) -> tuple[StateDict, bool]:
  """(float32 weights by name with wrapper prefixes stripped, whether it is an OpenAI TorchScript archive)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint not found: {path}")
  jit = False
  if path.suffix == ".safetensors":
    state = _from_safetensors(path)
  elif path.suffix == ".npz":
    with np.load(path) as npz:
      state = dict(npz)
  elif path.suffix in (".pt", ".pth", ".bin"):
    state, jit = _from_torch(path)
  else:
    raise ValueError(f"{path}: unknown checkpoint format {path.suffix!r}; expected .safetensors, .npz, .pt or .bin")
  out = {}
  for key, value in state.items():
    for prefix in PREFIXES:
      key = key.removeprefix(prefix)
    out[key] = np.asarray(value, np.float32)
  return out, jit

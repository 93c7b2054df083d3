"""A small real collection in the own-data layouts: scikit-learn's handwritten digits as PNGs, the bundled spoken
digits as WAVs, and captions — one folder with a JSONL manifest, a CSV manifest and WebDataset tar shards.

For trying the own-data path (the quickstart notebook) and for its tests; nothing is downloaded.
"""

import csv
import io
import json
import os
import pathlib
import tarfile

import numpy as np
from PIL import Image
from sklearn import datasets

from crucible_jax.data.digit_world.draw import ASSET_DIR, SPEAKERS

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STYLES = ("a handwritten {w}", "the digit {w}, written by hand", "{w} in pen", "a scanned {w}")


def _png(pixels: np.ndarray, size: int) -> bytes:
  img = Image.fromarray(np.uint8(np.clip(pixels * 255.0 / 16.0, 0, 255))).resize((size, size), Image.BILINEAR)
  out = io.BytesIO()
  img.save(out, format="PNG")
  return out.getvalue()


def write_demo_collection(root: str | os.PathLike, count: int = 300, *, audio: bool = True,
                          shard_size: int = 100, image_px: int = 32) -> dict[str, str]:
  """Write `count` records under `root`; returns {"manifest": .jsonl, "csv": .csv, "shards": 'shards/*.tar'}."""
  root = pathlib.Path(root)
  (root / "images").mkdir(parents=True, exist_ok=True)
  (root / "shards").mkdir(exist_ok=True)
  (root / "audio").mkdir(exist_ok=True)
  digits = datasets.load_digits()
  rows = []
  for i in range(count):
    label = int(digits.target[i])
    png = _png(digits.images[i], image_px)
    (root / "images" / f"{i:05d}.png").write_bytes(png)
    row = {"image": f"images/{i:05d}.png",
           "text": [s.format(w=WORDS[label]) for s in STYLES[i % 2::2]]}  # two captions per record
    if audio:  # two voices; records of one digit and voice share the recording
      row["audio"] = f"audio/{SPEAKERS[i % 2]}_{label}.wav"
      if not (root / row["audio"]).exists():
        (root / row["audio"]).write_bytes((ASSET_DIR / SPEAKERS[i % 2] / f"{label}.wav").read_bytes())
    rows.append(row)
  with open(root / "manifest.jsonl", "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  with open(root / "manifest.csv", "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["image", "audio", "text"] if audio else ["image", "text"])
    writer.writeheader()
    writer.writerows({**row, "text": row["text"][0]} for row in rows)
  for start in range(0, count, shard_size):
    with tarfile.open(root / "shards" / f"shard-{start // shard_size:05d}.tar", "w") as tar:
      for i in range(start, min(start + shard_size, count)):
        members = {"png": (root / rows[i]["image"]).read_bytes(), "txt": "\n".join(rows[i]["text"]).encode()}
        if audio:
          members["wav"] = (root / rows[i]["audio"]).read_bytes()
        for ext, data in members.items():
          info = tarfile.TarInfo(f"{i:05d}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  return {"manifest": str(root / "manifest.jsonl"), "csv": str(root / "manifest.csv"),
          "shards": str(root / "shards" / "*.tar")}

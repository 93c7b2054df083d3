"""`bench search`'s pieces that need no model: mAP@10 per modality pair, padded indexes, the load generators."""

import http.server
import threading

import numpy as np

from crucible_jax import cli
from crucible_jax.bench import search, search_load
from crucible_jax.serve.store import Index


def test_quality_is_perfect_for_identical_embeddings_and_low_for_shuffled(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.arange(40) % 20  # every string twice per modality
  vectors = rng.standard_normal((20, 8)).astype(np.float32)
  vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  index = Index.create(tmp_path / "q", 8)
  index.add("image", vectors[labels], [{"label": int(l)} for l in labels])
  index.add("text", vectors[labels], [{"label": int(l)} for l in labels])
  index.add("audio", vectors[rng.permutation(labels)], [{"label": int(l)} for l in labels])
  quality = search._quality(index)
  assert set(quality) == {f"{q}_to_{t}" for q in ("audio", "image", "text") for t in ("audio", "image", "text") if q != t}
  assert quality["text_to_image"]["mAP@10"] == 1.0 and quality["image_to_text"]["R@1"] == 1.0
  assert quality["audio_to_image"]["mAP@10"] < 0.5


def test_padded_index_keeps_real_items_and_fills_with_unit_vectors(tmp_path):
  source = Index.create(tmp_path / "s", 4)
  (tmp_path / "s" / "export").mkdir()
  source.add("text", np.eye(4, dtype=np.float32)[:3], [{"text": t, "label": i} for i, t in enumerate("abc")])
  padded = search._pad_index(tmp_path / "p", source, 50, np.random.default_rng(0))
  assert len(padded) == 50 and padded.item(1)["text"] == "b" and padded.item(49)["modality"] == "image"
  np.testing.assert_allclose(np.linalg.norm(padded._vectors, axis=1), 1.0, rtol=1e-5)


def test_open_loop_and_saturation_count_every_request():
  class Ok(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
      self.rfile.read(int(self.headers["content-length"]))
      self.send_response(200)
      self.send_header("content-type", "application/json")
      self.end_headers()
      self.wfile.write(b"{}")

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    send = search_load.sender(f"http://127.0.0.1:{server.server_port}", [(b"{}", "application/json")])
    level = search_load.open_loop(send, qps=40, count=20)
    assert level["requests"] == 20 and level["errors"] == 0 and 0 < level["p50_ms"] <= level["p99_ms"]
    assert search_load.saturation(send, concurrency=2, seconds=0.5) > 0
  finally:
    server.shutdown()


def test_bench_search_takes_a_workdir_not_a_config(tmp_path, capsys):
  assert cli.main(["bench", "search", "--json", str(tmp_path / "o.json")]) == 2
  assert "bench search takes --workdir" in capsys.readouterr().err

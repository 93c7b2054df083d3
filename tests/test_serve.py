"""`crucible serve` and `crucible client` over a live loopback server; the priority scheduler on a fake encoder."""

import asyncio
import io
import json
import time

import numpy as np
import pytest
import soundfile

from crucible_jax import cli
from crucible_jax.serve import preprocess
from crucible_jax.serve.app import ServeConfig, create_app
from crucible_jax.serve.artifact import ExportDir
from crucible_jax.serve.client import EdgeClient
from crucible_jax.serve.scheduler import Dropped, Encoding, Scheduler
from crucible_jax.serve.store import Index
from serve_fixtures import tiny_params_dir
from serve_server import request, search, serving

TOKEN = "s3cret"
LIMIT = 200_000  # bytes: above a 4 s WAV (64 kB), below the oversized upload


@pytest.fixture(scope="module")
def live(tmp_path_factory):
  """(base URL, index directory, app) of a routed tiny model's index served on loopback."""
  root = tmp_path_factory.mktemp("serve")
  params = tiny_params_dir(root / "params", routed=True)  # priorities come from its router
  assert cli.main(["index", "--workdir", str(params), "--data", "digit_world:test", "--out", str(root / "idx")]) == 0
  app = create_app(Index.open(root / "idx"), ServeConfig(max_upload_bytes=LIMIT, deadline_ms=60_000, token=TOKEN))
  with serving(app) as base:
    yield base, root / "idx", app


@pytest.fixture
def served(live):
  return live[:2]


def _item(base: str, item_id: int) -> bytes:
  status, _, body = request(f"{base}/items/{item_id}", headers={"Authorization": f"Bearer {TOKEN}"})
  assert status == 200
  return body


def _first(index: Index, modality: str) -> int:
  return next(i for i in range(len(index)) if index.item(i)["modality"] == modality)


def _expected(index_dir, modality: str, inputs: dict, targets: list[str], k: int) -> list[tuple[int, float]]:
  """What the server must answer: the exported encoder here, then exact search."""
  index = Index.open(index_dir)
  vector = ExportDir(index.export_dir).embed(modality, inputs)[0]
  return [(h.id, h.score) for h in index.search(vector, targets, k)[0]]


def test_health_is_open_and_everything_else_needs_the_token(served):
  base, _ = served
  status, _, body = request(f"{base}/health")
  assert status == 200 and json.loads(body)["items"] == 512
  assert request(f"{base}/metrics")[0] == 401
  assert request(f"{base}/items/0")[0] == 401
  assert request(f"{base}/")[0] == 401
  assert request(f"{base}/?token={TOKEN}")[0] == 200
  assert search(base, {"text": "seven"}, token="wrong")[0] == 401


def test_text_search_returns_ranked_items_of_the_targets(served):
  base, index_dir = served
  status, reply = search(base, {"text": "a card showing 42", "targets": ["image", "audio"], "k": "7"}, token=TOKEN)
  assert status == 200, reply
  got = [(r["id"], r["score"]) for r in reply["results"]]
  spec = {"tokenizer": {"kind": "byte"}, "max_len": 48}
  want = _expected(index_dir, "text", preprocess.text_inputs("a card showing 42", spec), ["image", "audio"], 7)
  assert [i for i, _ in got] == [i for i, _ in want]
  np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-5)
  assert {r["modality"] for r in reply["results"]} <= {"image", "audio"} and reply["dropped"] == []
  assert all(r["url"] == f"/items/{r['id']}" and r["source"] == "digit_world:test" for r in reply["results"])


def test_uploaded_image_wav_and_flac_are_encoded_like_the_export(served):
  base, index_dir = served
  index = Index.open(index_dir)
  export = ExportDir(index.export_dir)
  png, wav = _item(base, _first(index, "image")), _item(base, _first(index, "audio"))
  waveform, rate = soundfile.read(io.BytesIO(wav))
  flac = io.BytesIO()
  soundfile.write(flac, waveform, rate, format="FLAC")
  for name, data in (("q.png", png), ("q.wav", wav), ("q.flac", flac.getvalue())):
    status, reply = search(base, {"targets": "text,image", "k": "5"}, {"file": (name, data)}, token=TOKEN)
    assert status == 200, (name, reply)
    modality, inputs = preprocess.file_inputs(data, export.manifest["preprocessing"])
    assert reply["query"] == modality == ("image" if name.endswith("png") else "audio")
    assert [r["id"] for r in reply["results"]] == [i for i, _ in _expected(index_dir, modality, inputs,
                                                                           ["text", "image"], 5)]


def test_edge_client_sends_only_the_vector_and_gets_the_servers_results(served):
  base, index_dir = served
  wav = _item(base, _first(Index.open(index_dir), "audio"))
  client = EdgeClient(index_dir / "export", base, TOKEN)
  edge = client.search(data=wav, targets=["image"], k=5)
  status, cloud = search(base, {"targets": "image", "k": "5"}, {"file": ("q.wav", wav)}, token=TOKEN)
  assert status == 200 and edge.body["query"] == "vector"
  assert [r["id"] for r in edge.body["results"]] == [r["id"] for r in cloud["results"]]
  np.testing.assert_allclose([r["score"] for r in edge.body["results"]], [r["score"] for r in cloud["results"]],
                             atol=1e-5)
  assert edge.bytes_sent < len(wav) / 20  # 32 numbers instead of a 64 kB recording


@pytest.mark.parametrize("fields, files, status, message", [
    ({"text": "  "}, {}, 400, "empty query"),
    ({"text": "seven", "targets": "image,smell"}, {}, 400, "unknown target modality 'smell'"),
    ({"text": "seven", "k": "0"}, {}, 400, "k=0"),
    ({}, {"file": ("x.bin", b"\x00\x01hello")}, 415, "unsupported file type"),
    ({}, {"file": ("x.png", b"\x89PNG\r\n\x1a\nbroken")}, 422, "corrupt image"),
    ({}, {"file": ("x.wav", b"RIFF\x10\x00\x00\x00WAVEjunk")}, 422, "corrupt or unsupported audio"),
    ({}, {"file": ("big.wav", b"RIFF" + bytes(LIMIT))}, 413, "exceeds the limit"),
    ({"text": "x" * 500}, {}, 400, "more than max_len"),
    ({"vector": "[1, 2]"}, {}, 400, "vector must be 32 finite numbers"),
])
def test_bad_queries_get_clear_4xx_and_the_server_lives_on(served, fields, files, status, message):
  base, _ = served
  got, reply = search(base, fields, files, token=TOKEN)
  assert got == status and message in reply["error"], reply
  assert request(f"{base}/health")[0] == 200


def test_items_and_metrics(served):
  base, _ = served
  assert request(f"{base}/items/999999", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 404
  status, headers, body = request(f"{base}/items/64", headers={"Authorization": f"Bearer {TOKEN}"})
  assert status == 200 and headers["content-type"].startswith("text/plain") and body.decode().strip()
  search(base, {"text": "nine"}, token=TOKEN)
  status, headers, body = request(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
  text = body.decode()
  assert status == 200 and headers["content-type"].startswith("text/plain")
  assert 'crucible_search_latency_seconds_count{modality="text"}' in text
  assert 'crucible_requests_total{endpoint="search",modality="",status="400"}' in text
  assert 'crucible_encoder_batch_size_bucket{le="1.0",modality="text"}' in text


def test_scheduler_batches_and_drops_the_lowest_priority_under_deadline():
  calls = []

  def encode(modality, inputs):
    calls.append((modality, len(inputs["x"])))
    time.sleep(0.05)
    return np.ones((len(inputs["x"]), 2), np.float32)

  async def scenario():
    scheduler = Scheduler(encode, {"text": 2, "image": 1, "audio": 0}, max_batch=4, max_wait_s=0.01)
    scheduler.start()
    one = {"x": np.zeros((1, 3))}
    await scheduler.encode("text", one, time.monotonic() + 5)  # measures the batch time (50 ms)
    now = time.monotonic()
    jobs = [scheduler.encode("audio", one, now + 0.12) for _ in range(2)]
    jobs += [scheduler.encode("text", one, now + 5) for _ in range(6)]
    jobs += [scheduler.encode("image", one, now + 5)]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    await scheduler.stop()
    return results

  results = asyncio.run(scenario())
  assert all(isinstance(r, Dropped) and r.modality == "audio" for r in results[:2])
  assert all(isinstance(r, Encoding) for r in results[2:])
  assert calls[1:] == [("text", 4), ("text", 2), ("image", 1)]  # batched, highest priority first; audio shed


def test_scheduler_recovers_from_a_slow_first_batch():
  """A compile-length first batch must not make every later query look late (and be dropped forever)."""
  durations = iter([0.5] + [0.001] * 100)

  def encode(modality, inputs):
    time.sleep(next(durations))
    return np.ones((len(inputs["x"]), 2), np.float32)

  async def scenario():
    scheduler = Scheduler(encode, {"text": 1}, max_batch=2, max_wait_s=0.0)
    scheduler.start()
    one = {"x": np.zeros((1, 3))}
    await scheduler.encode("text", one, time.monotonic() + 5)  # 0.5 s: the "compile"
    alone = await scheduler.encode("text", one, time.monotonic() + 0.1)  # next batch: always runs
    now = time.monotonic()
    queued = await asyncio.gather(*(scheduler.encode("text", one, now + 0.2) for _ in range(6)), return_exceptions=True)
    await scheduler.stop()
    return alone, queued

  alone, queued = asyncio.run(scenario())
  assert isinstance(alone, Encoding) and all(isinstance(r, Encoding) for r in queued)


def test_priorities_are_the_routers_scores_of_each_querys_parts(served):
  base, index_dir = served
  export = ExportDir(Index.open(index_dir).export_dir)
  wav = _item(base, _first(Index.open(index_dir), "audio"))
  status, reply = search(base, {"text": "a card showing 42", "k": "3"}, {"file": ("q.wav", wav)}, token=TOKEN)
  assert status == 200 and reply["priority_source"] == "router" and reply["query"] == "text+audio", reply
  router = export.artifact("router")
  inputs = {k: np.zeros((1, *v["shape"][1:]), v["dtype"]) for k, v in router.inputs.items()}
  inputs.update({**preprocess.text_inputs("a card showing 42", export.manifest["preprocessing"]["text"]),
                 **preprocess.file_inputs(wav, export.manifest["preprocessing"])[1],
                 "text_present": np.ones(1, bool), "audio_present": np.ones(1, bool)})
  scores = dict(zip(export.manifest["router_modalities"], router(inputs)["scores"][0]))
  assert reply["priorities"] == pytest.approx({"text": scores["text"], "audio": scores["audio"]}, abs=1e-5)


def test_everything_dropped_is_a_503_that_names_the_modality(live, monkeypatch):
  base, _, app = live
  scheduler = app.state.service.scheduler

  async def shed(modality, inputs, deadline, priority=None):
    raise Dropped(modality, "projected 40 ms past the deadline behind higher-priority encodings")

  monkeypatch.setattr(scheduler, "encode", shed)
  status, reply = search(base, {"text": "seven", "deadline_ms": "5"}, token=TOKEN)
  monkeypatch.undo()
  assert status == 503 and reply["error"] == "every query encoding was dropped to meet the deadline", reply
  assert reply["dropped"] == [{"modality": "text", "reason": "projected 40 ms past the deadline behind "
                                                             "higher-priority encodings"}] and reply["deferred"] == []
  assert reply["priority_source"] == "router" and set(reply["priorities"]) == {"text"}
  _, _, body = request(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
  assert 'crucible_dropped_encodings_total{modality="text"} 1.0' in body.decode()
  assert search(base, {"text": "seven"}, token=TOKEN)[0] == 200  # the real scheduler serves again


def test_client_cli_searches_by_vector_and_names_bad_input(served, tmp_path, capsys):
  base, index_dir = served
  out = tmp_path / "reply.json"
  assert cli.main(["client", "--export", str(index_dir / "export"), "--url", base, "--token", TOKEN,
                   "--text", "a card showing 42", "--targets", "image", "audio", "--k", "4", "--json", str(out)]) == 0
  reply = json.loads(out.read_text())
  status, cloud = search(base, {"text": "a card showing 42", "targets": ["image", "audio"], "k": "4"}, token=TOKEN)
  assert reply["query"] == "vector" and [r["id"] for r in reply["results"]] == [r["id"] for r in cloud["results"]]
  assert 0 < reply["bytes_sent"] < 1000 and reply["encode_ms"] > 0 and reply["round_trip_ms"] > 0
  capsys.readouterr()
  for args, message in ((["--text", "seven", "--token", "wrong"], "HTTP 401"),
                        (["--file", str(tmp_path / "none.wav"), "--token", TOKEN], "none.wav"),
                        (["--token", TOKEN], "empty query")):
    assert cli.main(["client", "--export", str(index_dir / "export"), "--url", base, *args]) == 1
    assert message in capsys.readouterr().err


def test_scheduler_serves_queues_by_their_queries_priority():
  """Router scores reorder modalities per query: the queue holding the higher-scored query runs first."""
  calls = []

  def encode(modality, inputs):
    calls.append(modality)
    time.sleep(0.05)
    return np.ones((len(inputs["x"]), 2), np.float32)

  async def scenario():
    scheduler = Scheduler(encode, {"text": 2, "image": 1, "audio": 0}, max_batch=4, max_wait_s=0.01)
    scheduler.start()
    one = {"x": np.zeros((1, 3))}
    for modality in ("text", "image", "audio"):  # measures each batch time (50 ms)
      await scheduler.encode(modality, one, time.monotonic() + 5)
    now = time.monotonic()
    jobs = [scheduler.encode("text", one, now + 0.08, priority=-1.0), scheduler.encode("image", one, now + 5, 0.5),
            scheduler.encode("audio", one, now + 5, priority=-2.0)]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    await scheduler.stop()
    return results

  text, image, audio = asyncio.run(scenario())
  assert isinstance(text, Dropped) and text.modality == "text"
  assert image.deferred_behind == () and audio.deferred_behind == ("image",)  # its deadline allowed the wait
  assert calls[3:] == ["image", "audio"]  # the configured order (text first) was overridden, and text shed

"""The web page in a real headless Chromium (Debian's, driven by Playwright): text search, WAV upload, bad file."""

import pathlib

import pytest

from crucible_jax import cli
from crucible_jax.serve.app import ServeConfig
from crucible_jax.serve.store import Index
from serve_fixtures import tiny_params_dir
from serve_server import request, running, search

CHROMIUM = "/usr/bin/chromium"  # .ci/install_chromium.sh installs it
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "web-token"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
  sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' installs playwright")
  if not pathlib.Path(CHROMIUM).is_file():
    pytest.fail(f"{CHROMIUM} is missing: run .ci/install_chromium.sh (apt-get install chromium)")
  root = tmp_path_factory.mktemp("web")
  params = tiny_params_dir(root / "params")
  assert cli.main(["index", "--workdir", str(params), "--data", "digit_world:test", "--out", str(root / "idx")]) == 0
  with running(root / "idx", ServeConfig(deadline_ms=60_000, token=TOKEN)) as base, sync_api.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    tab = browser.new_page()
    tab.set_default_timeout(90_000)
    tab.goto(f"{base}/?token={TOKEN}")
    yield tab, base, root
    browser.close()


def _ids(tab) -> list[int]:
  return [int(x) for x in tab.eval_on_selector_all("#results .card", "cards => cards.map(c => c.dataset.id)")]


def test_text_search_shows_the_images_the_api_ranks_first(page, tmp_path):
  tab, base, _ = page
  tab.wait_for_selector("#status:has-text('512 items indexed')")
  for other in ("text", "audio", "video"):
    tab.uncheck(f"input[name=targets][value={other}]")
  tab.fill("#text", "a card showing 42")
  tab.click("#go")
  tab.wait_for_selector("#results .card.image img")
  tab.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
  status, reply = search(base, {"text": "a card showing 42", "targets": "image", "k": "12"}, token=TOKEN)
  assert status == 200 and _ids(tab) == [r["id"] for r in reply["results"]]
  assert tab.eval_on_selector("#results img", "img => img.naturalWidth") == 64  # the item's PNG, 64 x 16
  tab.screenshot(path=str(tmp_path / "text_search.png"), full_page=True)
  assert (tmp_path / "text_search.png").stat().st_size > 1000


def test_wav_upload_shows_results_and_a_corrupt_file_shows_the_message(page, tmp_path):
  tab, base, root = page
  index = Index.open(root / "idx")
  audio_id = next(i for i in range(len(index)) if index.item(i)["modality"] == "audio")
  wav = tmp_path / "query.wav"
  wav.write_bytes(request(f"{base}/items/{audio_id}", headers={"Authorization": f"Bearer {TOKEN}"})[2])
  tab.fill("#text", "")
  for target in ("text", "audio"):
    tab.check(f"input[name=targets][value={target}]")
  tab.set_input_files("#file", str(wav))
  tab.click("#go")
  tab.wait_for_selector("#status:has-text('results for audio')")
  assert len(_ids(tab)) == 12 and tab.locator("#message").is_hidden()
  assert tab.locator("#results .card.audio audio").count() >= 1  # playable sounds among the results
  tab.screenshot(path=str(tmp_path / "wav_search.png"), full_page=True)
  corrupt = tmp_path / "broken.wav"
  corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot really")
  tab.set_input_files("#file", str(corrupt))
  tab.click("#go")
  tab.wait_for_selector("#message:has-text('corrupt or unsupported audio')")
  assert _ids(tab) == []
  tab.screenshot(path=str(tmp_path / "corrupt.png"), full_page=True)

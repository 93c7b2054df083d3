"""experiments/quickstart.ipynb runs end to end in this venv's kernel and shows plots and the results table."""

import json
import os
import pathlib
import sys

import jax
import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOK = ROOT / "experiments" / "quickstart.ipynb"
CELL_TIMEOUT_S = 1800  # per cell; the training cell compiles three stages (minutes on a busy 2-core machine)


def _tagged(nb: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
  cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
  assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
  return cells[0]


def _text(cell: nbformat.NotebookNode) -> str:
  parts = []
  for output in cell.get("outputs", []):
    parts.append(output.get("text", ""))
    for mime in ("text/markdown", "text/plain"):
      parts.append(output.get("data", {}).get(mime, ""))
  return "\n".join(parts)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """The notebook executed in a fresh `python3` kernel of this interpreter's env: (notebook, workdir)."""
  workdir = tmp_path_factory.mktemp("quickstart")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  with pytest.MonkeyPatch.context() as env:
    # The kernel inherits this environment: this venv's kernelspec first, this checkout's package (the kernel
    # starts in experiments/, as Jupyter starts it beside the notebook), the test's data dir and XLA flags, and
    # the session's compilation cache (test_cli compiles the same first stage and evals).
    env.setenv("JUPYTER_PATH", os.path.join(sys.prefix, "share", "jupyter"))
    env.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
    env.setenv("CRUCIBLE_QUICKSTART_WORKDIR", str(workdir))
    cache_dir = jax.config.jax_compilation_cache_dir
    if cache_dir:
      env.setenv("JAX_COMPILATION_CACHE_DIR", str(cache_dir))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
  if os.environ.get("CRUCIBLE_NOTEBOOK_OUT"):  # keep the executed notebook (e.g. as a CI artifact)
    nbformat.write(nb, os.environ["CRUCIBLE_NOTEBOOK_OUT"])
  return nb, workdir


def test_runs_without_errors_in_this_venv(executed):
  nb, _ = executed
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
  setup = _text(_tagged(nb, "setup"))
  assert f"python: {sys.prefix}" in setup, setup  # the kernel ran this venv's interpreter
  assert "devices: 8" in setup or "devices: 1" in setup, setup


def test_trains_all_stages_and_writes_results(executed):
  _, workdir = executed
  results = json.loads((workdir / "results.json").read_text())
  assert results["steps"] == 30
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["stage"] for r in rows] == ["unimodal"] * 2 + ["align"] * 2 + ["joint"] * 2


def test_shows_plots_inline(executed):
  nb, workdir = executed
  images = [o for o in _tagged(nb, "plots").outputs if "image/png" in o.get("data", {})]
  assert len(images) == len(list((workdir / "plots").glob("*.png"))) >= 2
  assert "retrieval_examples.png" in _text(_tagged(nb, "plots"))


def test_shows_the_results_table(executed):
  nb, workdir = executed
  table = _text(_tagged(nb, "results-table"))
  results = json.loads((workdir / "results.json").read_text())
  assert "| split | retrieval | R@1 | R@5 | R@10 | mAP@10 |" in table, table
  assert "| test | image → text |" in table
  assert f"| test | vqa | accuracy | {results['test/vqa/accuracy']:.3f} |" in table
  assert f"| test | asr | wer | {results['test/asr/wer']:.3f} |" in table


def test_trains_on_your_own_folder(executed):
  nb, workdir = executed
  out = _text(_tagged(nb, "own_data"))
  results = json.loads((workdir / "own_run" / "results.json").read_text())
  assert "modalities found: ('image', 'text')" in out and results["steps"] == 5
  assert f"test/image_to_text/R@1: {results['test/image_to_text/R@1']:.3f}" in out

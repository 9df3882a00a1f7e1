"""The Colab quickstart executes top to bottom (on CPU, with a small step count)."""

from __future__ import annotations

import os
import pathlib

import pytest

pytestmark = pytest.mark.slow
NOTEBOOK = pathlib.Path(__file__).parents[1] / "colab" / "qst_quickstart.ipynb"


def test_quickstart_notebook_runs(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from qst_jax.data.offline import MissingPackageError, smollm2_gguf

    try:
        smollm2_gguf()
    except MissingPackageError as err:
        pytest.skip(str(err))
    monkeypatch.setenv("QST_NOTEBOOK_STEPS", "8")
    monkeypatch.setenv("QST_NOTEBOOK_EVAL_WINDOWS", "8")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parents[1])}})
    client.execute()
    texts, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
            texts.append(out.get("text", ""))
            images += "image/png" in out.get("data", {})
    text = "".join(texts)
    assert "held-out perplexity: frozen backbone" in text
    assert images >= 1  # the inline loss curve
    assert "{'loss':" in text and "'perplexity':" in text  # the bring-your-own-data run
    assert "best: " in text and "rank  member" in text  # the sweep of four schedules and its ranking table
    assert "trainable params (nnx.Param, float32) over Backbone(llama, 30 layers" in text  # section 7: NNX
    assert "NNX loop, 4 steps: loss" in text and "the export gives the same logits: True" in text


def test_committed_notebook_shows_results():
    """The notebook in the repo carries the outputs of a full run."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "held-out perplexity: frozen backbone" in text
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    frozen, after = (float(x) for x in text.split("held-out perplexity: frozen backbone ")[1].split("\n")[0].split(" -> QST "))
    assert after < frozen

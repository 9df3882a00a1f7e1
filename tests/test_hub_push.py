"""A trained run pushed to a Hub served on 127.0.0.1 (`qst-export --push-to-hub`), read back from the server,
then loaded as `--side org/name` through a download from the same Hub."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load

from qst_jax.cli import export as export_cli
from qst_jax.cli import generate as generate_cli
from qst_jax.methods import load_tuned
from qst_jax.models import load_backbone
from qst_jax.train.trainer import Trainer
from tests.helpers import tiny_config, tiny_model_dir
from tests.hub_server import HubServer


@pytest.fixture(scope="module")
def run(testdata, tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    model_dir = tiny_model_dir(testdata, root)
    config = tiny_config(model_dir, root, **{"train.steps": 2, "train.eval_every": 0, "train.checkpoint_every": 0})
    Trainer(config, log=lambda *a: None).run()
    return model_dir, root / "run"


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants

    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at its import
        yield server


def test_a_pushed_run_is_on_the_hub_and_loads_back(run, hub, capsys):
    model_dir, run_dir = run
    assert export_cli.main([str(run_dir), "--push-to-hub", "test-org/tiny-qst"]) == 0
    assert "pushed side.safetensors, qst_config.json, README.md to test-org/tiny-qst" in capsys.readouterr().out
    pushed = hub.repos["test-org/tiny-qst"]
    assert pushed["side.safetensors"] == (run_dir / "side.safetensors").read_bytes()
    assert json.loads(pushed["qst_config.json"]) == json.loads((run_dir / "qst_config.json").read_text())
    card = pushed["README.md"].decode()
    assert card.startswith("---\nlibrary_name: qst_jax\ntags:\n- qst_jax\n- qst\n- nf4\n- quantized-side-tuning\n---")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"| perplexity | {summary['eval_after']['perplexity']:.4f} |" in card
    assert f"qst-generate --model {model_dir} --side test-org/tiny-qst" in card

    backbone = load_backbone(model_dir)
    model, params, _ = load_tuned("test-org/tiny-qst", backbone)  # downloaded from the served Hub
    assert any(r.startswith("GET /test-org/tiny-qst/resolve/") for r in hub.requests)
    _, local, _ = load_tuned(str(run_dir), backbone)
    assert model.name == "qst" and jax.tree.structure(params) == jax.tree.structure(local)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(local)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(load(pushed["side.safetensors"])) == sorted(load((run_dir / "side.safetensors").read_bytes()))
    assert generate_cli.main(["--model", str(model_dir), "--side", "test-org/tiny-qst", "--prompt", "To be",
                              "--max-new-tokens", "3"]) == 0


def test_push_refusals_are_one_line(run, hub, monkeypatch, capsys):
    _, run_dir = run
    assert export_cli.main([str(run_dir), "--push-to-hub", "not-a-repo"]) == 1
    assert capsys.readouterr().err == "qst-export: error: --push-to-hub 'not-a-repo': a Hub repo is written org/name\n"
    assert export_cli.main([str(run_dir.parent), "--push-to-hub", "test-org/x"]) == 1
    assert "qst_config.json: missing (expected an exported side network from qst-train)" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert export_cli.main([str(run_dir), "--push-to-hub", "test-org/x"]) == 1
    assert capsys.readouterr().err == ("qst-export: error: test-org/x: cannot push with HF_HUB_OFFLINE set; unset it "
                                       "(pushing needs the network)\n")


def test_load_side_pulls_from_the_hub_when_allowed(run, hub):
    from qst_jax.generate.engine import Engine
    from qst_jax.generate.side_store import SideStore
    from qst_jax.models import load_tokenizer
    from qst_jax.serve import openai_api as api
    from qst_jax.serve.app import Server

    model_dir, run_dir = run
    assert export_cli.main([str(run_dir), "--push-to-hub", "test-org/served-side"]) == 0
    backbone = load_backbone(model_dir)
    engine = Engine(backbone, load_tokenizer(model_dir), slots=2, max_len=64, sides=SideStore(backbone.cfg))
    closed = Server(backbone, engine.tokenizer, engine, base_name="base")
    with pytest.raises(api.APIError, match=r"^hub: loading from the Hub is off: start qst-serve with --hub-sides"):
        closed.load_side("pulled", None, "test-org/served-side")
    server = Server(backbone, engine.tokenizer, engine, base_name="base", hub_sides=True)
    assert server.load_side("pulled", None, "test-org/served-side") == {"status": "loaded", "name": "pulled"}
    assert "pulled" in server.engine.sides
    with pytest.raises(api.APIError, match=r"^hub: test-org/nothing-here: no such model repo on the Hub"):
        server.load_side("other", None, "test-org/nothing-here")
    with pytest.raises(api.APIError, match=r"^hub: '\.\./x' must be a Hub repo, org/name$"):
        server.load_side("other", None, "../x")

"""Models named on the Hub: read from a Hub cache laid out in huggingface_hub's format, refusals from a Hub on
127.0.0.1, and `import qst_jax` leaving the environment alone."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from qst_jax.errors import QSTError
from qst_jax.models import load_backbone, load_config, load_tokenizer
from qst_jax.models.hub import HubError, is_hub_id, resolve_model
from tests.helpers import tiny_config, tiny_model_dir

REPO = "test-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(cache, repo: str, folder, commit: str = COMMIT, branch: str = "main", kind: str = "models") -> str:
    """`folder`'s files (subfolders too) as huggingface_hub caches a download of `repo` at `commit`: blobs
    named by their hash, the snapshot's files linking to them, `refs/<branch>` naming the commit. `kind`:
    "models" or "datasets". Returns the snapshot."""
    root = cache / f"{kind}--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        target = snapshot / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / branch).write_text(commit)
    return str(snapshot)


@pytest.fixture(scope="module")
def model_dir(testdata, tmp_path_factory):
    return tiny_model_dir(testdata, tmp_path_factory.mktemp("model"))


@pytest.fixture()
def hub_cache(model_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = lay_out_hub_cache(cache, REPO, model_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def test_hub_ids_and_local_paths(model_dir):
    assert is_hub_id("meta-llama/Llama-2-7b-hf") and is_hub_id("org/name:file.gguf")
    assert not is_hub_id(str(model_dir)) and not is_hub_id("./org/name") and not is_hub_id("smollm2")
    assert resolve_model(str(model_dir)) == str(model_dir)  # a local path always wins


def test_a_cached_hub_model_loads_as_the_local_one(hub_cache, model_dir):
    assert resolve_model(REPO) == hub_cache
    assert resolve_model(REPO, COMMIT) == hub_cache
    hub, local = load_backbone(REPO, dtype=jnp.float32), load_backbone(model_dir, dtype=jnp.float32)
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    np.testing.assert_array_equal(np.asarray(hub.logits(ids)), np.asarray(local.logits(ids)))
    assert load_config(REPO) == load_config(model_dir)
    assert load_tokenizer(REPO)("To be").input_ids == load_tokenizer(model_dir)("To be").input_ids


def test_qst_train_takes_a_hub_model(hub_cache, model_dir, tmp_path):
    from qst_jax.train.trainer import Trainer

    config = tiny_config(model_dir, tmp_path, **{"train.steps": 2, "train.eval_every": 0, "train.checkpoint_every": 0})
    config.model.path = REPO
    summary = Trainer(config, log=lambda *a: None).run()
    assert summary["steps"] == 2 and np.isfinite(summary["eval_after"]["loss"])
    record = json.loads((tmp_path / "run" / "qst_config.json").read_text())
    assert record["model_path"] == REPO


def test_offline_without_the_files_cached_is_one_line(hub_cache):
    with pytest.raises(HubError) as err:
        resolve_model("test-org/not-cached")
    assert str(err.value) == (
        "test-org/not-cached: not in the Hub cache and HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE to download it, "
        "or download it where there is a network (`huggingface-cli download test-org/not-cached`) and copy the cache")
    assert isinstance(err.value, QSTError) and err.value.field == "model.path"


class _RefusingHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the Hub does for a missing or a gated repo (by the repo's name)."""

    def _answer(self):
        gated = "gated" in self.path
        self.send_response(401 if gated else 404)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("X-Error-Message", "refused by the test Hub")
        self.send_header("Content-Type", "application/json")
        body = json.dumps({"error": "refused by the test Hub"}).encode()
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _answer

    def log_message(self, *args):
        pass


def _online(monkeypatch):
    """huggingface_hub as a process without HF_HUB_OFFLINE would have it (it reads the variable at import)."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture()
def refusing_hub(monkeypatch, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    _online(monkeypatch)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield
    server.shutdown()
    server.server_close()


def test_missing_and_gated_repos_are_one_line_each(refusing_hub):
    with pytest.raises(HubError) as err:
        resolve_model("test-org/missing")
    assert str(err.value) == ("test-org/missing: no such model repo on the Hub, or a private one: check the name, or "
                              "log in with `huggingface-cli login` (or set HF_TOKEN) if it is yours")
    with pytest.raises(HubError) as err:
        resolve_model("test-org/gated-model")
    assert str(err.value) == ("test-org/gated-model: a gated model: accept its licence on its Hub page "
                              "(https://huggingface.co/test-org/gated-model), then log in with `huggingface-cli "
                              "login` or set HF_TOKEN")


def test_an_unreachable_hub_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    _online(monkeypatch)
    with pytest.raises(HubError, match=r"^test-org/far-away: the Hub cannot be reached and the files are not cached "
                                        r"\(.*\); with a network, try again; without one, set HF_HUB_OFFLINE=1 and "
                                        r"use a cached model$"):
        resolve_model("test-org/far-away")


def test_import_qst_jax_leaves_the_environment_alone():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    code = ("import os; before = dict(os.environ); import qst_jax; after = dict(os.environ); "
            "after.pop('JAX_PLATFORMS', None) if 'JAX_PLATFORMS' not in before else None; "
            "print(before == after, 'HF_HUB_OFFLINE' in os.environ)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_a_gguf_file_of_a_hub_repo(tmp_path, monkeypatch):
    from qst_jax.data.offline import MissingPackageError, smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except MissingPackageError as err:
        pytest.skip(str(err))
    folder = tmp_path / "files"
    folder.mkdir()
    shutil.copy(gguf, folder / "smollm2.gguf")
    lay_out_hub_cache(tmp_path / "hub", "test-org/smollm2-gguf", folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = resolve_model("test-org/smollm2-gguf:smollm2.gguf")
    assert path.endswith("smollm2.gguf") and load_config(path).num_layers == load_config(gguf).num_layers
    with pytest.raises(HubError, match=r"^test-org/smollm2-gguf:other.gguf: not in the Hub cache"):
        resolve_model("test-org/smollm2-gguf:other.gguf")


def test_a_model_downloads_from_a_served_hub(model_dir, tmp_path, monkeypatch):
    """snapshot_download over HTTP from a Hub on 127.0.0.1: the model's files only, then loaded."""
    from tests.hub_server import HubServer

    with HubServer() as hub:
        hub.repos["test-org/served"] = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
        hub.repos["test-org/served"]["notes/big-unused.bin"] = b"x" * 1000  # not a model file: not fetched
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        _online(monkeypatch)
        local = resolve_model("test-org/served")
        assert sorted(os.listdir(local)) == sorted(p.name for p in model_dir.iterdir() if p.is_file())
        assert load_config("test-org/served") == load_config(model_dir)

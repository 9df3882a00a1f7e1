"""qst-serve end to end: a live server in a subprocess on 127.0.0.1, driven by the official `openai` client."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from qst_jax.cli import generate as generate_cli
from qst_jax.methods import QSTModel, SideConfig, export_side
from qst_jax.models import load_backbone
from tests.helpers import tiny_model_dir

openai = pytest.importorskip("openai")
try:  # the HTTP client the openai client brings (httpx, or httpx2 in its newer releases)
    import httpx
except ImportError:
    import httpx2 as httpx
REPO = pathlib.Path(__file__).parents[2]
SLOTS = 4
PROMPTS = ["To be, or not", "the slings and arrows", "whether 'tis nobler", "a sea of troubles"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _export(root: pathlib.Path, name: str, backbone, seed: int, **side) -> pathlib.Path:
    model = QSTModel(backbone.cfg, SideConfig(reduction_factor=8, **side))
    params = model.init(jax.random.PRNGKey(seed))
    params["up"]["w"] = jax.random.normal(jax.random.PRNGKey(seed + 1), params["up"]["w"].shape) * 0.5
    export_side(str(root / name), model, params, backbone.cfg)
    return root / name


class Live:
    """A qst-serve subprocess; `stop()` sends SIGTERM and returns its exit status."""

    def __init__(self, args: list[str], log: pathlib.Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "qst_jax.cli.serve", *args, "--port", str(self.port)],
                                     cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
            if self.proc.poll() is not None:
                break
        raise RuntimeError(f"qst-serve did not start: {log.read_text()}")

    def client(self, key: str = "none", **kw):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120, **kw)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


@pytest.fixture(scope="module")
def setup(testdata, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = tiny_model_dir(testdata, root)
    backbone = load_backbone(model_dir)
    sides = root / "sides"
    paths = {"a": _export(sides, "a", backbone, 1), "b": _export(sides, "b", backbone, 3),
             "wide": _export(sides, "wide", backbone, 5, downsampler="avgpool")}
    _export(sides, "c", backbone, 7)  # loaded later, over the API
    other = load_backbone(testdata / "tiny-opt-nf4")
    _export(sides, "for-opt", other, 9)  # trained for another backbone: refused
    _export(root / "outside", "a2", backbone, 11)
    nan = _export(sides, "nan", backbone, 13)  # intact header, a NaN inside: refused naming the tensor
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(nan / "side.safetensors"))
    tensors["up/w"] = tensors["up/w"].copy()
    tensors["up/w"].flat[0] = float("nan")
    save_file(tensors, str(nan / "side.safetensors"), metadata={"format": "qst_jax"})
    (sides / "escape").symlink_to(root / "outside")  # a symlink out of the side root
    server = Live(["--model", str(model_dir), *[f"--side={n}={p}" for n, p in paths.items()], "--side-root",
                   str(sides), "--slots", str(SLOTS), "--max-len", "128", "--drain-timeout", "30"], root / "server.log")
    yield server, model_dir, paths, root
    server.stop()


def _complete(client, model: str, prompt: str, max_tokens: int = 8) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


def _qst_generate(model_dir, paths, records, tmp_path, capsys) -> list[str]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["--model", str(model_dir), *[a for p in paths.values() for a in ("--side", str(p))], "--file",
            str(prompts), "--max-new-tokens", "8", "--batch-size", str(SLOTS)]
    capsys.readouterr()
    assert generate_cli.main(args) == 0
    return [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()]


def test_models_lists_the_base_and_each_side_with_its_parent(setup):
    server, model_dir, paths, _ = setup
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) == {"tiny-llama-nf4", "a", "b", "wide"}
    assert models["a"].parent == "tiny-llama-nf4" and models["tiny-llama-nf4"].parent is None
    assert models["b"].root == str(paths["b"].resolve())


def test_greedy_output_equals_qst_generate_alone_and_16_at_once(setup, tmp_path, capsys):
    server, model_dir, paths, _ = setup
    client = server.client()
    jobs = [(side, prompt) for side in ("a", "b", "wide", None) for prompt in PROMPTS]  # 16, mixed
    records = [{"prompt": p, "side": s} for s, p in jobs]
    expected = _qst_generate(model_dir, paths, records, tmp_path, capsys)
    assert len(set(expected)) > 4  # the side networks change the text
    alone = [_complete(client, s or "tiny-llama-nf4", p) for s, p in jobs]
    assert alone == expected
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda job: _complete(client, job[0] or "tiny-llama-nf4", job[1]), jobs))
    assert together == expected  # batching changes nothing


def test_streams_chat_with_usage_and_done(setup):
    server, *_ = setup
    client = server.client()
    messages = [{"role": "user", "content": "Speak of the sea."}]
    whole = client.chat.completions.create(model="a", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="a", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert whole.usage.completion_tokens == 10 and whole.choices[0].finish_reason == "length"
    n = client.completions.create(model="b", prompt="To be", max_tokens=4, temperature=0.9, seed=3, n=3)
    assert [c.index for c in n.choices] == [0, 1, 2] and n.usage.completion_tokens == 12
    assert len({c.text for c in n.choices}) > 1  # choice i draws with seed 3 + i: not one draw three times
    again = client.completions.create(model="b", prompt="To be", max_tokens=4, temperature=0.9, seed=3, n=3)
    assert [c.text for c in again.choices] == [c.text for c in n.choices]  # the same seed: the same choices
    free = client.completions.create(model="b", prompt="To be", max_tokens=6, temperature=1.0, n=4)  # no seed
    assert len({c.text for c in free.choices}) > 1  # independent draws, not one draw four times


def test_a_side_loaded_while_streams_run_disturbs_nothing(setup):
    server, *_ = setup
    client = server.client()
    want = _complete(client, "a", PROMPTS[0], max_tokens=40)
    stream = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=40, temperature=0, stream=True)
    first = next(iter(stream))
    loaded = httpx.post(f"{server.url}/v1/load_side", json={"name": "c", "path": "c"}, timeout=60)
    assert loaded.status_code == 200, loaded.text
    text = first.choices[0].text + "".join(c.choices[0].text for c in stream)
    assert text == want
    assert "c" in {m.id for m in client.models.list().data}
    assert _complete(client, "c", PROMPTS[1]) != _complete(client, "a", PROMPTS[1])
    assert httpx.post(f"{server.url}/v1/unload_side", json={"name": "c"}, timeout=60).status_code == 200
    with pytest.raises(openai.NotFoundError, match=r"model: 'c' does not exist"):
        _complete(client, "c", PROMPTS[1])


def _busy(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("qst_slots_busy ")))


def test_a_disconnect_frees_the_slot(setup):
    server, *_ = setup
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={"model": "b", "prompt": "To be", "max_tokens": 120, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.time() + 10
    while _busy(server) and time.time() < deadline:
        time.sleep(0.1)
    assert _busy(server) == 0
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'qst_requests_finished_total{reason="cancelled"}' in text and 'qst_requests_total{model="b"}' in text
    counts = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("qst_prefill_calls_total ", "qst_decode_steps_total "))}
    assert counts["qst_prefill_calls_total"] >= 1 and counts["qst_decode_steps_total"] >= 1


BAD = [
    ("unknown model", {"model": "nope", "prompt": "x"}, 404, r"model: 'nope' does not exist"),
    ("prompt beyond the context", {"model": "a", "prompt": "to be " * 200}, 400,
     r"prompt: \d+ tokens leave no room in the context of 128"),
    ("max_tokens beyond the context", {"model": "a", "prompt": "x", "max_tokens": 500}, 400,
     r"max_tokens: 500 with a prompt of \d+ tokens exceeds the context of 128"),
    ("negative temperature", {"model": "a", "prompt": "x", "temperature": -1}, 400,
     r"temperature: -1 is not in \[0.0, 2.0\]"),
    ("top_p of zero", {"model": "a", "prompt": "x", "top_p": 0}, 400, r"top_p: must be > 0"),
    ("unsupported field", {"model": "a", "prompt": "x", "logprobs": 2}, 400, r"logprobs: not supported by this server"),
    ("n too large", {"model": "a", "prompt": "x", "n": 99}, 400, r"n: 99 is not in \[1, 16\]"),
    ("stop of the wrong type", {"model": "a", "prompt": "x", "stop": 3}, 400, r"stop: a string or a list"),
    ("a lone surrogate", {"model": "a", "prompt": "to be\ud800"}, 400,
     r"prompt: not valid Unicode text \(a lone surrogate '\\ud800' at character 5\)"),
    ("a token id beyond the vocabulary", {"model": "a", "prompt": [1, 10**6]}, 400,
     r"prompt: token id 1000000 is outside the vocabulary of 1024"),
    ("a prompt list too long for n", {"model": "a", "prompt": ["x"] * 5, "n": 4}, 400,
     r"n: 4 choices for each of 5 prompts exceed 16 in one request"),
]


@pytest.mark.parametrize("name, body, status, pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_their_status_and_message(setup, name, body, status, pattern):
    import re

    server, *_ = setup
    r = httpx.post(f"{server.url}/v1/completions", content=json.dumps(body), timeout=30,  # \u escapes: any str
                   headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert re.search(pattern, error["message"]), error
    assert error["param"] == pattern.split(":")[0]


def test_the_openai_prompt_and_content_forms(setup):
    """A list of prompts (n choices each, in order), token ids, and chat content as a list of text parts."""
    server, *_ = setup
    client = server.client()
    alone = [_complete(client, "a", p, 6) for p in PROMPTS[:2]]
    both = client.completions.create(model="a", prompt=PROMPTS[:2], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [alone[0], alone[0], alone[1], alone[1]]
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(setup[1])(PROMPTS[0]).input_ids
    by_ids = client.completions.create(model="a", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == alone[0] and by_ids.usage.prompt_tokens == len(ids)
    ask = "the slings and arrows"
    plain = client.chat.completions.create(model="b", messages=[{"role": "user", "content": ask}], max_tokens=6,
                                           temperature=0)
    parts = client.chat.completions.create(model="b", max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": ask[:8]}, {"type": "text", "text": ask[8:]}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    for content, message in (
            ([{"type": "image_url", "image_url": {"url": "x"}}],
             "messages: messages[0].content[0]: only text parts ({'type': 'text', 'text': ...}) are served, not "
             "'image_url'"),
            ("hi\udc00", "messages: messages[0].content: not valid Unicode text (a lone surrogate '\\udc00' at "
                         "character 2)")):
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                       content=json.dumps({"model": "a", "messages": [{"role": "user", "content": content}]}),
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"] == message, r.text
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "a", "prompt": ["x", 3]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        "prompt[1]: int is neither a string nor a non-empty list of token ids")


def test_malformed_json_and_side_paths_are_refused(setup):
    server, *_ = setup
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{bad", timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the body is not valid JSON")
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "a", "messages": [{"role": "wizard",
                                                                                            "content": "hi"}]})
    assert r.status_code == 400 and "messages: unknown chat role 'wizard'" in r.json()["error"]["message"]
    for path, message in (("../serve", "must be relative to the side root, without '..'"),
                          ("/etc", "must be relative to the side root, without '..'"),
                          ("escape/a2", "leads out of the side root (a symlink)"),
                          ("for-opt", "this side network was trained for another backbone"),
                          ("missing", "missing (expected an exported side network from qst-train)"),
                          ("nan", "side.safetensors: tensor 'up/w' holds NaN or infinite values")):
        r = httpx.post(f"{server.url}/v1/load_side", json={"name": "x", "path": path}, timeout=30)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (path, r.text)
    assert httpx.post(f"{server.url}/v1/unload_side", json={"name": "x"}).status_code == 404


def test_api_key_and_a_full_queue(setup):
    _, model_dir, paths, root = setup
    guarded = Live(["--model", str(model_dir), "--api-key", "sekret", "--max-queue", "0", "--slots", "2",
                    "--max-len", "64"], root / "guarded.log")
    try:
        assert httpx.get(f"{guarded.url}/health").status_code == 200  # no key needed
        r = httpx.get(f"{guarded.url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{guarded.url}/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        client = guarded.client("sekret")
        assert [m.id for m in client.models.list().data] == ["tiny-llama-nf4"]
        r = httpx.post(f"{guarded.url}/v1/completions", json={"model": "tiny-llama-nf4", "prompt": "x"},
                       headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        r = httpx.post(f"{guarded.url}/v1/load_side", json={"name": "a", "path": "a"},
                       headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 403 and "--side-root" in r.json()["error"]["message"]
        assert "qst-serve" in httpx.get(f"{guarded.url}/", headers={"Authorization": "Bearer sekret"}).text
    finally:
        assert guarded.stop() == -signal.SIGTERM  # uvicorn shuts down, then re-raises the signal it caught


CHROMIUM = "/usr/bin/chromium"  # Debian's (.ci/run installs it)


def test_the_page_streams_one_answer_per_chosen_side_network(setup):
    """In a real headless browser: tick two side networks, type a prompt, read one streamed answer from each."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    server, *_ = setup
    client = server.client()
    prompt = "Speak to me of the sea."
    want = {m: client.chat.completions.create(model=m, messages=[{"role": "user", "content": prompt}], max_tokens=8,
                                              temperature=0).choices[0].message.content for m in ("a", "wide")}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(f"{server.url}/")
            page.wait_for_selector("input[name=model][value=wide]")
            page.uncheck("input[name=model][value=tiny-llama-nf4]")
            page.check("input[name=model][value=a]")
            page.check("input[name=model][value=wide]")
            page.fill("#max", "8")
            page.fill("#prompt", prompt)
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.answer[data-done=\"1\"]').length == 2",
                                   timeout=60_000)
            got = {col.get_attribute("data-model"): col.query_selector(".answer").inner_text()
                   for col in page.query_selector_all(".col")}
        finally:
            browser.close()
    assert got == want


def test_sigterm_drains_running_requests(setup):
    """Its own server (the shared one keeps serving the other tests, in any order)."""
    _, model_dir, paths, root = setup
    server = Live(["--model", str(model_dir), f"--side=wide={paths['wide']}", "--slots", "2", "--max-len", "128",
                   "--drain-timeout", "30"], root / "sigterm.log")
    try:
        client = server.client()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(lambda: client.completions.create(model="wide", prompt=PROMPTS[2], max_tokens=60,
                                                                    temperature=0))
            deadline = time.time() + 30
            while not _busy(server) and time.time() < deadline:
                time.sleep(0.05)
            server.proc.send_signal(signal.SIGTERM)
            result = running.result(timeout=90)
        assert result.choices[0].finish_reason == "length" and result.usage.completion_tokens == 60
        assert server.proc.wait(timeout=60) == -signal.SIGTERM
        log = server.log.read_text()
        assert "qst-serve: drained: every running request finished" in log and "Traceback" not in log
    finally:
        server.stop()


def test_a_request_cancelled_at_shutdown_is_said_in_one_line():
    """uvicorn logs a task it cancels past the drain timeout with its traceback; qst-serve's log says one line."""
    import asyncio
    import io
    import logging
    import logging.config

    from qst_jax.cli.serve import log_config

    config = log_config()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    for spec in config["handlers"]["default"]["filters"]:
        handler.addFilter(config["filters"][spec]["()"]())
    logger = logging.getLogger("qst-test-uvicorn-error")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise asyncio.CancelledError("Task cancelled, timeout graceful shutdown exceeded")
        except asyncio.CancelledError as err:
            logger.error("Exception in ASGI application\n", exc_info=err)
        try:
            raise KeyError("other")
        except KeyError as err:
            logger.error("Exception in ASGI application", exc_info=err)
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == ("qst-serve: a request still running at the end of the drain timeout was cancelled (Task "
                        "cancelled, timeout graceful shutdown exceeded)")
    assert lines[1] == "Exception in ASGI application" and lines[2] == "Traceback (most recent call last):"


def test_a_peft_adapter_answers_through_qst_serve(setup, tmp_path, capsys):
    """`--adapter` serves a PEFT LoRA adapter (a folder holding PEFT's two files only) in every slot; its greedy
    completions equal qst-generate's with the same adapter, and it loads no side networks."""
    import shutil

    from qst_jax.methods import QLoRAModel

    _, model_dir, _, root = setup
    backbone = load_backbone(model_dir)
    model = QLoRAModel(backbone.cfg, rank=4, alpha=8.0)
    params = model.init(jax.random.PRNGKey(21))
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(22), x.shape), params)
    export_side(str(tmp_path / "qlora-run"), model, params, backbone.cfg)
    adapter = tmp_path / "peft-adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tmp_path / "qlora-run" / name, adapter / name)
    expected = _qst_generate(model_dir, {"peft": adapter}, [{"prompt": p} for p in PROMPTS], tmp_path, capsys)
    server = Live(["--model", str(model_dir), "--adapter", str(adapter), "--slots", str(SLOTS), "--max-len", "128"],
                  tmp_path / "adapter.log")
    try:
        client = server.client()
        assert [m.id for m in client.models.list().data] == ["peft-adapter"]
        assert [_complete(client, "peft-adapter", p) for p in PROMPTS] == expected
        base = _qst_generate(model_dir, {}, [{"prompt": p} for p in PROMPTS], tmp_path, capsys)
        assert base != expected  # the adapter changes the completions
    finally:
        server.stop()


def test_a_busy_port_is_refused_before_the_warm_up(capsys):
    from qst_jax.cli import serve as serve_cli

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert serve_cli.main(["--model", "/no/such/model", "--port", str(port)]) == 1  # before the model is read
    assert capsys.readouterr().err.strip() == (
        f"qst-serve: error: --port {port}: cannot serve on 127.0.0.1:{port} (Address already in use); stop what "
        "holds it or choose another --port")

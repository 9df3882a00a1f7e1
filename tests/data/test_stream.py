"""Streamed LM data (`data.streaming=true`): packed as a loaded data set is, resumed at the same record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qst_jax.data.batches import Batcher
from qst_jax.data.examples import lm_windows
from qst_jax.data.sources import DataError, load_records, stream_records
from qst_jax.data.specs import stream_batcher
from qst_jax.data.stream import StreamBatcher
from qst_jax.train.config import base_config
from tests.helpers import TEXT, save_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def docs(tmp_path):
    path = tmp_path / "docs.jsonl"
    words = TEXT.split()
    path.write_text("".join(json.dumps({"text": " ".join(words[i % 7: i % 7 + 5 + i % 11])}) + "\n" for i in range(60)))
    return path


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_unshuffled_stream_batches_equal_the_loaded_ones(tokenizer, docs):
    stream = stream_records(str(docs))
    batcher = StreamBatcher(lambda epoch, skip: stream.skip(skip), tokenizer, 16, batch_size=2, micro_batches=2)
    loaded = Batcher(lm_windows(load_records(str(docs)), tokenizer, 16), 2, 2, shuffle=False)
    expected = list(loaded.one_pass())
    got = _take(iter(batcher), len(expected))
    for a, b in zip(got, expected):
        for key in ("input_ids", "attention_mask", "loss_mask"):
            np.testing.assert_array_equal(a[key], b[key])


def test_a_restored_stream_reads_on_from_the_same_record(tokenizer, docs):
    config = base_config()
    config.data.train, config.data.seq_len, config.train.batch_size = str(docs), 16, 2
    per_epoch = len(list(Batcher(lm_windows(load_records(str(docs)), tokenizer, 16), 2).one_pass()))
    straight = _take(iter(stream_batcher(config, tokenizer)), per_epoch + 3)  # into the second epoch
    first = stream_batcher(config, tokenizer)
    it = iter(first)
    head = _take(it, 5)
    state = json.loads(json.dumps(first.state()))  # as a checkpoint keeps it
    resumed = stream_batcher(config, tokenizer)
    resumed.restore(state)
    tail = _take(iter(resumed), per_epoch - 2)
    for a, b in zip(head + tail, straight):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
    assert first.state()["epoch"] == 0 and resumed.state()["epoch"] >= 1  # it went on into the next epoch
    loaded_order = [b["input_ids"] for b in Batcher(lm_windows(load_records(str(docs)), tokenizer, 16), 2).one_pass()]
    assert not all(np.array_equal(a["input_ids"], b) for a, b in zip(straight, loaded_order))  # shuffled


def test_a_wrong_column_is_one_line(tokenizer, docs):
    stream = stream_records(str(docs))
    batcher = StreamBatcher(lambda epoch, skip: stream.skip(skip), tokenizer, 16, 2, text_column="body")
    with pytest.raises(DataError, match=r"^data.train: records have no column 'body'; they have \['text'\]$"):
        next(iter(batcher))


def test_streaming_trains_and_resumes_exactly(testdata, tmp_path, docs):
    from qst_jax.train.trainer import Trainer
    from safetensors.numpy import load_file
    from tests.helpers import tiny_config, tiny_model_dir

    model_dir = tiny_model_dir(testdata, tmp_path)
    common = {"data.streaming": True, "data.eval": "", "data.seq_len": 16, "train.batch_size": 2,
              "train.eval_at_start": False, "optim.schedule": "constant", "optim.warmup_ratio": 0.0}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = tiny_config(model_dir, tmp_path / "a", **{**common, "train.steps": 6, "train.checkpoint_every": 0})
    straight.data.train = str(docs)
    Trainer(straight, log=lambda *a: None).run()
    cut = tiny_config(model_dir, tmp_path / "b", **{**common, "train.steps": 3, "train.checkpoint_every": 3})
    cut.data.train = str(docs)
    Trainer(cut, log=lambda *a: None).run()
    cut.train.steps = 6
    lines = []
    Trainer(cut, resume=True, log=lines.append).run()
    assert "resumed from step 3" in lines
    a, b = load_file(tmp_path / "a" / "run" / "side.safetensors"), load_file(tmp_path / "b" / "run" / "side.safetensors")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_streaming_refuses_what_it_cannot_do():
    from qst_jax.models.config import ConfigError
    from qst_jax.train.config import validate

    c = base_config()
    c.data.streaming, c.task, c.train.epochs = True, "classification", 2
    with pytest.raises(ConfigError) as err:
        validate(c)
    assert "  data.streaming: streams LM text (packed windows); task is 'classification'" in str(err.value)
    assert "  data.streaming: a stream's length is unknown before it is read; set train.steps, not train.epochs" \
        in str(err.value)

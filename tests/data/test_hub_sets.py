"""Data sets named on the Hub (`hf:org/name[:config][@split]`), read from a Hub cache laid out in
huggingface_hub's format: configs and splits from the card, ClassLabel names, slicing, refusals."""

from __future__ import annotations

import json

import pytest

from qst_jax.data.hub_sets import HubSet, class_names, load_hub_records, parse
from qst_jax.data.sources import DataError
from qst_jax.hub import HubError
from tests.helpers import tiny_config, tiny_model_dir
from tests.models.test_hub import lay_out_hub_cache

CARD = """---
configs:
- config_name: sst2
  data_files:
  - split: train
    path: sst2/train-*.parquet
  - split: validation
    path: sst2/validation-*.parquet
- config_name: cola
  data_files:
  - split: train
    path: cola/train-*.parquet
---
# A GLUE-like test set
"""


def _glue_like(folder):
    """sst2 (sentence, ClassLabel negative/positive; train 40 rows, validation 8) and cola, as parquet."""
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    words = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull"]
    for config in ("sst2", "cola"):
        (folder / config).mkdir(parents=True)
        for split, rows in (("train", 40), ("validation", 8)):
            if config == "cola" and split == "validation":
                continue
            data = {"sentence": [f"a {words[i % 8]} film, {i}" for i in range(rows)], "label": [i % 2 for i in range(rows)]}
            datasets.Dataset.from_dict(data, features=features).to_parquet(
                str(folder / config / f"{split}-00000-of-00001.parquet"))
    (folder / "README.md").write_text(CARD)


@pytest.fixture()
def hub_glue(tmp_path, monkeypatch):
    files = tmp_path / "glue-files"
    _glue_like(files)
    cache = tmp_path / "hub"
    lay_out_hub_cache(cache, "test-org/glue", files, kind="datasets")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_specs_parse():
    assert parse("hf:tatsu-lab/alpaca", "data.train") == HubSet("tatsu-lab/alpaca", None, "train")
    assert parse("hf:nyu-mll/glue:sst2", "data.eval") == HubSet("nyu-mll/glue", "sst2", "validation")
    assert parse("hf:org/set:c@train[:20]", "data.train") == HubSet("org/set", "c", "train[:20]")
    with pytest.raises(DataError, match=r"^data.train: 'hf:nope' is not a Hub data set; write hf:org/name"):
        parse("hf:nope", "data.train")


def test_a_cached_hub_set_reads_its_config_split_and_class_names(hub_glue):
    train = load_hub_records("hf:test-org/glue:sst2", "data.train")
    assert len(train) == 40 and train.column_names == ["sentence", "label"]
    assert class_names(train, "label") == ["negative", "positive"]
    assert len(load_hub_records("hf:test-org/glue:sst2", "data.eval")) == 8  # validation by default
    assert len(load_hub_records("hf:test-org/glue:sst2@train[:10]", "data.train")) == 10
    assert load_hub_records("hf:test-org/glue:cola", "data.train")[0]["sentence"] == "a good film, 0"


def test_a_missing_split_config_or_repo_is_one_line(hub_glue):
    with pytest.raises(DataError, match=r"^data.eval: hf:test-org/glue:cola: .*validation"):
        load_hub_records("hf:test-org/glue:cola", "data.eval")
    with pytest.raises(DataError, match=r"^data.train: hf:test-org/glue:mnli: .*mnli"):
        load_hub_records("hf:test-org/glue:mnli", "data.train")
    with pytest.raises(HubError, match=r"^test-org/other: not in the Hub cache and HF_HUB_OFFLINE is set: .*"
                                       r"`huggingface-cli download --repo-type dataset test-org/other`"):
        load_hub_records("hf:test-org/other", "data.train")


def test_qst_train_classifies_a_hub_set(hub_glue, testdata, tmp_path):
    from qst_jax.train.trainer import Trainer

    model_dir = tiny_model_dir(testdata, tmp_path)
    config = tiny_config(model_dir, tmp_path, **{"train.steps": 2, "train.eval_every": 0, "train.checkpoint_every": 0,
                                                 "data.seq_len": 16})
    config.task, config.data.text_column = "classification", "sentence"
    config.data.train, config.data.eval = "hf:test-org/glue:sst2", "hf:test-org/glue:sst2"
    summary = Trainer(config, log=lambda *a: None).run()
    assert summary["steps"] == 2 and 0.0 <= summary["eval_after"]["accuracy"] <= 1.0
    config.data.num_labels, config.train.output_dir = 3, str(tmp_path / "three")
    with pytest.raises(DataError, match=r"^data.train: hf:test-org/glue:sst2: column 'label' has 2 classes "
                                        r"\(negative, positive\); set data.num_labels=2$"):
        Trainer(config, log=lambda *a: None)
    config.data.text_column, config.data.num_labels = "text", 2
    with pytest.raises(DataError, match=r"missing column\(s\) \['text'\]; the data has \['sentence', 'label'\]"):
        Trainer(config, log=lambda *a: None)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


def test_chat_columns_are_named_by_config(tmp_path):
    """data.prompt_column / data.response_column (or data.messages_column) map a set's own column names."""
    from qst_jax.data.specs import build_examples
    from qst_jax.train.config import base_config
    from tests.helpers import save_tiny_tokenizer

    tokenizer = save_tiny_tokenizer(tmp_path / "tok")
    rows = tmp_path / "qa.jsonl"
    rows.write_text("".join(json.dumps({"question": f"to be {i}?", "answer": "or not to be"}) + "\n" for i in range(4)))
    c = base_config()
    c.task, c.data.seq_len = "chat", 64
    c.data.prompt_column, c.data.response_column = "question", "answer"
    examples = build_examples(c, tokenizer, str(rows), "data.train")
    assert len(examples.tokens) == 4 and all(m.sum() > 0 for m in examples.loss_masks)
    c.data.prompt_column = "query"
    with pytest.raises(DataError, match=r"^data.train: missing column\(s\) \['query'\]; the data has \['question', "
                                        r"'answer'\]$"):
        build_examples(c, tokenizer, str(rows), "data.train")


def test_a_hub_set_streams(hub_glue):
    from qst_jax.data.hub_sets import stream_hub_records

    stream = stream_hub_records("hf:test-org/glue:sst2", "data.train")
    records = list(stream)
    assert len(records) == 40 and records[0] == {"sentence": "a good film, 0", "label": 0}
    with pytest.raises(DataError, match=r"^data.train: hf:test-org/glue:sst2@train\[:10\]: a streamed split is read "
                                        r"whole; drop the slice"):
        stream_hub_records("hf:test-org/glue:sst2@train[:10]", "data.train")

"""Data paths: LM packing masks, chat-template masks, classification, batching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qst_jax.data.batches import Batcher, bucket_lengths
from qst_jax.data.examples import Examples, chat_example, chat_examples, classification_examples, lm_windows
from qst_jax.data.sources import DataError, load_records
from tests.helpers import save_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_lm_packing_never_counts_loss_across_documents(tokenizer, tmp_path):
    docs = ["to be or not to be", "the slings and arrows", "a sea of troubles"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ex = lm_windows(load_records(str(path)), tokenizer, seq_len=8)
    stream = np.concatenate(ex.tokens)
    mask = np.concatenate(ex.loss_masks)
    eos = tokenizer.eos_token_id
    lengths = [len(tokenizer(d, add_special_tokens=False).input_ids) + 1 for d in docs]
    assert all(len(t) == 8 for t in ex.tokens)
    # Documents are separated by EOS, and each document's first token is not a target.
    starts = np.cumsum([0] + lengths[:-1])
    for s in starts[1:]:
        if s < len(stream):
            assert stream[s - 1] == eos and mask[s] == 0
    assert mask.sum() == len(stream) - sum(1 for s in starts[1:] if s < len(stream))


def test_chat_mask_covers_assistant_replies_only(tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "who?"},
        {"role": "assistant", "content": "Hamlet"},
        {"role": "user", "content": "where?"},
        {"role": "assistant", "content": "Elsinore"},
    ]
    ids, mask = chat_example(tokenizer, messages, max_len=512)
    targets = tokenizer.decode(ids[mask == 1])
    assert targets == "Hamlet<|im_end|>\nElsinore<|im_end|>\n"
    assert "who?" in tokenizer.decode(ids[mask == 0])


def test_chat_records_in_three_layouts(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"instruction": "add", "input": "2 and 2", "output": "4"},
        {"prompt": "say yes", "response": "yes"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = chat_examples(load_records(str(path)), tokenizer, max_len=64)
    replies = [tokenizer.decode(t[m == 1]) for t, m in zip(ex.tokens, ex.loss_masks)]
    assert replies == ["hello<|im_end|>\n", "4<|im_end|>\n", "yes<|im_end|>\n"]


def test_unknown_chat_role(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "narrator", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match="unknown chat role 'narrator'"):
        chat_examples(load_records(str(path)), tokenizer, max_len=64)


def test_classification_pairs_and_labels(tokenizer, tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("a,b,y\nthe sea,of troubles,1\nto be,or not,0\n")
    ds = load_records(str(path))
    ex = classification_examples(ds, tokenizer, 32, num_labels=2, text_column="a", text_pair_column="b", label_column="y")
    assert ex.labels.tolist() == [1, 0]
    assert tokenizer.decode(ex.tokens[0]) == "the seaof troubles"
    reg = classification_examples(ds, tokenizer, 32, num_labels=1, text_column="a", label_column="y")
    assert reg.labels.dtype == np.float32


def test_label_names(tokenizer, tmp_path):
    path = tmp_path / "mnli.tsv"
    path.write_text("sentence1\tsentence2\tgold_label\na\tb\tneutral\nc\td\tcontradiction\n")
    ds = load_records(str(path))
    names = ("contradiction", "entailment", "neutral")
    ex = classification_examples(ds, tokenizer, 16, num_labels=3, text_column="sentence1",
                                 text_pair_column="sentence2", label_column="gold_label", label_names=names)
    assert ex.labels.tolist() == [2, 0]
    with pytest.raises(DataError, match=r"mnli.tsv, record 1: label 'neutral' is not one of \['yes', 'no'\]"):
        classification_examples(ds, tokenizer, 16, num_labels=2, text_column="sentence1",
                                label_column="gold_label", label_names=("yes", "no"))


def test_sst2_tsv_reads():
    import pathlib

    sst2 = pathlib.Path(__file__).parents[2] / "data" / "glue" / "sst2"
    dev, train = load_records(str(sst2 / "dev.tsv")), load_records(str(sst2 / "train.tsv"))
    assert dev.column_names == ["sentence", "label"] and len(dev) == 872
    assert len(train) == 67349 and set(train["label"]) == {0, 1}


def _examples(n: int = 30) -> Examples:
    rng = np.random.default_rng(0)
    tokens = [rng.integers(1, 100, rng.integers(3, 70)).astype(np.int32) for _ in range(n)]
    return Examples(tokens=tokens, loss_masks=[np.ones_like(t) for t in tokens])


def test_batches_bucketed_static_shapes():
    batcher = Batcher(_examples(), batch_size=2, micro_batches=2, buckets=bucket_lengths(128), seed=1)
    shapes = set()
    it = iter(batcher)
    for _ in range(batcher.steps_per_epoch):
        batch = next(it)
        shapes.add(batch["input_ids"].shape)
        lengths = batch["attention_mask"].sum(-1)
        assert batch["input_ids"].shape[:2] == (2, 2) and lengths.max() <= batch["input_ids"].shape[-1]
        assert np.all(batch["input_ids"][batch["attention_mask"] == 0] == 0)
    assert shapes <= {(2, 2, 32), (2, 2, 64), (2, 2, 128)}


def test_batcher_resumes_the_exact_sequence():
    a = Batcher(_examples(), batch_size=2, micro_batches=1, seed=3)
    it = iter(a)
    for _ in range(7):
        next(it)
    saved = a.state()
    expected = [next(it)["input_ids"] for _ in range(25)]  # crosses into the next epochs
    b = Batcher(_examples(), batch_size=2, micro_batches=1, seed=3)
    b.restore(saved)
    got = [batch["input_ids"] for batch, _ in zip(iter(b), range(25))]
    for x, y in zip(expected, got):
        np.testing.assert_array_equal(x, y)


def test_eval_pass_keeps_every_example_once():
    ex = _examples(7)
    batcher = Batcher(ex, batch_size=3, shuffle=False, drop_remainder=False)
    rows = sum(int((b["attention_mask"].sum(-1) > 0).sum()) for b in batcher.one_pass())
    assert rows == 7


@pytest.mark.parametrize("cell, what", [("0.5", "label 0.5"), ("", "an empty label"), ("yes", "label 'yes'")])
def test_class_labels_must_be_integers(tokenizer, tmp_path, cell, what):
    path = tmp_path / "cls.tsv"
    path.write_text(f"sentence\tlabel\ngood\t1\nbad\t{cell}\n")
    with pytest.raises(DataError, match=rf"^{path}, record 2: {what} in 'label'; class labels must be integer ids"):
        classification_examples(load_records(str(path)), tokenizer, 16, num_labels=2)


def test_json_labels_that_are_fractions_are_refused(tokenizer, tmp_path):
    path = tmp_path / "cls.jsonl"
    path.write_text('{"sentence": "a", "label": 1.0}\n{"sentence": "b", "label": 0.5}\n')
    with pytest.raises(DataError, match=rf"^{path}, record 2: label 0.5 in 'label'"):
        classification_examples(load_records(str(path)), tokenizer, 16, num_labels=2)


def test_unusable_chat_records_are_counted(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    good = {"prompt": "say yes", "response": "yes"}
    rows = [good, {"messages": [{"role": "user", "content": "hi"}]}, {"prompt": "p", "response": None},
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]},
            {"prompt": "long " * 80, "response": "ok"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = []
    ex = chat_examples(load_records(str(path)), tokenizer, max_len=32, log=lines.append)
    assert len(ex) == 1 and len(lines) == 1
    assert lines[0].startswith("warning: data: 4 of 5 chat records unusable: ")
    assert f"1 with no assistant turn ({path}, record 2)" in lines[0]
    assert f"2 with a turn with missing or null content ({path}, record 3, {path}, record 4)" in lines[0]
    assert f"1 with no response token within data.seq_len=32 ({path}, record 5)" in lines[0]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    with pytest.raises(DataError, match="^data: 4 of 4 chat records unusable"):
        chat_examples(load_records(str(path)), tokenizer, max_len=32)


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", '{"text": "a"}\n{"text": "b",\n', "bad.jsonl:2: not valid JSON"),
    ("bad.tsv", "sentence\tlabel\nok\t1\ntoo\tmany\tfields\n", r"bad.tsv:3: 3 fields, the header has 2"),
    ("quote.csv", 'text\n"an unclosed quote\nmore\n', r"quote.csv:3: not valid CSV \(unexpected end of data\)$"),
    ("blank.jsonl", "  \n\n\t\n", r"blank.jsonl: no records \(only whitespace\)$"),
])
def test_parse_errors_name_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        load_records(str(tmp_path / name))


def test_invalid_utf8_names_file_and_line(tmp_path):
    (tmp_path / "latin.tsv").write_bytes(b"sentence\tlabel\nok\t1\ncaf\xe9\t0\n")
    with pytest.raises(DataError, match=r"latin.tsv:3: not UTF-8 \(byte 0xe9\)"):
        load_records(str(tmp_path / "latin.tsv"))


def test_text_format_takes_only_text_files_of_a_mixed_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("plain prose")
    (tmp_path / "records.jsonl").write_text('{"text": "json"}\n')
    ds = load_records(str(tmp_path), format="text")
    assert ds["text"] == ["plain prose"]
    with pytest.raises(DataError, match="cannot tell one format"):
        load_records(str(tmp_path))


def test_a_comma_inside_a_path(tmp_path):
    folder = tmp_path / "a,b"
    folder.mkdir()
    (folder / "x.txt").write_text("one")
    (tmp_path / "y.txt").write_text("two")
    spec = str(folder / "x.txt").replace(",", "\\,") + "," + str(tmp_path / "y.txt")
    assert load_records(spec)["text"] == ["one", "two"]

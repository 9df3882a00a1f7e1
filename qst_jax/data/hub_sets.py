"""Data sets named on the Hugging Face Hub: `hf:org/name[:config][@split]`, read with `datasets`.

    load_hub_records("hf:tatsu-lab/alpaca@train[:2000]", "data.train")
    load_hub_records("hf:nyu-mll/glue:sst2@validation", "data.eval")

The repo's files come through `qst_jax.hub` (huggingface_hub: its cache,
token, endpoint and offline mode; with a config, its folder first), then
`datasets.load_dataset` reads the snapshot as the data set's own card
(`README.md`'s `configs`) lays it out, with the split (and slicing, e.g.
`train[:2000]`) asked for. The default split is `train` for `data.train`
and `validation` for `data.eval`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from qst_jax.data.sources import DataError
from qst_jax.hub import download, is_repo_id

PREFIX = "hf:"
_SPEC = re.compile(r"^hf:(?P<repo>[^:@\s]+)(?::(?P<config>[^@\s]+))?(?:@(?P<split>\S+))?$")


@dataclasses.dataclass(frozen=True)
class HubSet:
    """A data set on the Hub: repo, config (None: the default) and split (datasets' split syntax)."""

    repo: str
    config: str | None
    split: str


def is_hub_set(spec: str) -> bool:
    return spec.strip().startswith(PREFIX)


def parse(spec: str, where: str) -> HubSet:
    """`hf:org/name[:config][@split]`; the split defaults to "validation" for `data.eval`, else "train".

    Raises:
      DataError: not of that form.
    """
    m = _SPEC.match(spec.strip())
    if not m or not is_repo_id(m["repo"]):
        raise DataError(f"{where}: {spec!r} is not a Hub data set; write hf:org/name, hf:org/name:config, "
                        "hf:org/name:config@split (e.g. hf:nyu-mll/glue:sst2@validation)")
    return HubSet(m["repo"], m["config"], m["split"] or ("validation" if where == "data.eval" else "train"))


def load_hub_records(spec: str, where: str) -> Any:
    """The `datasets.Dataset` of a Hub data set spec (one split).

    Raises:
      HubError: the repo cannot be had (`qst_jax.hub`).
      DataError: no such config or split (naming the ones there are), or no records.
    """
    import datasets

    hub_set = parse(spec, where)
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(_fetch(hub_set, where), hub_set.config, split=hub_set.split)
    except ValueError as err:  # an unknown config or split: datasets names the ones there are
        raise DataError(f"{where}: {spec}: {_first_line(err)}") from None
    if len(ds) == 0:
        raise DataError(f"{where}: {spec}: the split is empty")
    return ds


def stream_hub_records(spec: str, where: str) -> Any:
    """A Hub data set spec's split as a `datasets.IterableDataset` (its files fetched, then read as iterated).

    Raises:
      HubError: the repo cannot be had. DataError: a sliced split (a stream
        is read whole), no such config or split.
    """
    import datasets

    hub_set = parse(spec, where)
    if "[" in hub_set.split:
        raise DataError(f"{where}: {spec}: a streamed split is read whole; drop the slice [...] (or set "
                        "data.streaming=false)")
    local = _fetch(hub_set, where)
    try:
        return datasets.load_dataset(local, hub_set.config, split=hub_set.split, streaming=True)
    except ValueError as err:
        raise DataError(f"{where}: {spec}: {_first_line(err)}") from None


def _fetch(hub_set: HubSet, where: str) -> str:
    """The local snapshot of the data set's repo (with a config: its folder first, the whole repo if it has none)."""
    if hub_set.config:  # most repos keep a config's files in a folder of its name: fetch only that
        local = download(hub_set.repo, repo_type="dataset", allow_patterns=[f"{hub_set.config}/*", "README.md"],
                         field=where)
        if os.path.isdir(os.path.join(local, hub_set.config)):
            return local
    return download(hub_set.repo, repo_type="dataset", field=where)


def class_names(ds: Any, column: str) -> list[str] | None:
    """The class names of `column` when the data set declares it a `ClassLabel`, else None."""
    import datasets

    feature = ds.features.get(column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0]

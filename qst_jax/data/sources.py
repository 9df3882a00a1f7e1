"""Local records through `datasets`: jsonl, json, csv, tsv, parquet, text folders.

Only local files are read. A `.txt` file or a folder of them gives one record per file
(a document) in column `text`.

Nothing is fetched: `qst_jax` sets `HF_DATASETS_OFFLINE=1` on import.
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Sequence

FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "text",
}


class DataError(ValueError):
    """A dataset that cannot be used as configured."""


def _expand(paths: str | Sequence[str]) -> list[str]:
    if isinstance(paths, str):
        paths = [p for p in paths.split(",") if p]
    files: list[str] = []
    for path in paths:
        path = os.path.expanduser(path)
        if os.path.isdir(path):
            found = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f))
            found = [f for f in found if os.path.splitext(f)[1] in FORMATS]
            if not found:
                raise DataError(f"{path}: folder holds no {sorted(FORMATS)} files")
            files += found
        elif any(ch in path for ch in "*?["):
            matched = sorted(glob.glob(path))
            if not matched:
                raise DataError(f"{path}: no file matches")
            files += matched
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    return files


def load_records(paths: str | Sequence[str], *, format: str | None = None):
    """A `datasets.Dataset` of the records in local `paths`.

    Args:
      paths: files, folders, globs, or a comma-separated string of them; all
        of one format.
      format: "json", "csv", "tsv", "parquet" or "text"; default from the
        file extension.

    Raises:
      DataError: a missing path, mixed or unknown formats, or no records.
    """
    import datasets

    datasets.disable_progress_bars()
    files = _expand(paths)
    kinds = {format or FORMATS.get(os.path.splitext(f)[1]) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"{files}: cannot tell one format from the extensions ({sorted(map(str, kinds))}); set data.format")
    kind = kinds.pop()
    if all(os.path.getsize(f) == 0 for f in files):
        raise DataError(f"{', '.join(files)}: the dataset is empty")
    try:
        ds = _load(datasets, kind, files)
    except (ValueError, StopIteration, datasets.exceptions.DatasetGenerationError) as err:
        raise DataError(f"{', '.join(files)}: cannot read as {kind}: {err}") from err
    if len(ds) == 0:
        raise DataError(f"{', '.join(files)}: the dataset is empty")
    return ds


def _load(datasets, kind: str, files: list[str]):
    if kind == "tsv":
        return datasets.load_dataset(
            "csv", data_files=files, split="train", delimiter="\t", quoting=csv.QUOTE_NONE, keep_default_na=False
        )
    if kind == "csv":
        return datasets.load_dataset("csv", data_files=files, split="train", keep_default_na=False)
    if kind == "text":
        return datasets.load_dataset("text", data_files=files, split="train", sample_by="document")
    return datasets.load_dataset(kind, data_files=files, split="train")


def require_columns(ds, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c and c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; the data has {ds.column_names}")

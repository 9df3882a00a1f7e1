"""Local records through `datasets`: jsonl, json, csv, tsv, parquet, text folders.

Only local files are read. A `.txt` file or a folder of them gives one record per file
(a document) in column `text`. Nothing is fetched for local files.

A path list is comma-separated; a comma inside a path is written `\\,`.
When a file cannot be parsed, the error names the file and the 1-based line
(invalid UTF-8, JSON, or a row with the wrong number of fields), and
`record_location` names the file and record of any row of a loaded dataset.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
from collections.abc import Sequence
from typing import Any
from qst_jax.errors import QSTError

FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "text",
}


class DataError(QSTError, ValueError):
    """A dataset that cannot be used as configured."""


def split_paths(spec: str) -> list[str]:
    """The paths of a comma-separated list; `\\,` is a comma inside a path."""
    return [p.replace("\\,", ",") for p in re.split(r"(?<!\\),", spec) if p]


def _expand(paths: str | Sequence[str], format: str | None = None) -> list[str]:
    """Files of `paths`; a folder gives its files of `format` (default: of every known format)."""
    split = isinstance(paths, str) and len(split_paths(paths)) > 1
    if isinstance(paths, str):
        paths = split_paths(paths)
    hint = "; the paths were split at commas (write \\, for a comma inside a path)" if split else ""
    wanted = [ext for ext, kind in FORMATS.items() if kind == format] if format else list(FORMATS)
    files: list[str] = []
    for path in paths:
        path = os.path.expanduser(path)
        if os.path.isdir(path):
            found = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f))
            found = [f for f in found if os.path.splitext(f)[1] in wanted]
            if not found:
                raise DataError(f"{path}: folder holds no {sorted(wanted)} files")
            files += found
        elif any(ch in path for ch in "*?["):
            matched = sorted(glob.glob(path))
            if not matched:
                raise DataError(f"{path}: no file matches")
            files += matched
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or directory{hint}")
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
    files = _expand(paths, format)
    kinds = {format or FORMATS.get(os.path.splitext(f)[1]) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"{files}: cannot tell one format from the extensions ({sorted(map(str, kinds))}); set data.format")
    kind = kinds.pop()
    if all(os.path.getsize(f) == 0 for f in files):
        raise DataError(f"{', '.join(files)}: the dataset is empty")
    for f in files:  # invalid UTF-8 or JSON, a short row, no records: named by file and line before datasets reads
        _check_text(f, kind)
    if kind != "parquet" and all(_blank(f) for f in files):
        raise DataError(f"{', '.join(files)}: no records (only whitespace)")
    try:
        ds = _load(datasets, kind, files)
    except (ValueError, StopIteration, datasets.exceptions.DatasetGenerationError) as err:
        raise DataError(f"{', '.join(files)}: cannot read as {kind}: {err}") from err
    if len(ds) == 0:
        raise DataError(f"{', '.join(files)}: the dataset is empty")
    ds.qst_source = (kind, files)  # for record_location
    return ds


def _blank(path: str) -> bool:
    with open(path, "rb") as f:
        return not f.read().decode("utf-8-sig").strip()


def _csv_dialect(kind: str) -> tuple[str, int]:
    """(delimiter, quoting) of a "tsv" (GLUE: no quoting) or "csv" file, as `_load` reads them."""
    return ("\t", csv.QUOTE_NONE) if kind == "tsv" else (",", csv.QUOTE_MINIMAL)


def _check_text(path: str, kind: str) -> None:
    """Names the file and 1-based line of invalid UTF-8, JSON, or a row with the wrong field count."""
    if kind == "parquet":
        return
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is not text (datasets drops it too)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x}); save the file as UTF-8") from None
    if kind == "json" and path.endswith(".json") and text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    elif kind == "json":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    elif kind in ("csv", "tsv"):
        delimiter, quoting = _csv_dialect(kind)
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
        try:
            header = next(reader, None)
            for row in reader:
                if row and header is not None and len(row) != len(header):
                    raise DataError(
                        f"{path}:{reader.line_num}: {len(row)} fields, the header has {len(header)} ({header})"
                    )
        except csv.Error as err:  # an unclosed quote, a stray quote in a field
            raise DataError(f"{path}:{reader.line_num}: not valid {kind.upper()} ({err})") from None


def _record_counts(kind: str, files: list[str]) -> list[int]:
    counts = []
    for path in files:
        if kind == "text":
            counts.append(1)
        elif kind == "parquet":
            import pyarrow.parquet as pq

            counts.append(pq.ParquetFile(path).metadata.num_rows)
        elif kind == "json" and path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            counts.append(len(json.loads(text)) if text.lstrip().startswith("[") else
                          sum(1 for line in text.splitlines() if line.strip()))
        elif kind == "json":
            with open(path, encoding="utf-8") as f:
                counts.append(sum(1 for line in f if line.strip()))
        else:
            delimiter, quoting = _csv_dialect(kind)
            with open(path, newline="", encoding="utf-8") as f:
                counts.append(max(sum(1 for row in csv.reader(f, delimiter=delimiter, quoting=quoting) if row) - 1, 0))
    return counts


def record_location(ds: Any, row: int, where: str = "data") -> str:
    """`"<file>, record <k>"` (1-based within that file) of row `row` of a `load_records` dataset."""
    source = getattr(ds, "qst_source", None)
    if source is None:
        return f"{where} row {row}"
    kind, files = source
    for path, count in zip(files, _record_counts(kind, files)):
        if row < count:
            return f"{path}, record {row + 1}"
        row -= count
    return f"{where} row {row}"


def _load(datasets, kind: str, files: list[str], streaming: bool = False):
    """The records of `files` of one format through `datasets` (an `IterableDataset` with `streaming`)."""
    common = {"data_files": files, "split": "train", "streaming": streaming}
    if kind == "tsv":
        return datasets.load_dataset("csv", delimiter="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, **common)
    if kind == "csv":
        return datasets.load_dataset("csv", keep_default_na=False, **common)
    if kind == "text":  # utf-8-sig: a byte-order mark is dropped, as the json and csv readers drop it
        return datasets.load_dataset("text", sample_by="document", encoding="utf-8-sig", **common)
    return datasets.load_dataset(kind, **common)


def stream_records(paths: str | Sequence[str], *, format: str | None = None):
    """The records of local `paths` as a `datasets.IterableDataset`: read as iterated, never all in memory.

    Raises:
      DataError: a missing path, or mixed or unknown formats.
    """
    import datasets

    files = _expand(paths, format)
    kinds = {format or FORMATS.get(os.path.splitext(f)[1]) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"{files}: cannot tell one format from the extensions ({sorted(map(str, kinds))}); set data.format")
    return _load(datasets, kinds.pop(), files, streaming=True)


def require_columns(ds, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c and c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; the data has {ds.column_names}")

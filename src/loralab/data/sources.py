"""Where `data.path` points: a data file read by formats.py (JSON, JSONL, text), or a Hugging Face
`datasets` source read with the `datasets` library (the `loralab[data]` extra, imported only here):
a `Dataset.save_to_disk` / `DatasetDict.save_to_disk` folder, a Parquet file or a CSV file.

Each row becomes a record under loralab's field names (formats.FIELDS). With `data.columns`
(`{instruction: question, output: answer}`) only the named columns are read, renamed to those
fields; without it a row is read as it is, like a JSON record. Rows are named `file row N` (1-based)
in messages. A DatasetDict gives its "train" split, or its only one.
"""
from __future__ import annotations

import csv
import numbers
import os
import tempfile
from pathlib import Path

from ..errors import UserError
from ..io import reading
from .formats import FIELDS, check_columns, load_examples, parse_record

TABLE_SUFFIXES = (".parquet", ".csv")
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


def is_dataset_source(path: str | Path) -> bool:
    p = Path(path)
    if p.is_dir():
        return any((p / m).is_file() for m in _DATASET_MARKERS)
    return p.suffix.lower() in TABLE_SUFFIXES


def load_data(path: str | Path, columns: dict | None = None, parse=None, fields: tuple = FIELDS) -> list:
    """data.path (+ data.columns) -> Examples (or what `parse(record, source)` makes of each record, with
    `fields` its record's names: preference pairs), whatever the source."""
    if is_dataset_source(path) and Path(path).exists():
        if not Path(path).is_dir():  # a .csv that is a FIFO would block datasets' reader
            reading.check_file(path, "data file")
        return load_dataset_examples(path, columns, parse, fields)
    return load_examples(path, columns, parse, fields)


def _text_features(p: Path, datasets):
    """A CSV's header columns, each typed as text (None for a file without a header: datasets says why)."""
    with open(p, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), None)
    return datasets.Features({c: datasets.Value("string") for c in header}) if header else None


def _open(p: Path, cache_dir: str):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never wait on a hub
    try:
        import datasets
    except ImportError:
        raise UserError(f"{p}: reading a datasets folder, Parquet or CSV needs the datasets package "
                        "(pip install 'loralab[data]')") from None
    datasets.disable_progress_bars()
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
        elif p.suffix.lower() == ".parquet":
            ds = datasets.Dataset.from_parquet(str(p), cache_dir=cache_dir)
        else:  # every column as text: a CSV has no types, and inferred ones turn 007 into 7 and 42 into 42.0
            ds = datasets.Dataset.from_csv(str(p), cache_dir=cache_dir, features=_text_features(p, datasets))
    except Exception as e:  # pyarrow / datasets raise many types on a bad file
        raise UserError(f"{p}: cannot read it with datasets ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "train" not in ds and len(splits) != 1:
            raise UserError(f"{p}: a DatasetDict without a 'train' split (splits: {', '.join(splits)}); "
                            "save the split to train on")
        ds = ds["train" if "train" in ds else splits[0]]
    return ds


def _as_text(value):
    """A number in a typed table (a Parquet int or float column) as the text it stands for: a column of
    answers such as 42 trains as "42". Booleans stay as they are (parse_record refuses them in one
    line): True is not an answer anyone wrote as text."""
    if isinstance(value, numbers.Number) and not isinstance(value, (bool, complex)):
        return str(value)
    return value


def load_dataset_examples(path: str | Path, columns: dict | None = None, parse=None,
                          fields: tuple = FIELDS) -> list:
    p = Path(path)
    name = str(path)
    columns = check_columns(columns, fields)
    parse = parse or parse_record
    with tempfile.TemporaryDirectory(prefix="loralab-datasets-") as cache_dir:  # no copies left in ~/.cache
        ds = _open(p, cache_dir)
        have = list(ds.column_names)
        if columns is not None:
            missing = [c for c in columns.values() if c not in have]
            if missing:
                raise UserError(f"{name}: data.columns names {', '.join(map(repr, missing))}, not a column of the "
                                f"dataset (its columns: {', '.join(have)})")
            ds = ds.select_columns(list(dict.fromkeys(columns.values())))
        elif not set(have) & set(fields):
            raise UserError(f"{name}: none of its columns ({', '.join(have)}) is a loralab field "
                            f"({', '.join(fields)}); map them with data.columns, e.g. "
                            f"data.columns={{instruction: {have[0] if have else 'question'}, output: ...}}")
        rows = ds.to_list()
    if not rows:
        raise UserError(f"{name}: the dataset has no rows")
    out = []
    for i, row in enumerate(rows):
        src = f"{name} row {i + 1}"
        record = {f: row[c] for f, c in columns.items()} if columns is not None else row
        out.append(parse({k: _as_text(v) for k, v in record.items() if v is not None}, src))  # empty: absent
    return out

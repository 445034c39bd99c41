"""``tokmask predict`` file to file: rows in (CSV, TSV, JSONL or plain text), one row out per row in.

Every input column besides the text is carried through, so an id stays with its prediction; the
output adds the label (token tasks: one per word), the probabilities, whether ``max_length`` cut the
text short, and the adapter used. A row without text gets an ``error`` and no label, never a shifted
neighbour's. Token tasks read pre-split words (a JSONL list, e.g. ``"tokens": [...]``) or split the
text on whitespace.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import IO, Iterator

from .data import Example, decode_lines, delimited_rows

INPUT_FORMATS = ("text", "csv", "tsv", "jsonl")
OUTPUT_FORMATS = ("jsonl", "csv")
SUFFIXES = {".txt": "text", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
PROGRESS_FROM = 2048  # inputs; fewer finish before a bar would say anything


def input_format(path: str, given: str | None) -> str:
    """``given``, else from the file's suffix; stdin and unknown suffixes are plain text."""
    return given or SUFFIXES.get(Path(path).suffix.lower(), "text")


def output_format(path: str, given: str | None) -> str:
    return given or ("csv" if Path(path).suffix.lower() == ".csv" else "jsonl")


NO_VALUE = "no value for column"


def read_rows(stream: IO[bytes], name: str, fmt: str, text_column: str, task: str,
              encoding_errors: str = "strict", pair_column: str | None = None) -> list[Example]:
    """One Example per input row, in order: ``text`` is the text (or word list), ``pair`` the second text
    of a sentence pair (``pair_column``), ``label`` holds the row's fields to carry through, ``source`` is
    ``file:line``. Blank text, or a CSV row short of a text column, gives ``text=None`` (the row is answered
    with an error, never skipped)."""
    lines = decode_lines(stream, name, encoding_errors, option="--encoding-errors")
    if fmt == "text":
        if pair_column:
            raise ValueError(f"{name}: plain text holds one text per line; sentence pairs need csv, tsv or jsonl "
                             "input (--text-column and --text-pair-column)")
        key = "words" if task == "token" else "text"
        return [_example(line.rstrip("\r\n"), {key: None}, key, task, f"{name}:{n}") for n, line in lines]
    rows = (_jsonl_rows(lines, name, text_column, task) if fmt == "jsonl"
            else _delimited_rows(lines, name, "\t" if fmt == "tsv" else ",", text_column, task))
    return [with_pair(row, pair_column) if pair_column else row for row in rows]


def with_pair(row: Example, column: str) -> Example:
    """``row`` with its second text from ``column``; a row without one is answered with an error."""
    second = row.label.get(column)
    if row.text is None:
        return row
    if not isinstance(second, str) or not second.strip():
        why = f"{NO_VALUE} '{column}'" if second is None else f"column '{column}' holds no text"
        return Example(None, {**row.label, "error": why}, row.source)
    return Example(row.text, row.label, row.source, second)


def _example(text, fields: dict, key: str, task: str, where: str) -> Example:
    if isinstance(text, str):
        words = text.split()
        value = (words if task == "token" else text) if text.strip() else None
        fields = {**fields, key: words if task == "token" and key == "words" else text}
    elif isinstance(text, list) and task == "token" and all(isinstance(w, str) for w in text):
        value = text or None
    else:
        raise ValueError(f"{where}: column '{key}' holds {json.dumps(text)[:60]}; expected "
                         + ("a string or a list of words" if task == "token" else "a string"))
    return Example(value, fields, where)


def _jsonl_rows(lines: Iterator[tuple[int, str]], name: str, column: str, task: str) -> Iterator[Example]:
    for n, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or column not in row:
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{name}:{n}: no field '{column}' (found {found}); choose the text with --text-column")
        yield _example(row[column], row, column, task, f"{name}:{n}")


def _delimited_rows(lines, name: str, delimiter: str, column: str, task: str) -> Iterator[Example]:
    header, rows = delimited_rows(lines, name, delimiter)
    if header is None or column not in header:
        raise ValueError(f"{name}:1: no column '{column}' (columns: {header or 'none'}); "
                         "choose the text with --text-column")
    for line, row in rows:
        where = f"{name}:{line}"
        if None in row:
            raise ValueError(f"{where}: more fields than the header's {len(header)}")
        if row[column] is None:  # a short row: answered with an error, the rows after it still predicted
            yield Example(None, {**{k: v for k, v in row.items() if v is not None}, "error": f"{NO_VALUE} '{column}'"},
                          where)
            continue
        yield _example(row[column], row, column, task, where)


def predictions(clf, rows: list[Example], batch_size: int, tta: int) -> list[dict | None]:
    """``clf.predict`` for the rows with text (None for the others), with a bar on long inputs."""
    from tqdm.auto import tqdm

    todo = [r for r in rows if r.text is not None]
    results: list[dict] = []
    chunk = max(batch_size, 256)
    with tqdm(total=len(todo), desc="predict", unit="text", disable=None if len(todo) >= PROGRESS_FROM else True,
              file=sys.stderr) as bar:
        for start in range(0, len(todo), chunk):
            results += clf.predict(todo[start:start + chunk], batch_size, tta=tta)
            bar.update(len(todo[start:start + chunk]))
    it = iter(results)
    return [next(it) if r.text is not None else None for r in rows]


def output_rows(rows: list[Example], results: list[dict | None], adapter: str, task: str,
                empty: str = "empty text") -> Iterator[dict]:
    """Each input row's fields, then the prediction (or an error saying why there is none)."""
    for row, result in zip(rows, results):
        if result is None:
            yield {**row.label, "labels" if task == "token" else "label": None, "error": row.label.get("error", empty),
                   "adapter": adapter}
        else:
            yield {**row.label, **result, "adapter": adapter}


def write_jsonl(out: IO[str], records: Iterator[dict]) -> None:
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")


def write_csv(out: IO[str], records: list[dict], labels: list[str]) -> None:
    """Input columns, then label(s), one ``prob_<label>`` column per label, truncated, adapter, error."""
    flat = []
    for record in records:
        record = dict(record)
        probs = record.pop("probs", None) or {}
        scores = record.pop("scores", None)
        if scores is not None:  # multi-label: the labels on, ';'-joined, and a score column per label
            record["labels"] = ";".join(record["labels"])
            record.update({f"score_{lab}": scores.get(lab) for lab in labels})
        elif isinstance(record.get("labels"), list):  # token task: one label per word, space-separated
            record["labels"] = " ".join(str(lab) for lab in record["labels"])
        for key, value in record.items():
            if isinstance(value, list):
                record[key] = " ".join(map(str, value))
        flat.append({**record, **{f"prob_{lab}": probs.get(lab) for lab in labels if probs}})
    columns: list[str] = []
    for record in flat:
        columns += [k for k in record if k not in columns]
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)

"""Text in, tokens out: readers (LinCE CoNLL, CSV/TSV/JSONL, HF datasets), label maps,
tokenisation with word-to-sub-word label alignment, padding collators and length-grouped batches.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .console import TokmaskWarning

IGNORE_INDEX = -100
# The paper folds LinCE LID tags to three classes: English, Spanish, everything else.
PAPER_LID_FOLD = {"lang1": "lang1", "lang2": "lang2"}


@dataclasses.dataclass
class Example:
    """One text (a string, or a list of words for token classification) and its label: a name
    (single-label), a list of names (multi-label; token tags), or a number (regression)."""

    text: str | list[str]
    label: str | list[str] | float | None
    source: str = ""
    """``file:line`` where the example starts, for error messages."""
    pair: str | None = None
    """The second text of a sentence pair (``data.text_pair_column``), or None."""
    tags: list[str] | None = None
    """Each word's tag as the file has it (LinCE: lang1, lang2, ne, …, unfolded), where the file tags words:
    entity redaction (``robustness``) reads the ``ne`` ones."""


@dataclasses.dataclass(frozen=True)
class LabelFormat:
    """How a table's label fields read for a problem type (``model.problem_type``)."""

    problem: str = "single_label"
    separator: str = ";"
    """Multi-label: names joined in one column (GoEmotions' ``anger;joy``)."""
    columns: tuple[str, ...] = ()
    """Multi-label: one 0/1 column per label, instead of one joined column."""

    def read(self, row: dict, label_column: str, where: str):
        """The label of one table row, or a ValueError naming where and which column."""
        if self.problem == "multi_label" and self.columns:
            return [name for name in self.columns if _flag(row, name, where)]
        value = row[label_column]
        if self.problem == "regression":
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = float("nan")
            if isinstance(value, bool) or not math.isfinite(number):
                raise ValueError(f"{where}: column {label_column!r} must be a finite number for regression, "
                                 f"got {value!r}")
            return number
        if self.problem == "multi_label":
            names = value if isinstance(value, list) else str(value).split(self.separator)
            names = [str(n).strip() for n in names if str(n).strip()]
            if not names:
                raise ValueError(f"{where}: column {label_column!r} holds no label (an empty label set); "
                                 f"multi-label names are joined with {self.separator!r}")
            return names
        return value if isinstance(value, list) else str(value)


def _flag(row: dict, column: str, where: str) -> bool:
    value = row.get(column)
    if value is None:
        raise ValueError(f"{where}: no value for label column {column!r} (data.label_columns)")
    if str(value).strip() not in ("0", "1", "0.0", "1.0", "True", "False", "true", "false"):
        raise ValueError(f"{where}: label column {column!r} must be 0 or 1, got {value!r}")
    return str(value).strip() in ("1", "1.0", "True", "true")


def _where(path: Path, line: int) -> str:
    return f"{path}:{line}"


# ---- readers --------------------------------------------------------------------------------


def decoded_lines(path: str | Path, errors: str = "strict") -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 file, line ends kept. Bytes that are not UTF-8 are an error
    naming file and line (``errors='strict'``), or replaced with U+FFFD and counted in one warning."""
    with Path(path).open("rb") as f:
        yield from decode_lines(f, str(path), errors)


def decode_lines(stream: Iterable[bytes], name: str, errors: str = "strict",
                 option: str = "data.encoding_errors") -> Iterator[tuple[int, str]]:
    """:func:`decoded_lines` for any stream of byte lines (stdin's buffer, say) called ``name``; ``option``
    is how the user asks for ``errors="replace"`` where the stream comes from."""
    replaced = 0
    for lineno, raw in enumerate(stream, 1):
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if errors == "strict":
                raise ValueError(f"{name}:{lineno}: bytes that are not UTF-8 ({raw[e.start:e.end]!r} at "
                                 f"byte {e.start + 1} of the line); fix the file, or set "
                                 f"{option}=replace to replace them (counted in a warning)") from None
            replaced += 1
            yield lineno, raw.decode("utf-8", errors="replace")
    if replaced:
        warnings.warn(f"{name}: {replaced} line(s) held bytes that are not UTF-8; replaced with U+FFFD "
                      f"({option}=replace)", TokmaskWarning, stacklevel=2)


def read_lince(path: str | Path, task: str, fold_tags: bool = True, errors: str = "strict") -> list[Example]:
    """Read a LinCE CoNLL file: blank-line separated sentences of ``token<TAB>tag`` lines.

    ``task='sequence'`` takes the sentence label from the ``# sent_enum = N<TAB>label`` header
    (sentiment files); ``task='token'`` takes one tag per token (LID), folded to lang1 / lang2 /
    other when ``fold_tags``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    examples: list[Example] = []
    words: list[str] = []
    tags: list[str] = []
    raw_tags: list[str] = []
    header_label: str | None = None
    header_line: int | None = None  # where the current sentence's header was
    start = 0

    def flush():
        nonlocal words, tags, raw_tags, header_label, header_line
        if words:
            if task == "sequence":
                if header_label is None:
                    raise ValueError(f"{_where(path, start)}: sentence has no label in its '# sent_enum' header "
                                     "(is this a sentiment file?)")
                examples.append(Example(" ".join(words), header_label, _where(path, start), tags=raw_tags))
            else:
                examples.append(Example(words, tags, _where(path, start), tags=raw_tags))
        elif header_label is not None:
            raise ValueError(f"{_where(path, start)}: sentence header with no tokens")
        words, tags, raw_tags, header_label, header_line = [], [], [], None, None

    for lineno, raw in decoded_lines(path, errors):
        line = raw.rstrip("\n").rstrip("\r")
        if not line.strip():
            flush()
            continue
        if line.startswith("# sent_enum"):
            flush()
            start = header_line = lineno
            fields = line.split("\t")
            header_label = fields[1].strip() if len(fields) > 1 and fields[1].strip() else None
            if task == "token":
                header_label = None
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0] or not fields[1].strip():
            raise ValueError(f"{_where(path, lineno)}: expected 'token<TAB>tag', got {line!r}")
        if not words and header_line is None:
            start = lineno
        tag = fields[1].strip()
        words.append(fields[0])
        raw_tags.append(tag)
        tags.append(PAPER_LID_FOLD.get(tag, "other") if fold_tags else tag)
    flush()
    if not examples:
        raise ValueError(f"{path}: no sentences found (empty file?)")
    return examples


def read_table(path: str | Path, fmt: str, text_column: str = "text", label_column: str = "label",
               errors: str = "strict", pair_column: str | None = None,
               labels: LabelFormat = LabelFormat()) -> list[Example]:
    """Read CSV / TSV / JSONL rows; for token classification a row's text and label are lists. With
    ``pair_column`` each row is a sentence pair; ``labels`` says how its label fields read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    rows: list[tuple[int, dict]] = []
    lines = decoded_lines(path, errors)
    if fmt == "jsonl":
        for lineno, line in lines:
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{_where(path, lineno)}: not valid JSON ({e.msg})") from None
    else:
        rows = delimited_rows(lines, str(path), "\t" if fmt == "tsv" else ",")[1]
    if not rows:
        raise ValueError(f"{path}: no rows found (empty file?)")
    examples = []
    for lineno, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{_where(path, lineno)}: expected a JSON object per line, got {type(row).__name__}")
        needed = (text_column, pair_column, *(() if labels.columns else (label_column,)))
        for column in filter(None, needed):
            if column not in row:
                raise ValueError(f"{_where(path, lineno)}: no column {column!r} (columns: {sorted(map(str, row))})")
            if row[column] is None:  # a CSV row with fewer fields than the header, or a JSON null
                raise ValueError(f"{_where(path, lineno)}: no value for column {column!r} (a short row, or null)")
        where = _where(path, lineno)
        pair = row[pair_column] if pair_column else None
        if pair_column and isinstance(pair, str) and not pair.strip():
            raise ValueError(f"{where}: column {pair_column!r} is empty (the second text of the pair)")
        examples.append(Example(row[text_column], labels.read(row, label_column, where), where, pair))
    return examples


CSV_FIELD_LIMIT = 1 << 26
"""The longest CSV/TSV field read (64 MiB): the csv module's own default, 128 KiB, refuses long texts."""


def delimited_rows(lines: Iterable[tuple[int, str]], name: str,
                   delimiter: str) -> tuple[list[str] | None, list[tuple[int, dict]]]:
    """(header, [(line, row)]) of a CSV/TSV file's decoded lines; a malformed file is an error naming its line."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.DictReader((line for _, line in lines), delimiter=delimiter)
    rows = []
    try:
        for row in reader:
            rows.append((reader.line_num, row))
        header = reader.fieldnames
    except csv.Error as e:
        kind, hint = ("TSV" if delimiter == "\t" else "CSV"), ""
        if "new-line character" in str(e):
            hint = "; its lines end with a lone carriage return (old Mac style): convert them to newlines"
        raise ValueError(f"{name}:{reader.line_num + 1}: not valid {kind} ({e}){hint}") from None
    return header, rows


def read_hf(name: str, split: str, text_column: str, label_column: str, pair_column: str | None = None,
            labels: LabelFormat = LabelFormat()) -> list[Example]:
    """A Hugging Face dataset (hub id or local directory); needs the ``datasets`` extra."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("data.format 'hf' needs the datasets package: pip install 'tokmask-peft[datasets]'") from e
    path = Path(name)
    ds = datasets.load_from_disk(str(path))[split] if path.is_dir() and (path / "dataset_dict.json").exists() \
        else datasets.load_dataset(name, split=split)
    feature = ds.features.get(label_column)
    names = getattr(feature, "names", None) or getattr(getattr(feature, "feature", None), "names", None)

    def named(value):  # ClassLabel ids (or a list of them) → names
        if names is None:
            return value
        return [names[v] for v in value] if isinstance(value, list) else names[value]

    return [Example(r[text_column], labels.read({**r, label_column: named(r.get(label_column))}, label_column,
                                                where := f"{name}[{split}][{i}]"), where,
                    r[pair_column] if pair_column else None)
            for i, r in enumerate(ds)]


def read_examples(path: str, fmt: str, task: str, text_column="text", label_column="label", fold_tags=True,
                  split: str = "train", errors: str = "strict", pair_column: str | None = None,
                  labels: LabelFormat = LabelFormat()) -> list[Example]:
    """Dispatch on ``fmt``: lince | csv | tsv | jsonl | hf; ``errors``: what non-UTF-8 bytes do."""
    if fmt == "lince":
        if pair_column or labels.problem != "single_label":
            raise ValueError(f"{path}: LinCE files hold one text and one label: sentence pairs, multi-label and "
                             "regression need csv, tsv, jsonl or hf data")
        return read_lince(path, task, fold_tags, errors)
    read = read_hf(path, split, text_column, label_column, pair_column, labels) if fmt == "hf" else read_table(
        path, fmt, text_column, label_column, errors, pair_column, labels)
    return check_example_types(read, task, text_column, label_column, pair_column, labels.problem)


def check_example_types(examples: list[Example], task: str, text_column: str, label_column: str,
                        pair_column: str | None = None, problem: str = "single_label") -> list[Example]:
    """Refuse, naming file, line and column, a text or label of the wrong kind for ``task`` (a JSONL text that
    is a number or a list would otherwise be encoded as something else: a two-word list as a sentence pair)."""
    for ex in examples:
        if task == "token":
            words_ok = isinstance(ex.text, list) and all(isinstance(w, str) for w in ex.text)
            labels_ok = isinstance(ex.label, list)  # (a count that differs is named where words meet labels)
            what = (f"column {text_column!r} must be a list of words" if not words_ok else
                    f"column {label_column!r} must be a list of tags, one per word" if not labels_ok else None)
        else:
            what = (f"column {text_column!r} must be a string, got {json.dumps(ex.text)[:40]}"
                    if not isinstance(ex.text, str) else
                    f"column {pair_column!r} must be a string, got {json.dumps(ex.pair)[:40]}"
                    if pair_column and not isinstance(ex.pair, str) else
                    f"column {label_column!r} must be one label, got a list"
                    if problem == "single_label" and isinstance(ex.label, list) else None)
        if what:
            raise ValueError(f"{ex.source}: {what}")
    return examples


# ---- labels ---------------------------------------------------------------------------------


def label_names(examples: Sequence[Example]) -> list[str]:
    """Sorted label set of the training split; it fixes ids for the whole run."""
    names: set[str] = set()
    for ex in examples:
        names.update(ex.label if isinstance(ex.label, list) else [ex.label])
    return sorted(names)


def check_labels(examples: Sequence[Example], names: Sequence[str]) -> None:
    known = set(names)
    for ex in examples:
        for label in ex.label if isinstance(ex.label, list) else [ex.label]:
            if label not in known:
                raise ValueError(f"{ex.source}: label {label!r} is not among the training labels {sorted(known)}")


# ---- tokenisation ---------------------------------------------------------------------------


SEGMENTS = ("both", "first", "second")


def encode(examples: Sequence[Example], tokenizer, task: str, label2id: dict[str, int] | None,
           max_length: int, problem: str = "single_label", segments: str = "both") -> list[dict]:
    """Tokenise examples into features (``input_ids``, ``attention_mask``, ``labels``).

    Token classification labels only the first sub-word of each word (``-100`` elsewhere and on
    special tokens), so each word is scored once. ``label2id=None`` leaves labels out (prediction).
    Labels follow ``problem``: a class id, a 0/1 row per label (multi-label) or a float (regression).
    Every feature keeps ``word_ids`` (word and span masking group pieces by them): the fast
    tokenizer's word ids of the given words for token tasks; for raw text, whitespace-separated
    words located through the tokenizer's character offsets (pre-tokenizers disagree on words:
    Llama's Metaspace treats a whole text as one). A sentence pair is encoded the tokenizer's way
    (separators between); its second text's words are numbered after the first's, and the words of
    a segment ``segments`` leaves out get none (-1), which masking never touches.
    """
    check_encodable(examples, task, label2id is not None)
    paired = any(ex.pair is not None for ex in examples)
    if paired and (single := next((ex for ex in examples if ex.pair is None), None)):
        raise ValueError(f"{single.source}: one text where the others are sentence pairs")
    room = max_length - tokenizer.num_special_tokens_to_add(pair=paired)
    if room < 1 + paired:
        raise ValueError(f"data.max_length={max_length} leaves no room for text: this tokenizer adds "
                         f"{tokenizer.num_special_tokens_to_add(pair=paired)} special token(s) to each example")
    texts = [ex.text for ex in examples]
    # A tokenizer without a pair template (Qwen, Llama) would run the texts together: a newline parts them.
    joiner = "" if tokenizer.num_special_tokens_to_add(pair=True) > tokenizer.num_special_tokens_to_add() else "\n"
    pairs = [joiner + ex.pair for ex in examples] if paired else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, is_split_into_words=(task == "token"),
                    return_offsets_mapping=task == "sequence")
    features = []
    for i, ex in enumerate(examples):
        feature = {k: enc[k][i] for k in enc.keys() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if task == "token":
            feature["word_ids"] = enc.word_ids(i)
        else:
            feature["word_ids"] = pair_word_ids(ex.text, pairs and pairs[i], enc["offset_mapping"][i],
                                                enc.sequence_ids(i), segments)
        if label2id is not None:
            feature["labels"] = label_target(ex, task, label2id, problem, feature["word_ids"])
        features.append(feature)
    return features


def check_encodable(examples: Sequence[Example], task: str, labelled: bool) -> None:
    for ex in examples:
        if not ex.text or (isinstance(ex.text, str) and not ex.text.strip()):
            raise ValueError(f"{ex.source}: empty text")
        if ex.pair is not None and not (isinstance(ex.pair, str) and ex.pair.strip()):
            raise ValueError(f"{ex.source}: empty second text of a sentence pair")
        if task == "token" and not isinstance(ex.text, list):
            raise ValueError(f"{ex.source}: token classification needs a list of words, got {type(ex.text).__name__}")
        if task == "token" and labelled and len(ex.label) != len(ex.text):
            raise ValueError(f"{ex.source}: {len(ex.text)} words but {len(ex.label)} labels")


def label_target(ex: Example, task: str, label2id: dict[str, int], problem: str, word_ids):
    """What the loss compares the outputs with, for ``ex``'s label."""
    if task == "token":
        return first_subword_labels(word_ids, [label2id[t] for t in ex.label])
    if problem == "regression":
        return float(ex.label)
    if problem == "multi_label":
        row = [0.0] * len(label2id)
        for name in ex.label:
            row[label2id[name]] = 1.0
        return row
    return label2id[ex.label]


def pair_word_ids(text: str, pair: str | None, offsets, sequence_ids, segments: str = "both") -> list[int | None]:
    """:func:`whitespace_word_ids` over one text or both texts of a pair, the second's numbered on;
    the words of a segment ``segments`` leaves out get None."""
    first = [(a, b) if s == 0 else (0, 0) for (a, b), s in zip(offsets, sequence_ids)]
    ids = whitespace_word_ids(text, first) if segments != "second" else [None] * len(offsets)
    if pair is not None and segments != "first":
        after = len(text.split())
        second = [(a, b) if s == 1 else (0, 0) for (a, b), s in zip(offsets, sequence_ids)]
        ids = [w if s != 1 else (None if v is None else v + after)
               for w, v, s in zip(ids, whitespace_word_ids(pair, second), sequence_ids)]
    return ids


def was_truncated(feature: dict, example: Example) -> bool:
    """True when ``max_length`` cut words off the end of ``example`` (the last word of a text, or of either
    text of a pair, has no token)."""
    words = len(example.text) if isinstance(example.text, list) else len(example.text.split())
    seen = {w for w in feature["word_ids"] if w is not None and w >= 0}
    lasts = [words - 1] if example.pair is None else [words - 1, words + len(example.pair.split()) - 1]
    return any(last not in seen for last in lasts)


def whitespace_word_ids(text: str, offsets: Sequence[tuple[int, int]]) -> list[int | None]:
    """Word index of each token, words being whitespace-separated; ``None`` for special tokens
    (empty offsets). A token of whitespace alone belongs to the word after it.

    >>> whitespace_word_ids("hi amigo", [(0, 0), (0, 2), (2, 3), (3, 8), (0, 0)])
    [None, 0, 1, 1, None]
    """
    word_of: list[int | None] = []
    word, after_space = -1, True
    for char in text:
        if char.isspace():
            after_space = True
            word_of.append(None)
            continue
        word += after_space
        after_space = False
        word_of.append(word)
    out = []
    for start, end in offsets:
        # The first word inside the token, else (a whitespace token) the first word after it.
        following = (w for w in word_of[start:] if w is not None) if end > start else iter(())
        out.append(next(following, None))
    return out


def first_subword_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """Label the first sub-word of each word; -100 on continuations and special tokens.

    >>> first_subword_labels([None, 0, 0, 1, None], [5, 7])
    [-100, 5, -100, 7, -100]
    """
    out, previous = [], None
    for w in word_ids:
        out.append(IGNORE_INDEX if w is None or w == previous else word_labels[w])
        previous = w
    return out


def padding_collator(tokenizer, task: str, word_ids: bool = False):
    """The plain (unmasked) padding collator: evaluation and prediction use it as is.

    ``word_ids=True`` adds a ``word_ids`` tensor (-1 for special tokens and padding) for word and
    span masking; the masking hook takes it out before the model sees the batch.
    """
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    inner = DataCollatorForTokenClassification(tokenizer) if task == "token" else DataCollatorWithPadding(tokenizer)

    def collate(features: list[dict]) -> dict:
        batch = inner([{k: v for k, v in f.items() if k != "word_ids"} for f in features])
        if word_ids:
            batch["word_ids"] = padded_word_ids(features, batch["input_ids"].shape[1], tokenizer.padding_side == "left")
        return batch

    return collate


def padded_word_ids(features: Sequence[dict], length: int, left: bool = False) -> torch.Tensor:
    """The features' word ids as one padded ``(batch, length)`` tensor, -1 where there is no word."""
    out = torch.full((len(features), length), -1, dtype=torch.long)
    for row, feature in enumerate(features):
        ids = torch.tensor([-1 if w is None else w for w in feature["word_ids"]], dtype=torch.long)
        if left:
            out[row, length - len(ids):] = ids
        else:
            out[row, :len(ids)] = ids
    return out


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Shuffled batches of similar length: sort within shuffled windows of ``50 * batch_size``.

    Classification inputs are short and of very different lengths, so grouping them cuts the
    padding per batch. The order is a pure function of (seed, epoch): ``set_epoch`` before each
    pass (Accelerate's loader calls it too), so a resumed run sees the same batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group: bool = True,
                 window: int = 50):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group = group
        self.window = window
        self.epoch = 0

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 100_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if self.group:
            size = self.window * self.batch_size
            order = [i for s in range(0, len(order), size)
                     for i in sorted(order[s:s + size], key=lambda j: self.lengths[j], reverse=True)]
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.group:
            rng.shuffle(batches)
        return batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

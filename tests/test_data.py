"""Readers on the real LinCE files, table formats, alignment, and the CLI on a real LinCE slice."""
import json
import subprocess
import sys
from collections import Counter

import pytest
from helpers import shared_path

from tokmask_peft.data import encode, first_subword_labels, read_lince, read_table


@pytest.mark.parametrize("split,count,labels", [
    ("train", 12_194, {"positive": 6_848, "neutral": 3_363, "negative": 1_983}),
    ("dev", 1_859, {"positive": 1_037, "neutral": 517, "negative": 305}),
])
def test_lince_sentiment_official_counts(split, count, labels):
    examples = read_lince(shared_path("data", "lince", "sa_spaeng", f"{split}.conll"), "sequence")
    assert len(examples) == count
    assert Counter(e.label for e in examples) == labels
    first = {"train": "After this I 'm just gonna go home", "dev": "@brissamayen @sanluispotoyees estopp"}[split]
    assert examples[0].text.startswith(first) and examples[0].source.endswith(":1")


@pytest.mark.parametrize("split,count", [("train", 21_030), ("dev", 3_332)])
def test_lince_lid_official_counts_and_folding(split, count):
    path = shared_path("data", "lince", "lid_spaeng", f"{split}.conll")
    folded = read_lince(path, "token")
    raw = read_lince(path, "token", fold_tags=False)
    assert len(folded) == len(raw) == count
    assert {t for e in folded for t in e.label} == {"lang1", "lang2", "other"}
    assert {"lang1", "lang2", "other", "ne", "ambiguous", "mixed", "fw", "unk"} >= {t for e in raw for t in e.label}
    assert {"ne", "ambiguous"} <= {t for e in raw for t in e.label}
    for f, r in zip(folded, raw):
        assert len(f.text) == len(f.label) == len(r.label)
        assert all(a == (b if b in ("lang1", "lang2") else "other") for a, b in zip(f.label, r.label))


def test_sentiment_task_on_lid_file_says_where(tmp_path):
    path = shared_path("data", "lince", "lid_spaeng", "dev.conll")
    with pytest.raises(ValueError, match=r"dev\.conll:1: sentence has no label"):
        read_lince(path, "sequence")


def test_malformed_and_empty_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.conll"
    bad.write_text("# sent_enum = 1\tpositive\nhola\tlang2\nno-tab-here\n")
    with pytest.raises(ValueError, match=r"bad\.conll:3: expected 'token<TAB>tag'"):
        read_lince(bad, "sequence")
    empty = tmp_path / "empty.conll"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.conll: no sentences found"):
        read_lince(empty, "token")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_lince(tmp_path / "nope.conll", "token")
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"text": "a", "label": "p"}\n{"text": "b", "label": \n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: not valid JSON"):
        read_table(jsonl, "jsonl")
    csv = tmp_path / "x.csv"
    csv.write_text("body,label\nhello,p\n")
    with pytest.raises(ValueError, match=r"x\.csv:2: no column 'text'"):
        read_table(csv, "csv")


def test_table_formats(tmp_path):
    (tmp_path / "a.tsv").write_text("sentence\ty\nhola amigo\tpos\nbad day\tneg\n")
    rows = read_table(tmp_path / "a.tsv", "tsv", "sentence", "y")
    assert [(r.text, r.label, r.source.endswith(":2")) for r in rows][0] == ("hola amigo", "pos", True)
    (tmp_path / "b.jsonl").write_text('{"text": ["hola", "man"], "label": ["lang2", "lang1"]}\n')
    assert read_table(tmp_path / "b.jsonl", "jsonl")[0].label == ["lang2", "lang1"]


def test_first_subword_alignment_on_real_tokenizers(load_tokenizer):
    words = ["@_easanti", "jajaja", "unbelievable", "hola"]
    tags = {"lang1": 0, "lang2": 1, "other": 2}
    for name in ("bert-uncased", "llama2", "qwen"):
        tok = load_tokenizer(name)
        from tokmask_peft.data import Example

        feature = encode([Example(words, ["other", "lang2", "lang1", "lang2"], "x:1")], tok, "token", tags, 64)[0]
        labelled = [(wid, lab) for wid, lab in zip(feature["word_ids"], feature["labels"]) if lab != -100]
        assert [lab for _, lab in labelled] == [2, 1, 0, 1], name
        assert [w for w, _ in labelled] == [0, 1, 2, 3]
        assert len(feature["input_ids"]) > len(words)  # real sub-word splits happened
    assert first_subword_labels([None, 0, 0, 1, 1, None], [3, 4]) == [-100, 3, -100, 4, -100, -100]


def test_truncation_respects_max_length(load_tokenizer):

    tok = load_tokenizer("qwen")
    examples = read_lince(shared_path("data", "lince", "lid_spaeng", "dev.conll"), "token")[:200]
    features = encode(examples, tok, "token", {"lang1": 0, "lang2": 1, "other": 2}, 15)
    assert max(len(f["input_ids"]) for f in features) == 15
    assert min(len(f["input_ids"]) for f in features) >= 1


@pytest.mark.slow
def test_cli_end_to_end_on_real_lince_slice(tiny_model, tmp_path):
    """`tokmask sweep` on 300 real LinCE LID sentences with a tiny Llama writes exactly these files."""
    import yaml

    lid = shared_path("data", "lince", "lid_spaeng")
    recipe = {
        "model": {"name": tiny_model("llama"), "task": "token", "method": "qlora", "lora_r": 4},
        "data": {"train": str(lid / "train.conll"), "dev": str(lid / "dev.conll"), "max_length": 15,
                 "max_train_examples": 300, "max_eval_examples": 100},
        "train": {"epochs": 1, "batch_size": 32, "output_dir": str(tmp_path / "out")},
        "sweep": {"rates": [0.0, 0.3], "seeds": [0]},
    }
    path = tmp_path / "lid.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "tokmask_peft.cli", "sweep", str(path), "--rates", "0,0.3"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(best)" in proc.stdout
    out = tmp_path / "out"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    run_files = ["README.md", "adapter_config.json", "adapter_model.safetensors", "log.jsonl", "metrics.json",
                 "predictions.npz", "third_party.log", "tokenizer.json", "tokenizer_config.json", "tokmask_config.json"]
    assert files == sorted(["recipe.yaml", "results.csv", "results.md", "results.png"] +
                           [f"mask_{r}/seed_0/{f}" for r in ("0.00", "0.30") for f in run_files])
    config = json.loads((out / "mask_0.30" / "seed_0" / "tokmask_config.json").read_text())
    assert config["labels"] == ["lang1", "lang2", "other"] and config["method"] == "qlora"
    assert config["mask_token"] == {"policy": "auto:unk", "token": "<unk>", "id": 0, "added": False}
    metrics = json.loads((out / "mask_0.30" / "seed_0" / "metrics.json").read_text())
    assert metrics["train_examples"] == 300 and metrics["dev_examples"] == 100


def test_test_from_train_is_carved_once_disjoint_from_every_training_subset(tmp_path):
    from tokmask_peft.config import Recipe
    from tokmask_peft.recipe_setup import read_splits

    lince = shared_path("data", "lince", "sa_spaeng")

    def splits(**data):
        return read_splits(Recipe.from_dict({"model": {"name": "x"}, "data": {
            "train": str(lince / "train.conll"), "dev": str(lince / "dev.conll"), "test_from_train": 2000, **data}}))

    train_500, _, held_500, _ = splits(max_train_examples=500)
    train_2k, _, held_2k, whole = splits(max_train_examples=2000)
    test = {e.text for e in held_500["test"]}
    assert len(held_500["test"]) == 2000 and test == {e.text for e in held_2k["test"]}
    assert len(train_500) == 500 and len(train_2k) == 2000 and len(whole) > 2000 + 2000
    for subset in (train_500, train_2k):
        assert not test & {e.text for e in subset}
    with pytest.raises(ValueError, match="leaves no training data"):
        splits(test_from_train=20000)
    with pytest.raises(ValueError, match="rename one"):
        splits(extra_eval={"test": str(lince / "dev.conll")})

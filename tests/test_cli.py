"""The command line end to end: recipe in, exact files out; compare; clear errors."""
import json
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow


def tokmask(*args, check=True):
    return subprocess.run([sys.executable, "-m", "tokmask_peft.cli", *map(str, args)], capture_output=True,
                          text=True, check=check)


def test_compare_prints_a_full_table(make_recipe, tmp_path):
    recipe = make_recipe("llama", "sequence", "lora", train={"epochs": 1})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    proc = tokmask("compare", path, "--methods", "full,lora,qlora", "--output", tmp_path / "cmp",
                   "--set", "full:train.lr=5e-4")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "method" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["full", "lora", "qlora"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 8 and all(cells), row
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    full, lora, qlora = data
    assert full["trainable_params"] == full["total_params"] > lora["trainable_params"]
    assert lora["disk_mb"] < full["disk_mb"]
    assert yaml.safe_load((tmp_path / "cmp" / "recipe_full.yaml").read_text())["train"]["lr"] == 5e-4
    # Asked again with another lr for LoRA: refused before anything trains, the key named.
    before = sorted(p.name for p in (tmp_path / "cmp").rglob("*"))
    proc = tokmask("compare", path, "--methods", "full,lora", "--output", tmp_path / "cmp",
                   "--set", "full:train.lr=5e-4", "--set", "lora:train.lr=1e-3", check=False)
    assert proc.returncode != 0 and "cmp/lora was trained with another recipe (differs in ['train.lr'])" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "cmp").rglob("*")) == before


def test_bad_recipe_gives_a_clear_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: x, method: qlora, quant_bits: 3}\ndata: {train: a, dev: b}\n")
    proc = tokmask("train", path, check=False)
    assert proc.returncode != 0 and "model.quant_bits must be one of [4, 8], got 3" in proc.stderr
    proc = tokmask("train", path, "model.quant_bits=4", "train.lr=abc", check=False)
    assert "train.lr must be a number, got 'abc'" in proc.stderr
    proc = tokmask("train", tmp_path / "missing.yaml", check=False)
    assert "missing.yaml does not exist" in proc.stderr
    proc = tokmask("train", path, "model.quant_bits=4", f"model.name={tmp_path}/no_model", check=False)
    assert proc.returncode != 0 and f"model.name '{tmp_path}/no_model': no such directory" in proc.stderr
    assert "Traceback" not in proc.stderr

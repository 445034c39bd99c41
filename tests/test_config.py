"""Recipes: every shipped YAML validates; overrides; errors that name the field."""
from pathlib import Path

import pytest

from tokmask_peft.config import Recipe, resolve_path

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_validates_and_names_its_command(path):
    recipe = Recipe.from_yaml(path)
    header = path.read_text().split("\n", 1)[0]
    assert header.startswith("#")
    assert f"tokmask sweep recipes/{path.name}" in path.read_text() or "tokmask compare" in path.read_text()
    assert recipe.sweep.rates and all(0 <= r < 1 for r in recipe.sweep.rates)
    if recipe.data.format == "lince":
        assert "../shared/data/lince" in recipe.data.train


def test_recipe_paper_grid_is_complete():
    names = {p.stem for p in RECIPES}
    for task in ("sa", "lid"):
        assert f"mbert_{task}_full" in names
        for model in ("qwen2.5-0.5b", "tinyllama-1.1b"):
            assert {f"{model}_{task}_lora", f"{model}_{task}_qlora"} <= names


def test_overrides_and_errors():
    base = {"model": {"name": "m"}, "data": {"train": "t", "dev": "d"}}
    r = Recipe.from_dict(base).with_overrides(["train.lr=1e-4", "sweep.rates=[0, 0.2]", "model.method=qlora"])
    assert r.train.lr == 1e-4 and r.sweep.rates == [0, 0.2] and r.model.method == "qlora"
    with pytest.raises(ValueError, match="section.key=value"):
        Recipe.from_dict(base).with_overrides(["lr=1"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lrate'\] in section 'train'"):
        Recipe.from_dict({**base, "train": {"lrate": 1}})
    with pytest.raises(ValueError, match="differ at two decimals"):
        Recipe.from_dict({**base, "sweep": {"rates": [0.1, 0.101]}})
    with pytest.raises(ValueError, match="train.compile must be true or false, got 'maybe'"):
        Recipe.from_dict(base).with_overrides(["train.compile=maybe"])
    assert Recipe.from_dict(base).with_overrides(["train.compile=true"]).train.compile is True
    with pytest.raises(ValueError, match="exactly one of data.dev"):
        Recipe.from_dict({"model": {"name": "m"}, "data": {"train": "t"}})
    for modules, message in (([], "all-linear or a list"), (["q_proj", "all-linear"], "on its own"),
                             ([1], "all-linear or a list"), ("", "is empty")):
        with pytest.raises(ValueError, match=f"model.target_modules.*{message}"):
            Recipe.from_dict({**base, "model": {"name": "m", "target_modules": modules}})
    assert Recipe.from_dict({**base, "model": {"name": "m", "target_modules": ["q_proj", "v_proj"]}})
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_path("pkg:surely_not_a_package_xyz/data.csv")
    assert resolve_path("pkg:tokmask_peft/config.py").endswith("tokmask_peft/config.py")

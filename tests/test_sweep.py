"""Sweeps: one run per (rate, seed), resumable, and a report rebuilt from the run directories."""
import csv
import json

import pytest

import tokmask_peft.sweeps as grid_module
import tokmask_peft.sweeps as sweep_module
from tokmask_peft.sweeps import report, sweep

RUN_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "log.jsonl", "metrics.json",
             "predictions.npz", "third_party.log", "tokenizer.json", "tokenizer_config.json", "tokmask_config.json"]


@pytest.fixture
def counted_train(monkeypatch):
    calls = []
    real = grid_module.train

    def counting(recipe, setup=None, output_dir=None):
        calls.append((recipe.masking.rate, recipe.train.seed))
        return real(recipe, setup=setup, output_dir=output_dir)

    monkeypatch.setattr(grid_module, "train", counting)
    return calls


@pytest.mark.slow
def test_sweep_writes_one_run_per_rate_and_seed_and_resumes(make_recipe, tmp_path, counted_train):
    recipe = make_recipe("llama", "sequence", "lora", train={"epochs": 2},
                         sweep={"rates": [0.0, 0.1, 0.3], "seeds": [0, 1]})
    out = tmp_path / "sweep"
    rows = sweep(recipe, out)
    assert len(counted_train) == 6 and len(rows) == 6
    runs = sorted(str(p.relative_to(out)) for p in out.glob("mask_*/seed_*"))
    assert runs == [f"mask_{r}/seed_{s}" for r in ("0.00", "0.10", "0.30") for s in (0, 1)]
    for run in runs:
        assert sorted(p.name for p in (out / run).iterdir()) == RUN_FILES
        config = json.loads((out / run / "tokmask_config.json").read_text())
        assert f"mask_{config['masking']['rate']:.2f}/seed_{config['seed']}" == run
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["mask_0.00", "mask_0.10", "mask_0.30", "recipe.yaml", "results.csv", "results.md", "results.png"])
    table = (out / "results.md").read_text()
    assert table.count("(best)") == 1 and "| 0.10" in table and "± " in table
    with (out / "results.csv").open() as f:
        assert [(float(r["rate"]), int(r["seed"])) for r in csv.DictReader(f)] == \
            [(r, s) for r in (0.0, 0.1, 0.3) for s in (0, 1)]

    # Delete one run (and leave a stale partial of another): only that one trains again.
    import shutil

    reused_base = json.loads((out / "mask_0.10" / "seed_1" / "metrics.json").read_text())
    shutil.rmtree(out / "mask_0.10" / "seed_1")
    counted_train.clear()
    before = (out / "results.md").read_text()
    sweep(recipe, out)
    assert counted_train == [(0.1, 1)]
    # trained first on a freshly loaded base now, fourth on a reused base before: same result
    fresh_base = json.loads((out / "mask_0.10" / "seed_1" / "metrics.json").read_text())
    assert fresh_base["history"] == reused_base["history"]
    assert (out / "results.md").read_text() == before  # same seed, same metrics

    # report rebuilds the same files from the run directories alone
    for name in ("results.csv", "results.md", "results.png"):
        (out / name).unlink()
    report(out)
    assert (out / "results.md").read_text() == before
    assert (out / "results.png").stat().st_size > 5000


def test_extending_a_sweep_trained_with_another_recipe_is_refused(make_recipe, tmp_path, counted_train):
    out = tmp_path / "sweep"
    sweep(make_recipe("llama", "sequence", "lora", train={"epochs": 1}, sweep={"rates": [0.1], "seeds": [0]}), out)
    before = sorted(p.name for p in out.rglob("*"))
    changed = make_recipe("llama", "sequence", "lora", train={"epochs": 1, "lr": 1e-3},
                          sweep={"rates": [0.1, 0.3], "seeds": [0]})
    with pytest.raises(ValueError, match=r"mask_0\.10/seed_0 was trained with another recipe.*\['train\.lr'\]"):
        sweep(changed, out)
    assert sorted(p.name for p in out.rglob("*")) == before and len(counted_train) == 1
    # The same recipe with another rate, a log interval and another output path extends it.
    same = make_recipe("llama", "sequence", "lora", train={"epochs": 1, "log_every": 5, "output_dir": "elsewhere"},
                       sweep={"rates": [0.1, 0.3], "seeds": [0]})
    assert len(sweep(same, out)) == 2 and counted_train == [(0.1, 0), (0.3, 0)]


def test_partial_runs_never_count_as_done(make_recipe, tmp_path, monkeypatch):
    recipe = make_recipe("bert", "sequence", "lora", train={"epochs": 1}, sweep={"rates": [0.1], "seeds": [0]})
    out = tmp_path / "sweep"

    def crash(*args, **kwargs):
        raise RuntimeError("crash mid-run")

    monkeypatch.setattr(grid_module, "train", crash)
    with pytest.raises(RuntimeError):
        sweep(recipe, out)
    assert not (out / "mask_0.10" / "seed_0").exists()
    assert sweep_module.pending(recipe, out) == [(0.1, 0)]
    monkeypatch.undo()
    rows = sweep(recipe, out)
    assert len(rows) == 1 and not (out / "mask_0.10" / "seed_0.partial").exists()


def test_report_without_runs_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        report(tmp_path)

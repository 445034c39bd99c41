"""The Ray executor on a local Ray limited to this machine's 2 CPUs."""
import csv
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'tokmask-peft[ray]'")

from tokmask_peft.sweeps import run_on_ray, train_trial  # noqa: E402
from tokmask_peft.sweeps import pending, run_dir, sweep  # noqa: E402

# Local Ray clusters, one at a time: under pytest-xdist these tests share one worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
COMPARED = ("rate", "seed", "weighted_f1", "macro_f1", "accuracy", "loss", "best_step", "trainable_params")


def rows(out: Path) -> list[dict]:
    with (out / "results.csv").open() as f:
        return [{k: r[k] for k in COMPARED} for r in csv.DictReader(f)]


def counting_trial(config: dict) -> None:
    """Leaves a marker per attempt; the 0.1 run fails on its first attempt."""
    rate, seed = config["point"]
    folder = Path(config["out"]) / "attempts"
    folder.mkdir(exist_ok=True)
    attempt = len(list(folder.glob(f"{rate}_{seed}_*"))) + 1
    (folder / f"{rate}_{seed}_{attempt}").touch()
    if rate == 0.1 and attempt == 1:
        raise RuntimeError("injected failure on the first attempt")
    train_trial(config)


def test_ray_matches_local_retries_failures_and_resumes(make_recipe, tmp_path, monkeypatch):
    recipe = make_recipe("llama", "sequence", "lora", train={"epochs": 1},
                         sweep={"rates": [0.0, 0.1, 0.3], "seeds": [0]})
    sweep(recipe, tmp_path / "local")

    # A driver killed mid-sweep leaves finished runs and a .partial one with a checkpoint.
    out = tmp_path / "ray"
    sweep(recipe.with_overrides(["sweep.rates=[0.0]"]), out)
    from helpers import kill_at_training_step

    from tokmask_peft.sweeps import train_one

    with monkeypatch.context() as m:
        kill_at_training_step(m, 4)
        with pytest.raises(KeyboardInterrupt):
            train_one(recipe.with_overrides(["train.checkpoint_every=2"]), 0.3, 0, out)
    assert (run_dir(out, 0.3, 0).with_name("seed_0.partial") / "checkpoint").exists()
    todo = pending(recipe, out)
    assert todo == [(0.1, 0), (0.3, 0)]

    run_on_ray(recipe.with_overrides(["train.checkpoint_every=2"]), out, todo, cpus_per_run=1, num_cpus=2,
               max_failures=2, trial=counting_trial)
    attempts = sorted(p.name for p in (out / "attempts").iterdir())
    assert attempts == ["0.1_0_1", "0.1_0_2", "0.3_0_1"]  # 0.0 not retrained; 0.1 retried once
    assert pending(recipe, out) == []
    from tokmask_peft.sweeps import report

    report(out)
    assert rows(out) == rows(tmp_path / "local")
    for rate in ("0.00", "0.10", "0.30"):
        local = sorted(p.name for p in (tmp_path / "local" / f"mask_{rate}" / "seed_0").iterdir())
        remote = sorted(p.name for p in (out / f"mask_{rate}" / "seed_0").iterdir())
        assert local == remote


def test_ray_failure_after_retries_names_the_run(make_recipe, tmp_path):
    recipe = make_recipe("bert", "sequence", "lora", train={"epochs": 1}, sweep={"rates": [0.2], "seeds": [0]})

    def always_fails(config):
        raise RuntimeError("broken")

    with pytest.raises(RuntimeError, match=r"1 run\(s\) failed after 1 retries: \(rate, seed\) = \[\[0.2, 0\]\]"):
        run_on_ray(recipe, tmp_path, [(0.2, 0)], num_cpus=2, max_failures=1, trial=always_fails)
    assert not run_dir(tmp_path, 0.2, 0).exists()

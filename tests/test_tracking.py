"""Experiment trackers through Accelerate, read back offline with each tracker's own reader."""
import json

import pytest

from tokmask_peft.config import Recipe
from tokmask_peft.sweeps import sweep

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def logged(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_a_sweep_logs_each_run_to_tensorboard_and_mlflow(make_recipe, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for an opt-in to a local file store
    recipe = make_recipe("llama", train={"epochs": 2, "log_every": 1, "report_to": ["tensorboard", "mlflow"],
                                         "run_name": "sa-lowres"},
                         sweep={"rates": [0.0, 0.3], "seeds": [0]})
    out = tmp_path / "sweep"
    sweep(recipe, out)

    for rate in ("0.00", "0.30"):
        run = out / f"mask_{rate}" / "seed_0"
        records = logged(run)
        train_losses = [r["loss"] for r in records if "loss" in r]
        dev = [r["eval"]["weighted_f1"] for r in records if "eval" in r]
        events = EventAccumulator(str(out / "tracking" / f"mask_{rate}" / "seed_0" / "sa-lowres"))
        events.Reload()
        assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(train_losses, rel=1e-6)
        assert [e.value for e in events.Scalars("dev/weighted_f1")] == pytest.approx(dev, rel=1e-6)
        assert {"train/lr", "train/mask_rate"} <= set(events.Tags()["scalars"])
        assert [e.value for e in events.Scalars("train/mask_rate")][-1] == pytest.approx(float(rate))

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("sa-lowres")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"mask_0.00/seed_0", "mask_0.30/seed_0"}
    masked = runs["mask_0.30/seed_0"]
    assert masked.data.params["masking.rate"] == "0.3" and masked.data.params["train.seed"] == "0"
    assert masked.data.params["model.method"] == "lora" and masked.data.params["masking.unit"] == "token"
    history = client.get_metric_history(masked.info.run_id, "dev/weighted_f1")
    assert [m.value for m in history] == pytest.approx(
        [r["eval"]["weighted_f1"] for r in logged(out / "mask_0.30" / "seed_0") if "eval" in r], rel=1e-6)


def test_unknown_or_missing_trackers_are_named(make_recipe, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown tracker 'tensorbored'"):
        make_recipe(train={"report_to": ["tensorbored"]})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"'wandb', but its package is not installed: pip install wandb"):
        Recipe.from_dict({**make_recipe().to_dict(), "train": {**make_recipe().train.__dict__, "report_to": ["wandb"]}})

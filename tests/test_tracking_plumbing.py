"""Tracker plumbing without a tracker: where a run writes, its name, what it logs."""
from pathlib import Path

import pytest

from tokmask_peft.tracking import check_trackers, hyperparameters, run_place, scalars


def test_a_sweeps_runs_share_its_tracking_folder_and_lone_runs_keep_their_own():
    assert run_place(Path("out/mask_0.10/seed_2.partial")) == (Path("out/tracking"), "mask_0.10/seed_2")
    assert run_place(Path("out/mask_0.10/seed_2")) == (Path("out/tracking"), "mask_0.10/seed_2")
    assert run_place(Path("runs/one")) == (Path("runs/one/tracking"), "one")


def test_log_records_become_train_and_dev_scalars():
    assert scalars({"step": 4, "epoch": 1, "loss": 0.5, "lr": 1e-3, "mask_rate": 0.1}) == (
        {"train/loss": 0.5, "train/lr": 1e-3, "train/mask_rate": 0.1, "train/epoch": 1}, 4)
    assert scalars({"eval": {"step": 6, "epoch": 1, "weighted_f1": 0.7}}) == ({"dev/weighted_f1": 0.7}, 6)
    assert scalars({"something": "else"}) is None


def test_hyperparameters_are_flat_scalars_without_the_sweep(make_recipe):
    flat = hyperparameters(make_recipe(masking={"rate": 0.2}))
    assert flat["masking.rate"] == 0.2 and not any(k.startswith("sweep.") for k in flat)
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())


def test_unknown_trackers_and_non_lists_are_refused():
    with pytest.raises(ValueError, match="must be a list of tracker names"):
        check_trackers("tensorboard")
    with pytest.raises(ValueError, match="unknown tracker 'tensorbored'"):
        check_trackers(["tensorbored"])

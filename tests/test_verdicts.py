"""Sweep verdicts: paired bootstrap intervals against p = 0, saved predictions, reports from files alone."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from tokmask_peft.reporting import report
from tokmask_peft.metrics import metric_values
from tokmask_peft.runs import Predictions, load_predictions, save_predictions
from tokmask_peft.verdicts import paired_verdict, recommendation, seed_level_verdict

ROOT = Path(__file__).resolve().parents[1]


def toy_predictions(n=400, classes=3, accuracy=0.6, seed=0, example=None):
    """Predictions on one fixed evaluation set (the gold labels), drawn anew for each seed."""
    gold = np.random.default_rng(100).integers(classes, size=n)
    rng = np.random.default_rng(seed)
    pred = np.where(rng.random(n) < accuracy, gold, rng.integers(classes, size=n))
    return Predictions(np.arange(n) if example is None else example, gold, pred)


@pytest.mark.parametrize("metric,sk", [("weighted_f1", lambda g, p: f1_score(g, p, average="weighted")),
                                       ("macro_f1", lambda g, p: f1_score(g, p, average="macro")),
                                       ("accuracy", accuracy_score)])
def test_weighted_metric_matches_scikit_learn_on_a_resample(metric, sk):
    p = toy_predictions()
    rng = np.random.default_rng(1)
    draw = rng.integers(len(p.gold), size=len(p.gold))
    weights = np.bincount(draw, minlength=len(p.gold))[None, :]
    assert metric_values(weights, p.gold, p.pred, 3, metric)[0] == pytest.approx(sk(p.gold[draw], p.pred[draw]))


def test_identical_runs_give_zero_and_no_evidence():
    runs = {s: toy_predictions(seed=s) for s in range(3)}
    v = paired_verdict(0.1, runs, runs, classes=3)
    assert v.delta == 0 and v.low == 0 and v.high == 0 and v.word == "no evidence"
    assert "no rate beats p = 0 beyond noise (3 seeds)" in recommendation([v])


def test_a_clear_shift_is_better_and_reproducible_and_a_drop_is_worse():
    base = {s: toy_predictions(accuracy=0.5, seed=s) for s in range(3)}
    good = {s: toy_predictions(accuracy=0.8, seed=s) for s in range(3)}  # better predictions of the same gold
    v = paired_verdict(0.3, good, base, classes=3)
    assert v.word == "better" and v.low > 0.1 and v.level == "seeds and examples"
    assert paired_verdict(0.3, good, base, classes=3) == v  # fixed bootstrap seed: the same interval
    assert paired_verdict(0.3, base, good, classes=3).word == "worse"
    assert recommendation([v]).startswith("Recommendation: use p = 0.3: Δ = +0.")


def test_few_seeds_whose_differences_share_a_sign_are_not_evidence_when_they_spread():
    """Three seeds, all below p = 0 but far apart: the interval is Δ ± t·SE (seed variance s²/n plus the
    example bootstrap's, Welch–Satterthwaite df), by hand; a bootstrap over the seeds would lie below 0."""
    import math
    import statistics

    from tokmask_peft.verdicts import example_weights, t_975

    n, gold = 2000, np.zeros(2000, dtype=int)
    base = {s: Predictions(np.arange(n), gold, (np.arange(n) >= 1000).astype(int)) for s in range(3)}
    lost = {0: 10, 1: 120, 2: 110}  # examples each seed's masked run gets wrong that p = 0 got right
    runs = {s: Predictions(np.arange(n), gold, (np.arange(n) >= 1000 - k).astype(int)) for s, k in lost.items()}
    v = paired_verdict(0.1, runs, base, classes=2, metric="accuracy", replicates=400)
    d = [-k / n for k in lost.values()]
    assert v.delta == pytest.approx(statistics.fmean(d)) and v.level == "seeds and examples"
    counts = example_weights(n, 400, np.random.default_rng(0))  # the verdict's own example draws
    correct = lambda p: (p.pred == gold).astype(float)  # noqa: E731
    replicates = np.mean([counts @ (correct(runs[s]) - correct(base[s])) / n for s in range(3)], axis=0)
    seed_var, example_var = statistics.variance(d) / 3, np.var(replicates, ddof=1)
    df = 2 * (seed_var + example_var) ** 2 / seed_var ** 2
    half = t_975(df) * math.sqrt(seed_var + example_var)
    assert (v.low, v.high) == (pytest.approx(v.delta - half), pytest.approx(v.delta + half))
    assert 2 <= df < 3 and max(d) < 0 and v.word == "no evidence"
    assert t_975(2.7) == t_975(2) == 4.303 and t_975(45) == 2.021 and t_975(1e9) == 1.96


def test_one_seed_interval_is_examples_only_and_without_predictions_there_is_none():
    v = paired_verdict(0.1, {0: toy_predictions(accuracy=0.7)}, {0: toy_predictions()}, classes=3)
    assert v.level == "examples only (1 seed)" and v.low is not None
    none = seed_level_verdict(0.1, {0: 0.52}, {0: 0.50})
    assert none.low is None and none.word == "no evidence" and "no interval" in none.describe()
    t = seed_level_verdict(0.1, {0: 0.52, 1: 0.53, 2: 0.55}, {0: 0.50, 1: 0.50, 2: 0.51})
    assert t.level == "seeds only (no saved predictions)" and t.low < t.delta < t.high


def test_token_tasks_resample_whole_sentences():
    example = np.repeat(np.arange(100), 5)  # 100 sentences of 5 labelled words
    base = {0: toy_predictions(n=500, example=example), 1: toy_predictions(n=500, example=example, seed=1)}
    v = paired_verdict(0.1, base, base, classes=3)
    assert v.delta == 0
    other = {0: toy_predictions(n=500, example=np.arange(500))}
    with pytest.raises(ValueError, match="same evaluation set"):
        paired_verdict(0.1, other, {0: base[0]}, classes=3)


def test_predictions_round_trip(tmp_path):
    p = toy_predictions()
    p.probs = np.random.default_rng(0).random((len(p.gold), 3))
    save_predictions(tmp_path / "predictions.npz", {"dev": p, "test": p})
    back = load_predictions(tmp_path / "predictions.npz")
    assert set(back) == {"dev", "test"} and np.array_equal(back["dev"].pred, p.pred)
    assert np.allclose(back["test"].probs, p.probs, atol=1e-3)


def test_a_sweep_written_before_predictions_existed_still_reports(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(ROOT / "benchmarks" / "results" / "real_data" / "minilm_sa_lora", old)
    for name in ("results.csv", "results.md", "results.png"):
        (old / name).unlink()
    report(old)
    text = (old / "results.md").read_text()
    assert "seeds only (no saved predictions)" in text and "Recommendation:" in text
    assert "| 0.10 |" in text


def test_a_sweep_saves_predictions_that_score_as_its_best_checkpoint_and_reports_verdicts(make_recipe, toy_data,
                                                                                          tmp_path):
    from tokmask_peft.sweeps import sweep

    recipe = make_recipe("llama", "token", "lora", train={"epochs": 2}, data={"extra_eval": {"test": str(toy_data["dev"])}},
                         sweep={"rates": [0.0, 0.3], "seeds": [0, 1]})
    out = tmp_path / "sweep"
    sweep(recipe, out)
    for run in sorted(out.glob("mask_*/seed_*")):
        metrics = json.loads((run / "metrics.json").read_text())
        kept = load_predictions(run / "predictions.npz")
        assert set(kept) == {"dev", "test"}
        dev = kept["dev"]
        assert len(np.unique(dev.example)) == metrics["dev_examples"] == 32  # words grouped by sentence
        assert dev.probs.shape == (len(dev.gold), 2)
        score = metric_values(np.ones((1, len(dev.gold))), dev.gold, dev.pred, 2)[0]
        assert score == pytest.approx(metrics["best"]["weighted_f1"], abs=1e-9)  # the best weights' predictions
    text = (out / "results.md").read_text()
    assert "| 0.30 |" in text and "seeds and examples, 2 seed(s)" in text
    assert "Recommendation:" in text and "Held out (test): p = 0.3" in text
    before = text
    (out / "results.md").unlink()
    report(out)  # from files alone, no training: the same verdicts
    assert (out / "results.md").read_text() == before


def test_sweeps_compared_against_the_first_sweeps_p0_through_the_cli(make_recipe, tmp_path):
    import subprocess
    import sys

    from tokmask_peft.sweeps import sweep

    carve = {"test_from_train": 32}
    token = make_recipe("llama", train={"epochs": 2}, data=carve, sweep={"rates": [0.0, 0.3], "seeds": [0, 1]})
    word = make_recipe("llama", train={"epochs": 2}, data=carve, masking={"unit": "word"},
                       sweep={"rates": [0.3], "seeds": [0, 1]})
    rdrop = make_recipe("llama", train={"epochs": 2}, data=carve, masking={"consistency": 1.0},
                        sweep={"rates": [0.0], "seeds": [0, 1]})
    for name, recipe in (("token", token), ("word", word), ("rdrop", rdrop)):
        sweep(recipe, tmp_path / name)
    proc = subprocess.run([sys.executable, "-m", "tokmask_peft.cli", "report", str(tmp_path / "token"),
                           str(tmp_path / "word"), str(tmp_path / "rdrop")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "token" / "comparison.md").read_text()
    assert table in proc.stdout and "then judged on test" in table
    rows = [line for line in table.splitlines() if line.startswith(f"| {tmp_path}")]
    # each sweep's pick on dev, then the same rate on the carved test set
    assert [r.split(" | ")[3:4] for r in rows] == [["dev"], ["test"]] * 3
    assert "unit word" in rows[2] and "| 0.30 |" in rows[2] and "2 seed(s)" in rows[2]
    # R-Drop is p = 0 of another recipe: judged against the shared p = 0, not skipped
    assert "consistency λ = 1" in rows[4] and "| 0.00 |" in rows[4] and "seeds and examples" in rows[4]
    other = tmp_path / "other.conll"
    other.write_text("# sent_enum = 1\tpositive\nthe\tlang1\n\n"
                     "# sent_enum = 2\tnegative\nel\tlang2\n")
    elsewhere = make_recipe("llama", train={"epochs": 1}, data={"dev": str(other), **carve},
                            sweep={"rates": [0.0], "seeds": [0]})
    sweep(elsewhere, tmp_path / "elsewhere")
    from tokmask_peft.reporting import compare_sweeps

    with pytest.raises(ValueError, match=r"differs from .* in \['data\.dev'\]"):
        compare_sweeps([tmp_path / "token", tmp_path / "elsewhere"])
    # a sweep saved before a data field existed (here encoding_errors) is on the same footing
    from tokmask_peft.runs import TOKMASK_CONFIG, read_run_config
    from tokmask_peft.storage import write_json

    for run in (tmp_path / "word").glob("mask_*/seed_*"):
        config = read_run_config(run)
        del config["recipe"]["data"]["encoding_errors"]
        write_json(run / TOKMASK_CONFIG, config)
    assert "unit word" in compare_sweeps([tmp_path / "token", tmp_path / "word"])

"""Benchmarks are not timed tests: CI checks each script runs on its tiny setting and writes JSON."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
import yaml
from helpers import shared_path

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["masking_cost", "masking_overhead", "masking_strategies", "throughput", "sweep_cost", "memory",
           "adapter_switch", "step_anatomy", "serve_load", "task_adapters", "side_by_side", "loop_equivalence"]


# throughput runs with --compile (that run times every plain setting too) and on a tasks.py recipe
# (multi-label: its weighted loss reaches the Trainer through compute_loss_func).
CASES = [(name, ["--compile"] if name == "throughput" else []) for name in SCRIPTS] + [
    ("throughput", ["--task", "goemotions"]), ("loop_equivalence", ["--task", "nli", "--method", "full"])]


@pytest.mark.parametrize("name,flags", CASES, ids=SCRIPTS + ["throughput_task", "loop_equivalence_full"])
def test_benchmark_runs_on_tiny_setting(name, flags, tmp_path):
    shared_path("tokenizers")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--tiny", "--out", str(tmp_path),
                           *flags],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list(tmp_path.glob("*.json"))
    assert len(results) == 1
    data = json.loads(results[0].read_text())
    assert data["benchmark"] and data["environment"]["versions"]["torch"]
    if "--compile" in flags:
        assert data["speedup_compiled"] > 0
    if name == "throughput" and "--task" in flags:
        assert data["task"] == "goemotions" and data["metric"] == "micro_f1" and data["speedup"] > 0
        assert set(data["median_micro_f1"]) == {"ours", "trainer", "trainer_grouped"}
    if name == "loop_equivalence":  # the campaign's peer: given our batches, no dropout, the same computation
        assert data["steps"]["ours"] == data["steps"]["trainer"] == 10
        assert data["decisions_differ"] == 0 and data["max_abs_prob_diff"] < 1e-4
        assert data["test"]["ours"] == pytest.approx(data["test"]["trainer"], abs=1e-6)


def test_tasks_benchmark_continues_from_its_light_copy_on_a_machine_without_its_runs(tmp_path, monkeypatch):
    shared_path("data", "sick")

    def tasks():
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tasks.py"), "--tiny", "--out", str(tmp_path)],
                              capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / "tasks_nli_lora_tiny.json").read_text())

    first = tasks()
    copy = tmp_path / "tasks_nli_lora_tiny"
    assert {p.parent.parent.name for p in copy.glob("mask_*/seed_0/predictions.npz")} == {"mask_0.00", "mask_0.10"}
    assert not list(copy.rglob("*.safetensors")) and first["peer"][0]["seed"] == 0
    assert not list(tmp_path.glob("*peer*"))  # the peer's checkpoints go with its run, never beside the results
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tasks import summary_table

    assert (copy / "peer" / "seed_0" / "predictions.npz").is_file()  # the Trainer's test predictions
    vs = first["ours"]["vs_trainer"]  # paired with ours example by example (same gold, else an error)
    assert vs["level"] == "examples only (1 seed)" and vs["low"] <= vs["delta"] <= vs["high"]
    against = summary_table([first]).splitlines()[2].split(" | ")[7]  # the p = 0 row
    assert against.startswith(f"{vs['delta']:+.4f} [") and against.endswith("(1 seed)")
    shifted_copies_are_scored_as_the_run_scored_its_own_test_set(tmp_path, copy, monkeypatch)
    shutil.rmtree(tmp_path / "tasks_nli_lora_tiny_runs")  # another machine: only the committed copy
    second = tasks()
    assert not (tmp_path / "tasks_nli_lora_tiny_runs").exists()  # nothing trained again
    assert second["ours"] == first["ours"] and second["peer"] == first["peer"]


def shifted_copies_are_scored_as_the_run_scored_its_own_test_set(out: Path, copy: Path, monkeypatch):
    """task_shifts.py on the tiny job's runs: at q = 0 (the clean copy) it reproduces the predictions each run
    saved on test; each set is saved once; the verdict pairs the two rates' seeds."""
    import task_shifts
    from tokmask_peft.runs import load_predictions

    monkeypatch.setattr(task_shifts, "SHIFTS", (("mask", 0.0), ("delete", 0.5)))
    task_shifts.score_job("nli", "lora", out, task_shifts.tiny_encoder(out))
    files = sorted(copy.glob("mask_*/seed_0/shifted.npz"))
    assert len(files) == 2
    for path in files:
        shifted, clean = load_predictions(path), load_predictions(path.with_name("predictions.npz"))["test"]
        assert set(shifted) == {"test:mask@0", "test:delete@0.5"}
        again = shifted["test:mask@0"]
        assert np.array_equal(again.pred[np.argsort(again.example)], clean.pred[np.argsort(clean.example)])
    stamps = [f.stat().st_mtime_ns for f in files]
    task_shifts.score_job("nli", "lora", out, task_shifts.tiny_encoder(out))  # nothing left to score
    assert [f.stat().st_mtime_ns for f in files] == stamps
    judged = {j["set"]: j for j in task_shifts.result_for("nli", "lora", out, "tiny")["shifts"]}
    assert list(judged) == ["test", "test:mask@0", "test:delete@0.5"]  # clean first, as tasks.py judges it
    verdict = judged["test:delete@0.5"]["verdict"]
    assert verdict["seeds"] == 1 and verdict["low"] <= verdict["delta"] <= verdict["high"]
    assert judged["test:mask@0"]["verdict"] == judged["test"]["verdict"]


def test_compile_break_even_is_the_one_off_cost_over_the_time_saved_per_example():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from throughput import compile_break_even

    # 2,000 examples at 200/s take 10 s, so a 30 s first run paid 20 s to compile; against 100/s that
    # saves 5 ms an example (4,000 examples to repay), against 150/s 1.67 ms (12,000); never against 250/s.
    got = compile_break_even(30.0, 2000, {"ours_compiled": 200.0, "trainer": 100.0, "ours": 150.0})
    assert got["compile_seconds"] == pytest.approx(20.0)
    assert got["examples_vs"] == {"trainer": pytest.approx(4000), "ours": pytest.approx(12000)}
    assert compile_break_even(30.0, 2000, {"ours_compiled": 200.0, "trainer": 250.0, "ours": 150.0}
                              )["examples_vs"]["trainer"] is None


def test_robustness_change_is_paired_by_seed_and_counts_the_seeds_that_rose():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from low_resource import paired_change

    key = "mask_0.20_weighted_f1"
    base = [{"seed": 0, key: 0.40}, {"seed": 1, key: 0.50}, {"seed": 2, key: None}]
    group = [{"seed": 1, key: 0.60}, {"seed": 0, key: 0.38}, {"seed": 2, key: 0.90}, {"seed": 3, key: 0.90}]
    assert paired_change(group, base, "mask") == " (+0.040, 1/2 up)"  # seeds 2 (unmeasured) and 3 (no twin) left out
    assert paired_change(group, base, "typo") == ""


def test_a_rates_override_changes_the_masking_sweeps_but_never_the_p0_strategies():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from low_resource import strategy_recipe

    extra = ["sweep.rates=[0.3]"]
    assert strategy_recipe(5, "none", [2], extra).sweep.rates == [0.0]
    assert strategy_recipe(1, "rdrop", [2], extra).sweep.rates == [0.0]
    assert strategy_recipe(1, "neftune", [2], extra).sweep.rates == [0.0]
    assert strategy_recipe(5, "word", [2], extra).sweep.rates == [0.3]


def test_a_block_report_asked_for_one_strategy_still_covers_every_strategy_the_copy_holds(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from low_resource import reported_strategies

    for name in ("none", "word", "word_new_mask"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes").mkdir()  # not a strategy: never reported
    assert reported_strategies(["none", "word_new_mask"], tmp_path) == ["none", "word_new_mask", "word"]
    assert reported_strategies(["none"], tmp_path / "absent") == ["none"]


def test_summary_replaces_only_the_lines_between_the_readme_markers():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from low_resource import splice_summary

    text = "intro\n<!-- low-resource summary: rebuilt by ... -->\n| old |\n| rows |\n<!-- end of summary -->\nguide\n"
    assert splice_summary(text, "| new |\n", "README.md") == (
        "intro\n<!-- low-resource summary: rebuilt by ... -->\n| new |\n<!-- end of summary -->\nguide\n")
    with pytest.raises(ValueError, match=r"README.md: .* found 1 and 0"):
        splice_summary("<!-- low-resource summary: x -->\n| old |\n", "| new |\n", "README.md")
    shifts = ("<!-- shifts: x -->", "<!-- end of shifts -->")
    assert splice_summary(f"a\n{shifts[0]}\nold\n{shifts[1]}\n", "new", "R", shifts) == f"a\n{shifts[0]}\nnew\n{shifts[1]}\n"


def test_low_resource_block_judges_every_strategy_against_the_shared_p0_on_dev_and_the_test_carve(
        tiny_model, toy_data, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import low_resource
    from low_resource import main

    out = tmp_path / "results"
    args = ["--block", "1", "--strategies", "rdrop,neftune", "--seeds", "0,1", "--runs", str(tmp_path / "runs"),
            "--out", str(out), f"model.name={tiny_model('bert')}", f"data.train={toy_data['train']}",
            f"data.dev={toy_data['dev']}", "data.test_from_train=32", "data.max_train_examples=48",
            "data.max_length=16", "train.epochs=2", "train.robustness=[0.2]"]
    main(args)
    block = out / "block_1"
    table = (block / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(f"| {block}")]
    # token (the shared p = 0, added first) and the two asked for; each picked on dev, judged on test
    assert [r.split(" | ")[0].rsplit("/", 1)[1] for r in rows] == ["token", "token", "rdrop", "rdrop",
                                                                   "neftune", "neftune"]
    assert "NEFTune α = 5" in rows[4] and "consistency λ = 1" in rows[2]
    robustness = (block / "robustness.md").read_text()
    assert "| neftune | 0.00 | 2 |" in robustness and "–" not in robustness
    shared, neftune = (next(r for r in robustness.splitlines() if r.startswith(f"| {n} | 0.00"))
                       for n in ("token", "neftune"))
    assert "up)" not in shared and neftune.count("/2 up)") == 3  # each corruption paired with p = 0 seed by seed
    for run in (block / "rdrop").glob("mask_*/seed_*"):
        assert sorted(p.name for p in run.iterdir()) == ["metrics.json", "predictions.npz", "tokmask_config.json"]
    # A new machine (no runs/, only the committed copy) asked for one seed more trains that seed only.
    # Each run lands in the copy at once, its table rebuilt over every seed the copy holds (seen here
    # before the block report, as a copy committed mid-seed would be).
    with monkeypatch.context() as m:
        m.setattr(low_resource, "write_block_report", lambda *a, **k: None)
        main(["--block", "1", "--strategies", "rdrop,neftune", "--seeds", "0,1,2", "--runs", str(tmp_path / "new"),
              "--out", str(out), *args[10:]])
    assert sorted(str(p.relative_to(tmp_path / "new")) for p in (tmp_path / "new").glob("*/*/mask_*/seed_*")) == [
        "block_1/neftune/mask_0.00/seed_2", "block_1/rdrop/mask_0.00/seed_2", "block_1/token/mask_0.00/seed_2",
        "block_1/token/mask_0.10/seed_2", "block_1/token/mask_0.30/seed_2"]
    for name in ("token", "rdrop", "neftune"):
        assert (block / name / "results.csv").read_text().count("\n") == 1 + 3 * (3 if name == "token" else 1)
    main(["--block", "1", "--strategies", "rdrop,neftune", "--seeds", "2", "--runs", str(tmp_path / "new"),
          "--out", str(out), *args[10:]])  # nothing left to train: the block report over seeds 0-2
    assert "| neftune | 0.00 | 3 |" in (block / "robustness.md").read_text()
    assert json.loads((block / "block.json").read_text())["seeds"] == [0, 1, 2]
    assert yaml.safe_load((block / "rdrop" / "recipe.yaml").read_text())["sweep"]["seeds"] == [0, 1, 2]
    check_summary_judges_on_seeds_every_strategy_finished(out, block)


def check_summary_judges_on_seeds_every_strategy_finished(out, block):
    """The summary judges a block on the seeds every strategy finished: rdrop lacking seed 2 drops it everywhere."""
    from low_resource import run_times, summary_table

    shutil.rmtree(block / "rdrop" / "mask_0.00" / "seed_2")
    rows = [line for line in summary_table(out).splitlines() if line.startswith("| ")]
    block_1 = rows[rows.index(next(r for r in rows if "(block 1)" in r)):][:4]
    assert block_1[0].split(" | ")[1:4] == ["none", "0", "2"]
    assert [r.split(" | ")[1] for r in block_1[1:]] == ["token masking", "R-Drop (consistency alone)",
                                                         "NEFTune α 5 (the peer)"]
    assert all(r.split(" | ")[3] == "2" and r.split(" | ")[5] in {"better", "worse", "no evidence"} for r in block_1[1:])
    assert block_1[2].split(" | ")[2] == "0" and block_1[2].count(" / ") == 2
    not_run = rows[rows.index(block_1[3]) + 1:][:2]  # the block's strategies with no runs yet are named, not dropped
    assert [[c.strip() for c in r.strip()[1:-1].split("|")][1:5] for r in not_run] == [
        ["whole-word masking", "", "0", "not run yet"], ["token masking + consistency λ 1", "", "0", "not run yet"]]
    assert "(block 3) | no seed finished by every strategy yet" in "\n".join(rows)
    assert (out / "summary.png").stat().st_size > 10_000  # the forest plot of the held-out intervals
    assert run_times(out).startswith("Wall time per run on one CPU core") and "block 1 " in run_times(out)
    # No seed finished by every strategy: the p = 0 runs so far are shown, each strategy's runs counted.
    shutil.rmtree(block / "rdrop" / "mask_0.00" / "seed_1")
    shutil.rmtree(block / "token" / "mask_0.10" / "seed_0")
    rows = [line for line in summary_table(out).splitlines() if line.startswith("| ")]
    block_1 = [[c.strip() for c in r.strip()[1:-1].split("|")] for r in rows[rows.index(next(r for r in rows if "(block 1)" in r)):][:6]]
    assert block_1[0][1:3] == ["none", "0"] and block_1[0][3] == "3" and block_1[0][4].startswith("test weighted F1")
    assert [r[1:5] for r in block_1[1:]] == [
        ["token masking", "", "0", "5 run(s), no seed shared by every strategy at every rate yet"],
        ["whole-word masking", "", "0", "not run yet"], ["token masking + consistency λ 1", "", "0", "not run yet"],
        ["R-Drop (consistency alone)", "", "0", "1 run(s), no seed shared by every strategy at every rate yet"],
        ["NEFTune α 5 (the peer)", "", "0", "3 run(s), no seed shared by every strategy at every rate yet"]]


def test_the_committed_block_results_still_match_the_recipes_that_would_extend_them():
    """A recipe default changed after a block ran (block 5's mask policy) must not change what the block's
    committed runs mean: extending the block would refuse them (or, worse, mix two recipes in one table)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from low_resource import BLOCKS, committed_seeds, missing_rates, strategy_recipe

    results = ROOT / "benchmarks" / "results" / "low_resource"
    checked = 0
    for number, block in BLOCKS.items():
        for name in block.strategies:
            copy = results / f"block_{number}" / name
            for seed in sorted(committed_seeds(copy)):
                assert missing_rates(copy, strategy_recipe(number, name, [seed], []), seed) == [], (copy, seed)
                checked += 1
    assert checked >= 90
    policies = {name: strategy_recipe(5, name, [0], []).model.mask_policy for name in BLOCKS[5].strategies}
    assert policies == {"none": "auto", "word": "auto", "word_new_mask": "new"}


def test_tta_reuses_each_runs_plain_predictions_keeps_its_ensembles_and_resumes_without_weights(
        tiny_model, toy_data, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from low_resource import main as train_block, strategy_recipe
    from tta import main as tta

    from tokmask_peft.inference import Classifier
    from tokmask_peft.recipe_setup import Setup
    from tokmask_peft.runs import load_predictions

    runs, out = tmp_path / "runs", tmp_path / "results"
    overrides = [f"model.name={tiny_model('bert')}", f"data.train={toy_data['train']}", f"data.dev={toy_data['dev']}",
                 "data.test_from_train=32", "data.max_train_examples=48", "data.max_length=16", "train.epochs=4",
                 "train.lr=0.01", "train.robustness=[0.2]", "sweep.rates=[0.0,0.1]"]  # lr: scores must move
    train_block(["--block", "1", "--strategies", "token", "--seeds", "0,1", "--runs", str(runs), "--out", str(out),
                 *overrides])
    args = ["--block", "1", "--strategies", "token", "--k", "2", "--runs", str(runs), "--out", str(out), *overrides]
    with pytest.raises(SystemExit, match="test:nonsense"):
        tta([*args, "--sets", "test,test:nonsense"])
    tta(args)
    assert capsys.readouterr().out.count(": scored") == 2 * 2 * 2  # 2 rates x 2 seeds x (test, test:mask@0.2)
    copy = out / "block_1" / "token" / "mask_0.10" / "seed_0"
    views, plain = load_predictions(copy / "tta_k2.npz"), load_predictions(copy / "predictions.npz")
    assert sorted(views) == ["test", "test:mask@0.2"]
    # The plain side is the run's own predictions: the saved weights score the set the same way now.
    clf = Classifier.from_run(runs / "block_1" / "token" / "mask_0.10" / "seed_0", device="cpu")
    texts = [e.text for e in Setup.from_recipe(strategy_recipe(1, "token", [0], overrides)).extra_examples["test"]]
    order = plain["test"].example  # rows in scoring order, each naming its input
    fresh = np.stack([row.softmax(-1).numpy() for row in clf.logits(texts)])[order]
    assert np.allclose(fresh, plain["test"].probs, atol=1e-3)  # float16 on disk
    ensemble = np.stack([row.softmax(-1).numpy() for row in clf.logits(texts, tta=2)])[order]  # its own rate
    assert np.allclose(ensemble, views["test"].probs, atol=1e-3)
    assert np.abs(views["test"].probs - plain["test"].probs).max() > 0.01  # the views do change the scores
    assert np.array_equal(views["test"].gold, plain["test"].gold)
    table = (out / "block_1" / "tta.md").read_text()
    rows = [r for r in table.splitlines() if r.startswith("| test")]
    assert len(rows) == 4 and all(r.count("→") == 2 for r in rows) and "mask_0.00, 2 seed(s)" in table
    tta([*args, "--sets", "all"])  # the shifted copies not drawn yet, and only those
    assert capsys.readouterr().out.count(": scored") == 2 * 2 * 2  # test:delete@0.2, test:typo@0.2
    table = (out / "block_1" / "tta.md").read_text()
    assert len([r for r in table.splitlines() if r.startswith("| test")]) == 2 * 4
    # Weights gone (another machine): nothing is scored again and the table comes from the light copies.
    shutil.rmtree(runs)
    tta(args)
    assert ": scored" not in capsys.readouterr().out
    assert (out / "block_1" / "tta.md").read_text() == table
    record = json.loads((out / "block_1" / "tta.json").read_text())["scores"]["token"]["mask_0.10"]
    assert set(record) == {"0", "1"} and set(record["0"]["test"]["ensemble"]) == {"weighted_f1", "ece"}


def test_the_shift_table_judges_masked_view_ensembles_against_the_plain_p0_on_the_sets_they_were_drawn_for(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from low_resource import tta_rows

    from tokmask_peft.metrics import classification_metrics
    from tokmask_peft.runs import Predictions, load_predictions, save_predictions

    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, 60)

    def preds(correct: float) -> Predictions:
        pred = np.where(rng.random(60) < correct, gold, (gold + 1) % 3)
        return Predictions(np.arange(60), gold, pred, np.eye(3)[pred] * 0.9 + 0.1 / 3)

    for s in (0, 1):
        for name, rate in (("none", "mask_0.00"), ("word_p1", "mask_0.10")):
            (tmp_path / name / rate / f"seed_{s}").mkdir(parents=True)
        save_predictions(tmp_path / "none" / "mask_0.00" / f"seed_{s}" / "predictions.npz",
                         {"test": preds(0.6), "test:mask@0.2": preds(0.4)})
        run = tmp_path / "word_p1" / "mask_0.10" / f"seed_{s}"
        save_predictions(run / "predictions.npz", {"test": preds(0.6)})
        assert tta_rows(tmp_path, "none", "word_p1", ["test"], ["clean", "mask@0.2"]) == []  # a seed lacks views
        save_predictions(run / "tta_k8.npz", {"test:mask@0.2": preds(0.9)})
    rows = tta_rows(tmp_path, "none", "word_p1", ["test"], ["clean", "mask@0.2"])
    cells = [c.strip() for c in rows[0].strip("| ").split("|")]
    assert cells[:3] == ["whole-word masking + mean of 8 masked views", "test", "–"]  # clean not drawn
    def f1(path: Path) -> float:
        p = load_predictions(path)["test:mask@0.2"]
        return classification_metrics(p.pred, p.gold)["weighted_f1"]

    delta = np.mean([f1(tmp_path / "word_p1" / "mask_0.10" / f"seed_{s}" / "tta_k8.npz")
                     - f1(tmp_path / "none" / "mask_0.00" / f"seed_{s}" / "predictions.npz") for s in (0, 1)])
    assert cells[3].startswith(f"{delta:+.3f} [") and cells[3].endswith("better")
    assert tta_rows(tmp_path, "none", "none", ["test"], ["clean"]) == []  # p = 0 without views: no row

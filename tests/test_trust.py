"""Nothing silently wrong: a table holds one recipe's finished runs, a run's config still says what its
weights mean, and what is left out is named. Each case was an answer that came back wrong with exit 0."""
import json
import re
import shutil
import warnings

import pytest
from safetensors.torch import load_file

from tokmask_peft.console import TokmaskWarning
from tokmask_peft.reporting import report
from tokmask_peft.sweeps import sweep


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model, toy_data):
    """A finished two-rate, one-seed tiny LoRA sweep, copied afresh by each test that changes it."""
    from helpers import one_epoch_llama_recipe

    out = tmp_path_factory.mktemp("trusted") / "sweep"
    recipe = one_epoch_llama_recipe(tiny_model, toy_data, out, sweep={"rates": [0.0, 0.1], "seeds": [0]})
    sweep(recipe, out)
    return recipe, out


@pytest.fixture
def copy(finished, tmp_path):
    recipe, out = finished
    return recipe, shutil.copytree(out, tmp_path / "sweep")


def test_extending_a_sweep_under_another_recipe_is_refused_for_new_rates_and_seeds_too(copy):
    recipe, out = copy
    before = (out / "recipe.yaml").read_text()
    for extension in (["sweep.rates=[0.4]"], ["sweep.seeds=[1]"]):
        with pytest.raises(ValueError, match=r"trained with another recipe \(differs in \['train.lr'\]\)"):
            sweep(recipe.with_overrides(["train.lr=0.5", *extension]), out)
    assert (out / "recipe.yaml").read_text() == before and not (out / "mask_0.40").exists()


def test_a_finished_partial_of_another_recipe_is_not_promoted_as_this_ones(copy):
    recipe, out = copy
    run = out / "mask_0.10" / "seed_0"
    run.rename(run.with_name("seed_0.partial"))  # killed between its metrics.json and the rename
    shutil.rmtree(out / "mask_0.00")  # (a finished run of the sweep would refuse the other recipe first)
    with pytest.raises(ValueError, match=r"seed_0.partial was trained with another recipe.*delete .* to train it"):
        sweep(recipe.with_overrides(["train.lr=0.5", "sweep.rates=[0.1]"]), out)
    assert not run.exists()
    sweep(recipe, out)  # its own recipe: the rename is all that is left
    assert json.loads((run / "metrics.json").read_text())["best"]


def test_report_counts_only_finished_runs_of_the_sweep_and_names_the_rest(copy):
    recipe, out = copy
    rows = report(out)
    shutil.copytree(out / "mask_0.10" / "seed_0", out / "mask_0.10" / "seed_0.bak")
    shutil.copytree(out / "mask_0.10" / "seed_0", out / "mask_0.10" / "seed_1.partial")
    shutil.copytree(out / "mask_0.10" / "seed_0", out / "mask_0.10" / "seed_7")  # a seed-0 run under seed 7's name
    (out / "mask_0.00" / "seed_2").mkdir()
    (out / "mask_0.00" / "seed_2" / "tokmask_config.json").write_text("{}")  # no metrics.json
    with pytest.warns(TokmaskWarning) as caught:
        again = report(out)
    said = str(caught[0].message)
    for name in ("seed_0.bak (not named mask_R/seed_N)", "seed_1.partial (not finished)",
                 "seed_7 (its config says rate 0.1, seed 0", "seed_2 (no metrics.json)"):
        assert name in said, said
    assert again == rows  # the table is the finished runs' alone


def test_a_run_of_another_recipe_in_the_directory_is_refused_by_report_and_from_sweep(copy, tmp_path):
    from tokmask_peft.inference import Classifier

    recipe, out = copy
    other = tmp_path / "other"
    sweep(recipe.with_overrides(["train.lr=0.02", "sweep.rates=[0.3]"]), other)
    shutil.copytree(other / "mask_0.30", out / "mask_0.30")
    for load in (report, lambda o: Classifier.from_sweep(o, seed=0)):
        with pytest.raises(ValueError, match=r"mask_0.30/seed_0 was trained with another recipe .*\['train.lr'\]"):
            load(out)


def test_labels_edited_in_the_config_no_longer_load(copy):
    from tokmask_peft.inference import Classifier

    _, out = copy
    run = out / "mask_0.10" / "seed_0"
    config = json.loads((run / "tokmask_config.json").read_text())
    assert Classifier.from_run(run, device="cpu").labels == config["labels"]
    for edit in ({"labels": config["labels"][::-1]}, {"task": "token"}):
        (run / "tokmask_config.json").write_text(json.dumps({**config, **edit}))
        with pytest.raises(ValueError, match="tokmask_config.json: its task, labels, mask_token, method are not"):
            Classifier.from_run(run, device="cpu")


def test_a_seed_twice_is_refused_and_a_damaged_finished_run_is_named_before_retraining(copy):
    recipe, out = copy
    with pytest.raises(ValueError, match=r"sweep.seeds lists a seed twice \(\[0, 0\]\)"):
        recipe.with_overrides(["sweep.seeds=[0, 0]"])
    weights = out / "mask_0.10" / "seed_0" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    damaged = r"mask_0.10/seed_0 is not a whole run \(.*truncated.*\); training it again"
    with pytest.warns(TokmaskWarning, match=damaged):
        sweep(recipe, out)
    assert load_file(weights)


@pytest.mark.slow
def test_a_group_killed_while_writing_results_resumes_whole(make_recipe, tmp_path, monkeypatch):
    """Killed after the first run of a side-by-side group wrote its results: the rerun finishes the same
    group from its checkpoint (no run retrained alone, no orphaned checkpoint), equal to an uninterrupted one."""
    import tokmask_peft.training as loop

    recipe = make_recipe("llama", train={"epochs": 2},
                         sweep={"rates": [0.0, 0.1, 0.3], "seeds": [0], "side_by_side": 3})
    sweep(recipe, tmp_path / "whole")
    real, calls = loop.write_results, {"n": 0}

    def dies_after_the_first(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed between two runs' results")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "write_results", dies_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        sweep(recipe, tmp_path / "cut")
    assert (tmp_path / "cut" / "mask_0.00" / "seed_0.partial" / "metrics.json").is_file()
    monkeypatch.setattr(loop, "write_results", real)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokmaskWarning)  # nothing to warn about: the group is whole again
        sweep(recipe, tmp_path / "cut")
    assert not (tmp_path / "cut" / ".side_by_side").exists()
    for rate in ("0.00", "0.10", "0.30"):
        a, b = (tmp_path / side / f"mask_{rate}" / "seed_0" for side in ("whole", "cut"))
        assert load_file(b / "adapter_model.safetensors").keys() == load_file(a / "adapter_model.safetensors").keys()
        for key, value in load_file(a / "adapter_model.safetensors").items():
            assert load_file(b / "adapter_model.safetensors")[key].equal(value), key
        ma, mb = (json.loads((run / "metrics.json").read_text()) for run in (a, b))
        assert (mb["best"], mb["steps"], mb["history"]) == (ma["best"], ma["steps"], ma["history"])


# ---- bad input, named before anything trains ----------------------------------------------------------


def test_numbers_and_seeds_that_cannot_train_are_refused(make_recipe):
    with pytest.raises(ValueError, match=r"train.lr must be a finite number > 0, got inf"):
        make_recipe(train={"lr": float("inf")})
    with pytest.raises(ValueError, match=r"train.weight_decay must be a finite number >= 0, got nan"):
        make_recipe(train={"weight_decay": float("nan")})
    with pytest.raises(ValueError, match=r"sweep.seeds must be whole numbers >= 0, got 'abc' in \[0, 'abc'\]"):
        make_recipe().with_overrides(["sweep.seeds=[0,abc]"])


@pytest.mark.parametrize("line, task, message", [
    ('{"text": 3, "label": "p"}', "sequence", "x.jsonl:2: column 'text' must be a string, got 3"),
    ('{"text": ["a", "b"], "label": "p"}', "sequence", "x.jsonl:2: column 'text' must be a string"),
    ('{"text": {"a": 1}, "label": "p"}', "sequence", "column 'text' must be a string"),
    ('{"text": "a b", "label": ["p"]}', "sequence", "x.jsonl:2: column 'label' must be one label, got a list"),
    ('{"text": "a b", "label": ["x", "y"]}', "token", "x.jsonl:2: column 'text' must be a list of words"),
    ('{"text": ["a", "b"], "label": "x"}', "token", "x.jsonl:2: column 'label' must be a list of tags, one per word"),
])
def test_a_jsonl_text_or_label_of_the_wrong_kind_is_named_by_line(tmp_path, line, task, message):
    from tokmask_peft.data import read_examples

    good = '{"text": ["a", "b"], "label": ["x", "y"]}' if task == "token" else '{"text": "a b", "label": "p"}'
    path = tmp_path / "x.jsonl"
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        read_examples(str(path), "jsonl", task)


def test_a_truncated_predictions_file_is_named_in_the_report(copy):
    _, out = copy
    npz = out / "mask_0.10" / "seed_0" / "predictions.npz"
    npz.write_bytes(npz.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"mask_0.10/seed_0/predictions.npz is damaged or cut short"):
        report(out)


# ---- what a finished run and a report leave behind ------------------------------------------------------


def test_results_honour_the_umask_and_a_promoted_run_holds_nothing_of_its_training(copy, monkeypatch):
    import os

    recipe, out = copy
    run = out / "mask_0.10" / "seed_0"
    partial = run.with_name("seed_0.partial")
    run.rename(partial)  # finished, then killed before the rename, with what a kill can leave in it
    for leftover in ("checkpoint", "checkpoint.old", ".saving"):
        (partial / leftover).mkdir()
        (partial / leftover / "x.bin").write_bytes(b"x")
    for leftover in (".metrics.json.a1b2c3.tmp", ".tokmask.lock", ".tokmask.lock.owner"):
        (partial / leftover).write_text("x")
    before = sorted(p.name for p in (out / "mask_0.00" / "seed_0").iterdir())
    old = os.umask(0o022)
    try:
        sweep(recipe, out)
    finally:
        os.umask(old)
    assert sorted(p.name for p in run.iterdir()) == before
    for name in ("results.csv", "results.md", "results.png", "recipe.yaml"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name  # readable by the group, as a plain write


def test_a_sweep_says_which_run_it_is_on_and_about_how_long_the_rest_takes(make_recipe, tmp_path, capsys):
    sweep(make_recipe("llama", train={"epochs": 1}, sweep={"rates": [0.0, 0.1], "seeds": [0]}), tmp_path / "s")
    said = capsys.readouterr().out
    assert "run 1/2: mask_0.00/seed_0\n" in said
    assert re.search(r"run 2/2: mask_0.10/seed_0 \(about \d+ s left\)", said)
    assert said.index("run 1/2") < said.index("step ") < said.index("run 2/2")


def test_a_dev_set_too_small_to_judge_anything_is_named(make_recipe):
    from tokmask_peft.recipe_setup import read_splits

    recipe = make_recipe(data={"dev": None, "dev_fraction": 0.1})  # 96 toy tweets: 9 for dev
    with pytest.warns(TokmaskWarning, match=r"the dev set holds 9 examples.*moves accuracy by 11 points"):
        read_splits(recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokmaskWarning)
        read_splits(make_recipe())  # 32 examples: enough not to be warned about


def test_long_csv_fields_are_read_and_lone_carriage_returns_are_named(tmp_path):
    from tokmask_peft.data import read_examples

    long = tmp_path / "long.csv"
    long.write_text("text,label\n" + "word " * 40_000 + ",p\nshort,n\n")  # a 200 KB text: over csv's 128 KiB
    assert [len(e.text) for e in read_examples(str(long), "csv", "sequence")] == [200_000, 5]
    old_mac = tmp_path / "mac.csv"
    old_mac.write_bytes(b"text,label\rgood,p\rbad,n\r")
    with pytest.raises(ValueError, match=r"mac.csv:\d+: not valid CSV .*lone carriage return"):
        read_examples(str(old_mac), "csv", "sequence")


def test_a_max_length_beyond_the_models_positions_is_refused_before_training(make_recipe, tmp_path):
    from tokmask_peft.training import train

    with pytest.raises(ValueError, match=r"data.max_length=200 is beyond the 128 positions the model has learned"):
        train(make_recipe("bert", data={"max_length": 200}), output_dir=tmp_path / "bert")
    with pytest.raises(ValueError, match=r"beyond the 129 positions"):  # RoBERTa-style: 130 less pad id 0 + 1
        train(make_recipe("xlmr", data={"max_length": 130}), output_dir=tmp_path / "xlmr")
    assert not (tmp_path / "bert" / "metrics.json").exists()
    train(make_recipe("llama", data={"max_length": 200}, train={"epochs": 1}), output_dir=tmp_path / "llama")  # rotary


def test_a_damaged_adapter_config_is_named_at_load(copy):
    from tokmask_peft.inference import Classifier

    _, out = copy
    run = out / "mask_0.10" / "seed_0"
    for damage, message in (('{"peft_type": "LORA", "r": ', "adapter_config.json: this adapter config is not valid"),
                            ('{"r": 4}', "adapter_config.json: not a PEFT adapter config")):
        (run / "adapter_config.json").write_text(damage)
        with pytest.raises(ValueError, match=message):
            Classifier.from_run(run, device="cpu")


def test_a_directory_that_cannot_be_written_is_named_and_its_error_is_not_hidden(tmp_path, monkeypatch):
    """(Run as root, chmod cannot make a directory read-only: the refusals are injected where the OS gives them.)"""
    from pathlib import Path

    import tokmask_peft.storage as storage

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(storage.FileLock, "acquire", refused)
        with pytest.raises(PermissionError, match=r"locked is not writable \(Permission denied\): a sweep writes"):
            with storage.hold(tmp_path / "locked", "sweep"):
                pass
    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", refused)  # the cleanup fails too, as in a read-only directory
        with pytest.raises(RuntimeError, match="the real error"):
            with storage.hold(tmp_path / "run", "run"):
                raise RuntimeError("the real error")


def test_report_on_one_trained_run_prints_its_scores_and_writes_nothing(copy, capsys):
    from tokmask_peft.cli import main

    recipe, out = copy
    run = out / "mask_0.10" / "seed_0"
    before = sorted(p.name for p in run.iterdir())
    main(["report", str(run)])
    printed = capsys.readouterr().out
    assert "one run (masking rate 0.1, seed 0)" in printed and "run `tokmask sweep`" in printed
    f1 = json.loads((run / "metrics.json").read_text())["best"]["weighted_f1"]
    assert f"| weighted_f1 | {f1:.4f} |" in printed
    assert sorted(p.name for p in run.iterdir()) == before
    (run / "metrics.json").unlink()
    with pytest.raises(SystemExit, match=r"seed_0 is a single run but not a finished one"):
        main(["report", str(run)])

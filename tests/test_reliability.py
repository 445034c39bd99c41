"""Nothing lost, nothing silent: faults injected (full disk, two writers, kill -9, damaged files,
malformed input), each answered by an error naming the problem or by a run that resumes whole."""
import csv
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tokmask_peft.config import Recipe

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, stdin=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "tokmask_peft.cli", *map(str, args)], capture_output=True,
                          text=True, input=stdin, cwd=cwd, timeout=600)


def table(out: Path, keys=("rate", "seed", "weighted_f1", "loss", "best_step")) -> list[dict]:
    with (out / "results.csv").open() as f:
        return [{k: r[k] for k in keys} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, toy_data):
    """One finished tiny LoRA run, copied afresh by each test that damages it."""
    from tokmask_peft.training import train

    from helpers import one_epoch_llama_recipe

    out = tmp_path_factory.mktemp("reliable") / "run"
    train(one_epoch_llama_recipe(tiny_model, toy_data, out))
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    import shutil

    return Path(shutil.copytree(trained, tmp_path / "run"))


# ---- files whole or absent ----------------------------------------------------------------------


def test_a_full_disk_while_metrics_are_written_loses_nothing_and_the_rerun_finishes(make_recipe, tmp_path,
                                                                                   monkeypatch):
    import tokmask_peft.storage as storage
    from tokmask_peft.sweeps import sweep

    recipe = make_recipe("llama", train={"epochs": 2, "checkpoint_every": 3}, sweep={"rates": [0.0], "seeds": [0]})
    sweep(recipe, tmp_path / "whole")
    real_fsync = storage.os.fsync

    def full_disk(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".metrics.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    out = tmp_path / "full"
    with monkeypatch.context() as m:
        m.setattr(storage.os, "fsync", full_disk)
        with pytest.raises(OSError, match="No space left"):
            sweep(recipe, out)
    partial = out / "mask_0.00" / "seed_0.partial"
    assert not (partial / "metrics.json").exists() and not list(partial.glob(".metrics.json*"))
    assert not (out / "mask_0.00" / "seed_0").exists()
    sweep(recipe, out)  # the disk has room again
    assert table(out) == table(tmp_path / "whole")


def test_a_zero_byte_metrics_file_left_by_a_crash_is_not_a_finished_run(make_recipe, tmp_path, monkeypatch):
    from helpers import kill_at_training_step

    from tokmask_peft.sweeps import sweep, train_one

    recipe = make_recipe("llama", train={"epochs": 2, "checkpoint_every": 2}, sweep={"rates": [0.0], "seeds": [0]})
    sweep(recipe, tmp_path / "whole")
    out = tmp_path / "crashed"
    with monkeypatch.context() as m:
        kill_at_training_step(m, 5)
        with pytest.raises(KeyboardInterrupt):
            train_one(recipe, 0.0, 0, out)
    partial = out / "mask_0.00" / "seed_0.partial"
    (partial / "metrics.json").write_bytes(b"")  # what a non-atomic write on a full disk leaves
    with pytest.warns(UserWarning, match="not whole"):
        sweep(recipe, out)
    assert table(out) == table(tmp_path / "whole")
    log = [json.loads(line) for line in (out / "mask_0.00" / "seed_0" / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == sorted(set(steps))  # a resume leaves no step logged twice


def test_a_damaged_metrics_file_in_a_finished_run_is_named(trained, tmp_path):
    import shutil

    from tokmask_peft.reporting import report

    sweep_dir = tmp_path / "sweep"
    run = sweep_dir / "mask_0.10" / "seed_0"
    shutil.copytree(trained, run)
    (run / "metrics.json").write_text('{"best": {"weighted_f1": 0.')
    with pytest.raises(ValueError, match=r"seed_0/metrics.json: this run's metrics file is not valid JSON"):
        report(sweep_dir)


def test_a_checkpoint_of_the_older_format_is_refused_by_name_not_misread(make_recipe, tmp_path):
    """Format 1 held every counter in one object; restoring it into the one loop would misplace them."""
    from tokmask_peft.runs import run_fingerprint
    from tokmask_peft.storage import write_json
    from tokmask_peft.training import train

    recipe = make_recipe("llama", train={"epochs": 1})
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    write_json(tmp_path / "run" / "checkpoint" / "recipe.json", run_fingerprint(recipe))  # no format: version 1
    with pytest.raises(ValueError, match="written by an older tokmask_peft.*delete it to train the run from the start"):
        train(recipe, output_dir=tmp_path / "run")


def test_checkpoints_are_swapped_in_whole(make_recipe, tmp_path, monkeypatch):
    """A kill inside save_state leaves the previous checkpoint, and the run resumes to the same result."""
    import tokmask_peft.training as loop

    recipe = make_recipe("llama", train={"epochs": 2, "checkpoint_every": 2})
    whole = loop.train(recipe, output_dir=tmp_path / "whole")
    saves = {"n": 0}
    real = loop.Accelerator.save_state

    def dies_in_second_save(self, path, *args, **kwargs):
        saves["n"] += 1
        real(self, path, *args, **kwargs)
        if saves["n"] == 2:
            raise KeyboardInterrupt("killed inside save_state")

    with monkeypatch.context() as m:
        m.setattr(loop.Accelerator, "save_state", dies_in_second_save)
        with pytest.raises(KeyboardInterrupt):
            loop.train(recipe, output_dir=tmp_path / "split")
    assert json.loads((tmp_path / "split" / "checkpoint" / "recipe.json").read_text())
    resumed = loop.train(recipe, output_dir=tmp_path / "split")
    assert resumed["best"]["loss"] == pytest.approx(whole["best"]["loss"], rel=1e-5)


def test_a_full_disk_during_a_checkpoint_is_one_clear_error_and_the_rerun_resumes(make_recipe, tmp_path,
                                                                                  monkeypatch):
    """torch reports a full disk as a C++ enforce failure with a stack trace: the user gets one OSError
    naming the checkpoint and the free space, the half-written copy is gone, the previous one resumes."""
    import torch

    import tokmask_peft.training as loop

    recipe = make_recipe("llama", train={"epochs": 2, "checkpoint_every": 2})
    whole = loop.train(recipe, output_dir=tmp_path / "whole")
    real_save = torch.save

    def full_disk_after_first_checkpoint(obj, f, *args, **kwargs):
        if "checkpoint.new" in str(f) and (tmp_path / "full" / "checkpoint" / "recipe.json").exists():
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598\n"
                               "frame #0: c10::ThrowEnforceNotMet(char const*, int, char const*)")
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk_after_first_checkpoint)
        with pytest.raises(OSError, match=r"could not write the checkpoint .*checkpoint\.new .*unexpected pos "
                           r"704 vs 598\); \d+ MiB free .*previous checkpoint is kept") as raised:
            loop.train(recipe, output_dir=tmp_path / "full")
    assert "frame #0" not in str(raised.value)
    assert not (tmp_path / "full" / "checkpoint.new").exists()
    resumed = loop.train(recipe, output_dir=tmp_path / "full")
    assert resumed["best"]["loss"] == pytest.approx(whole["best"]["loss"], rel=1e-5)


# ---- one writer per directory ---------------------------------------------------------------------


HOLDER = """
import sys, time
from tokmask_peft.storage import hold
with hold(sys.argv[1], "sweep"):
    print("held", flush=True)
    time.sleep(120)
"""


def start_holder(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_sweep_or_train_on_a_directory_in_use_is_refused_naming_the_holder(make_recipe, tmp_path):
    recipe = make_recipe("llama", train={"epochs": 1}, sweep={"rates": [0.0], "seeds": [0]})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    out = tmp_path / "busy"
    holder = start_holder(out)
    try:
        started = time.monotonic()
        for command in (["sweep", path, "--output", out], ["train", path, f"train.output_dir={out}"]):
            proc = cli(*command)
            assert proc.returncode == 1, proc.stderr[-1500:]
            assert f"{out} is in use by another" in proc.stderr and f"pid {holder.pid}" in proc.stderr
        assert time.monotonic() - started < 60  # at once, not after waiting
    finally:
        holder.kill()
        holder.wait()
    assert not list(out.glob("mask_*"))  # nothing was trained into it


def test_a_lock_left_by_kill_9_does_not_block(tmp_path):
    from tokmask_peft.storage import hold

    holder = start_holder(tmp_path / "out")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with hold(tmp_path / "out"):  # the kernel dropped the dead process's lock
        pass


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # a local Ray cluster: on test_ray.py's worker
def test_killing_a_ray_sweep_driver_with_kill_9_then_rerunning_gives_the_uninterrupted_table(make_recipe,
                                                                                              tmp_path):
    pytest.importorskip("ray")
    from tokmask_peft.sweeps import sweep

    recipe = make_recipe("llama", train={"epochs": 2}, sweep={"rates": [0.0, 0.3], "seeds": [0]})  # killed: one done
    sweep(recipe, tmp_path / "local")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    out = tmp_path / "ray"
    command = [sys.executable, "-m", "tokmask_peft.cli", "sweep", str(path), "--output", str(out),
               "--executor", "ray", "--cpus-per-run", "2"]  # one run at a time on 2 CPUs
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("mask_*/seed_0/metrics.json")):  # kill once a run is finished
            assert driver.poll() is None, "the driver ended before a run finished"
            assert time.monotonic() < deadline, "no run finished in 300 s"
            time.sleep(0.2)
    finally:  # killed on failure too: a live driver would hold its Ray cluster after the test
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    assert not (out / "results.csv").exists()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert table(out) == table(tmp_path / "local")


# ---- verified weights, verified base ---------------------------------------------------------------


@pytest.mark.parametrize("damage,message", [
    ("scramble", "is corrupted: its SHA-256 differs"),
    ("truncate", r"holds \d+ bytes, \d+ were written"),
    ("delete", "adapter_model.safetensors is missing")])
def test_damaged_adapter_weights_are_refused_naming_the_file(run_copy, damage, message):
    weights = run_copy / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "scramble":
        data[-4096:] = bytes(reversed(data[-4096:]))  # header intact: it would load and predict NaN
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    else:
        weights.unlink()
    proc = cli("predict", run_copy, stdin="hello\n")
    assert proc.returncode == 1 and not proc.stdout
    assert "adapter_model.safetensors" in proc.stderr and re.search(message, proc.stderr), proc.stderr


def test_an_adapter_is_refused_on_another_base_of_the_same_architecture(run_copy, tmp_path, toy_data):
    import shutil

    from helpers import make_tiny_model

    from tokmask_peft.inference import Classifier

    config_path = run_copy / "tokmask_config.json"
    config = json.loads(config_path.read_text())
    assert config["base_identity"]
    moved = Path(shutil.copytree(config["base_model"], tmp_path / "moved_base"))  # the same weights, elsewhere
    config_path.write_text(json.dumps({**config, "base_model": str(moved)}))
    before = Classifier.from_run(run_copy, device="cpu").predict(["the dog"])  # loading uses base_model
    assert before[0]["label"]
    from safetensors.torch import load_file, save_file

    other = make_tiny_model("llama", tmp_path / "other_base")  # same architecture, then other weights
    state = load_file(other / "model.safetensors")
    save_file({k: v + 0.01 for k, v in state.items()}, other / "model.safetensors", metadata={"format": "pt"})
    config_path.write_text(json.dumps({**config, "base_model": str(other)}))
    with pytest.raises(ValueError, match=rf"identity {config['base_identity']}.*{other}.*other weights"):
        Classifier.from_run(run_copy, device="cpu")


def test_merge_refuses_to_write_into_the_run(run_copy):
    for target in (run_copy, run_copy / "merged"):
        proc = cli("merge", run_copy, "--output", target)
        assert proc.returncode == 1 and "is the run" in proc.stderr
    assert json.loads((run_copy / "tokmask_config.json").read_text())["method"] == "lora"


# ---- bad input: one policy ----------------------------------------------------------------------------


def recipe_dict(tiny_model, toy_data, kind="llama", **data):
    return {"model": {"name": tiny_model(kind), "task": "sequence", "method": "lora"},
            "data": {"train": str(toy_data["train"]), "dev": str(toy_data["dev"]), "max_length": 16, **data},
            "train": {"epochs": 1}}


def test_a_csv_row_without_its_label_field_names_file_and_line(tmp_path):
    from tokmask_peft.data import read_table

    path = tmp_path / "short.csv"
    path.write_text("text,label\ngood film,positive\nno label here\n")
    with pytest.raises(ValueError, match=rf"{path}:3: no value for column 'label'"):
        read_table(path, "csv")


def test_counts_must_be_whole_and_max_length_must_leave_room_for_text(tiny_model, toy_data):
    from tokmask_peft.recipe_setup import Setup

    with pytest.raises(ValueError, match="train.epochs must be a whole number, got 2.7"):
        Recipe.from_dict({**recipe_dict(tiny_model, toy_data), "train": {"epochs": 2.7}})
    assert Recipe.from_dict({**recipe_dict(tiny_model, toy_data), "train": {"epochs": 2.0}}).train.epochs == 2
    for length in (1, 2):  # BERT adds [CLS] and [SEP]: 1 turned truncation off, 2 left no text
        with pytest.raises(ValueError, match=f"data.max_length={length} leaves no room for text"):
            Setup.from_recipe(Recipe.from_dict(recipe_dict(tiny_model, toy_data, "bert", max_length=length)))
    assert Setup.from_recipe(Recipe.from_dict(recipe_dict(tiny_model, toy_data, "bert", max_length=3)))


def test_a_mistyped_relative_model_name_says_no_such_directory_and_no_hub(tmp_path, toy_data, monkeypatch):
    from tokmask_peft.modeling import prepare_tokenizer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    cfg = Recipe.from_dict({"model": {"name": "modles/minilm"}, "data": {"train": "x", "dev": "y"}}).model
    with pytest.raises(FileNotFoundError, match="'modles/minilm': no such local directory .* hub is unreachable"):
        prepare_tokenizer(cfg)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "lince"])
def test_bytes_that_are_not_utf8_name_file_and_line_unless_replacement_is_asked(tmp_path, fmt):
    from tokmask_peft.data import read_examples

    bad = "caf\xe9".encode("latin-1")  # Latin-1 é: not UTF-8
    lines = {"csv": [b"text,label", b"good,positive", bad + b",negative"],
             "jsonl": [b'{"text": "good", "label": "positive"}', b'{"text": "' + bad + b'", "label": "negative"}'],
             "lince": [b"# sent_enum = 1\tpositive", b"good\tlang1", b"", b"# sent_enum = 2\tnegative",
                       bad + b"\tlang2"]}[fmt]
    path = tmp_path / f"data.{fmt}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=rf"{path}:{len(lines)}: bytes that are not UTF-8"):
        read_examples(str(path), fmt, "sequence")
    with pytest.warns(UserWarning, match=r"1 line\(s\) held bytes that are not UTF-8"):
        examples = read_examples(str(path), fmt, "sequence", errors="replace")
    assert "caf\ufffd" in examples[-1].text


def test_a_binary_recipe_is_named(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_bytes(b"model:\n  name: x\n\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match=rf"recipe {path}:3: bytes that are not UTF-8"):
        Recipe.from_yaml(path)


def test_predict_keeps_one_line_per_input_line_and_says_what_was_cut(trained, tmp_path):
    long = " ".join(["the dog"] * 40)
    proc = cli("predict", trained, stdin=f"the dog\n\n{long}\n   \nel perro\n")
    assert proc.returncode == 0, proc.stderr[-1500:]
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["text"] for o in out] == ["the dog", "", long, "   ", "el perro"]
    assert [o.get("error") for o in out] == [None, "empty line", None, "empty line", None]
    assert [o.get("truncated") for o in out] == [False, None, True, None, False]
    assert "1 of 3 input(s) were longer than the model's max_length (16 tokens)" in proc.stderr
    bad = tmp_path / "input.txt"
    bad.write_bytes(b"fine\ncaf\xe9\n")
    proc = cli("predict", trained, "--input", bad)
    assert proc.returncode == 1 and f"{bad}:2: bytes that are not UTF-8" in proc.stderr


@pytest.mark.parametrize("flag,value", [("--tta", "-3"), ("--batch-size", "0"), ("--batch-size", "many")])
def test_predict_refuses_bad_counts_with_argparse_messages(trained, flag, value):
    proc = cli("predict", trained, flag, value, stdin="hello\n")
    assert proc.returncode == 2 and f"argument {flag}:" in proc.stderr and "Traceback" not in proc.stderr


def test_predicting_from_an_unfinished_run_warns(run_copy):
    (run_copy / "metrics.json").unlink()
    proc = cli("predict", run_copy, stdin="hello\n")
    assert proc.returncode == 0 and "training did not finish" in proc.stderr

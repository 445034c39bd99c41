"""A clean console: third-party notices kept off it (and in the run's third_party.log), ours kept on it."""
import shutil
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow
NOISE = ("LOAD REPORT", "gemm_4bit", "FutureWarning", "Loading weights")


def tokmask(*args):
    return subprocess.run([sys.executable, "-m", "tokmask_peft.cli", *map(str, args)], capture_output=True, text=True)


def test_train_and_predict_print_ours_only_unless_verbose(make_recipe, tmp_path):
    recipe = make_recipe("qwen", "sequence", "lora", train={"epochs": 1, "output_dir": str(tmp_path / "run")})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    quiet = tokmask("train", path)
    assert quiet.returncode == 0, quiet.stderr
    assert "weighted_f1=" in quiet.stdout and not [n for n in NOISE if n in quiet.stdout + quiet.stderr]
    kept = (tmp_path / "run" / "third_party.log").read_text()
    assert "LOAD REPORT" in kept and "score.weight" in kept  # the new head, MISSING by design, is on record

    verbose = tokmask("train", path, f"train.output_dir={tmp_path / 'run2'}", "--verbose")
    assert verbose.returncode == 0 and "LOAD REPORT" in verbose.stderr

    # Our own warnings still reach the console: a run whose training never finished.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tmp_path / "run", unfinished)
    (unfinished / "metrics.json").unlink()
    (tmp_path / "in.txt").write_text("nice day\n")
    predicted = tokmask("predict", unfinished, "--input", tmp_path / "in.txt")
    assert predicted.returncode == 0, predicted.stderr
    assert "tokmask: warning:" in predicted.stderr and "did not finish" in predicted.stderr
    assert not [n for n in NOISE if n in predicted.stderr]

"""A clean console: third-party notices kept off it (and in the run's third_party.log), ours kept on it."""
import shutil
import subprocess
import sys

import pytest
import yaml

NOISE = ("LOAD REPORT", "gemm_4bit", "FutureWarning", "Loading weights", "publisher trust check")


def tokmask(*args):
    return subprocess.run([sys.executable, "-m", "tokmask_peft.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.slow
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


@pytest.fixture
def restore_logging():
    import logging
    import warnings

    from tokmask_peft.console import THIRD_PARTY

    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level,
                    logging.getLogger(name).propagate) for name in THIRD_PARTY}
    showwarning, filters = warnings.showwarning, warnings.filters[:]
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate
    warnings.showwarning, warnings.filters[:] = showwarning, filters


def test_quiet_keeps_library_warnings_off_the_console_and_ours_on_it(restore_logging, capsys):
    import logging
    import warnings

    from tokmask_peft.console import TokmaskWarning, quiet

    quiet()
    # kernels (loaded by bitsandbytes) says this on every offline QLoRA load
    logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check for 'x/y'")
    logging.getLogger("transformers.modeling_utils").warning("LOAD REPORT: classifier.weight MISSING")
    logging.getLogger("peft").error("a real error")
    warnings.warn("ours", TokmaskWarning)
    err = capsys.readouterr().err
    assert "publisher trust" not in err and "LOAD REPORT" not in err
    assert "peft: ERROR: a real error" in err and "tokmask: warning: ours" in err
    quiet(verbose=True)
    logging.getLogger("kernels").warning("Skipping publisher trust check for 'x/y'")
    assert "publisher trust" in capsys.readouterr().err


def test_kept_in_writes_the_blocks_notices_to_the_runs_log_and_only_then(restore_logging, tmp_path):
    import logging

    from tokmask_peft.console import THIRD_PARTY_LOG, kept_in, quiet

    quiet()
    with kept_in(tmp_path / "run"):
        logging.getLogger("kernels").warning("offline: trust check skipped")
        logging.getLogger("transformers").info("too small to keep")
    logging.getLogger("kernels").warning("after the block")
    log = (tmp_path / "run" / THIRD_PARTY_LOG).read_text()
    assert "kernels: WARNING: offline: trust check skipped" in log
    assert "too small" not in log and "after the block" not in log
    with pytest.raises(RuntimeError), kept_in(tmp_path / "refused"):
        raise RuntimeError("refused before anything was said")
    assert not (tmp_path / "refused" / THIRD_PARTY_LOG).exists()


LIBRARY_USER = """
import logging, warnings
import tokmask_peft
tokmask_peft.Recipe  # the first heavy name a user touches loads the stack, quiet
logging.getLogger("transformers.modeling_utils").warning("LOAD REPORT: classifier.weight MISSING")
logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check for 'x/y'")
warnings.warn_explicit("old argument", FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
logging.getLogger("peft").error("a real error")
warnings.warn("the user's own warning")
"""


@pytest.mark.parametrize("verbose", [False, True], ids=["default", "TOKMASK_VERBOSE"])
def test_python_users_get_the_clis_quiet_and_keep_their_own_warnings(verbose):
    import os

    env = {**os.environ, **({"TOKMASK_VERBOSE": "1"} if verbose else {})}
    env.pop("TOKMASK_VERBOSE", None) if not verbose else None
    err = subprocess.run([sys.executable, "-c", LIBRARY_USER], capture_output=True, text=True, env=env).stderr
    assert "a real error" in err and "the user's own warning" in err
    for noise in ("LOAD REPORT", "publisher trust check", "old argument"):
        assert (noise in err) == verbose, (noise, err)

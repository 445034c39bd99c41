"""The same loop under torchrun on 2 CPU processes (Accelerate: MULTI_CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import logged_losses

pytestmark = pytest.mark.slow

SCRIPT = """
import os
import sys
from accelerate import PartialState
from tokmask_peft.config import Recipe
from tokmask_peft.training import train
from torch._dynamo.utils import counters
for path in sys.argv[1:]:  # one launch, runs one after another in the same processes (as a sweep does)
    metrics = train(Recipe.from_yaml(path))
    state = PartialState()
    line = (f"RANK {state.process_index} OF {state.num_processes} {state.distributed_type} STEPS {metrics['steps']} "
            f"GRAPHS {counters['stats']['unique_graphs']} {path}\\n")
    sys.stdout.flush()
    os.write(1, line.encode())  # one write below PIPE_BUF: the two ranks' lines never interleave on the pipe
"""


def test_torchrun_two_cpu_processes_write_one_set_of_files(make_recipe, tmp_path):
    import yaml

    # The last run compiles its layers (train.compile): under DDP it must train as the eager one did.
    runs = (("sequence", False), ("token", False), ("sequence", True))
    recipes, paths = [], []
    for task, compiled in runs:
        recipe = make_recipe("llama", task, "lora", train={"epochs": 2, "batch_size": 8, "compile": compiled,
                                                            "output_dir": str(tmp_path / f"{task}{compiled}")})
        paths.append(tmp_path / f"{task}{compiled}.yaml")
        paths[-1].write_text(yaml.safe_dump(recipe.to_dict()))
        recipes.append(recipe)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *map(str, paths)], capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for recipe, path, (task, compiled) in zip(recipes, paths, runs):
        lines = sorted(line.rsplit(" ", 1)[0] for line in proc.stdout.splitlines()
                       if line.startswith("RANK") and line.endswith(str(path)))
        # 96 examples, batch 8 per process, 2 processes: 6 updates per epoch, 2 epochs. Graphs: the
        # dynamo counter is per process and cumulative, so only the compiled (last) run has any.
        assert [line.rsplit(" ", 2)[0] for line in lines] == [
            "RANK 0 OF 2 DistributedType.MULTI_CPU STEPS 12", "RANK 1 OF 2 DistributedType.MULTI_CPU STEPS 12"]
        graphs = [int(line.rsplit(" ", 1)[1]) for line in lines]
        assert all((n > 0) == compiled for n in graphs), (task, compiled, graphs)
        out = Path(recipe.train.output_dir)
        files = sorted(p.name for p in out.iterdir())
        assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "log.jsonl", "metrics.json",
                         "predictions.npz", "third_party.log", "tokenizer.json", "tokenizer_config.json", "tokmask_config.json"], files
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["world_size"] == 2 and len(metrics["history"]) == 2
        assert metrics["dev_examples"] == 32
        assert sum(1 for line in (out / "log.jsonl").read_text().splitlines() if '"eval"' in line) == 2
    losses = {run: logged_losses(tmp_path / run) for run in ("sequenceFalse", "sequenceTrue")}
    assert losses["sequenceTrue"] == pytest.approx(losses["sequenceFalse"], abs=1e-5) and len(losses["sequenceTrue"]) == 12

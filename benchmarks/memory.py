"""Target 4: 4-bit NF4 base weights against bf16 for the same decoder (≤ 0.35×), and peak
training memory of full vs LoRA vs QLoRA (each in its own process).

    python benchmarks/memory.py [--shape medium] [--tiny]          # CPU: resident set size
    python benchmarks/memory.py --shape tinyllama-1.1b --batch 16 --length 128   # GPU: allocated

Peak memory: on a GPU ``torch.cuda.max_memory_allocated``; on a CPU the process's maximum
resident size (which also counts Python, torch and the tokenised data).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import SHARED, lince_recipe, make_decoder, write_result  # noqa: E402


def weight_footprints(model_dir: Path) -> dict[str, float]:
    """Bytes of the loaded base: bf16 vs bitsandbytes 4-bit NF4 (double quantisation)."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    device = {"": 0} if torch.cuda.is_available() else None
    out = {}
    for name, kwargs in {
        "bf16": {"dtype": torch.bfloat16},
        "nf4": {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["score"]), "dtype": torch.bfloat16},
    }.items():
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3, device_map=device, **kwargs)
        out[name] = model.get_memory_footprint() / 2**20
        del model
    return out


def long_texts(path: Path, n: int) -> Path:
    import csv

    from tokmask_peft.data import read_lince

    tweets = read_lince(SHARED / "data" / "lince" / "sa_spaeng" / "train.conll", "sequence")
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            group = tweets[8 * i: 8 * i + 8]
            writer.writerow([" ".join(t.text for t in group), group[0].label])
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="medium")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--methods", default="full,lora,qlora")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    shape, n_train = ("tiny", 32) if args.tiny else (args.shape, args.train)
    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_decoder(shape, tmp / "model")
        footprint = weight_footprints(model_dir)
        ratio = footprint["nf4"] / footprint["bf16"]
        print(f"base weights ({shape}): bf16 {footprint['bf16']:.1f} MiB, NF4 {footprint['nf4']:.1f} MiB "
              f"-> {ratio:.3f}x (target <= 0.35)")
        # Memory at the stated batch x length, not at tweet length: each example joins 8 real
        # LinCE tweets, so every one is truncated to exactly --length tokens.
        data = long_texts(tmp / "long.csv", n_train + 32)
        recipe = lince_recipe(model_dir, tmp / "runs", data={"format": "csv", "train": str(data), "dev": "",
                                                             "dev_fraction": 32 / (n_train + 32),
                                                             "max_length": args.length},
                              model={"dtype": "bfloat16" if gpu else "float32", "gradient_checkpointing": gpu},
                              train={"batch_size": args.batch, "max_steps": 3 if not args.tiny else 1,
                                     "mixed_precision": "bf16" if gpu else "no"})
        from tokmask_peft.comparison import compare
        from tokmask_peft.config import Recipe

        rows = compare(Recipe.from_dict(recipe), tmp / "compare", args.methods.split(","),
                       {"full": ["train.lr=2e-5"]})
    peak = {r["method"]: r["peak_memory_mb"] for r in rows}
    for r in rows:
        print(f"peak training memory {r['method']:5s}: {r['peak_memory_mb']:8.1f} MiB "
              f"({'cuda allocated' if gpu else 'cpu max RSS'}), trainable {r['trainable_params']:,}")
    result = {"shape": shape, "device": "cuda" if gpu else "cpu", "batch": args.batch, "length_cap": args.length,
              "weights_mib": footprint, "nf4_vs_bf16": ratio, "target": "<= 0.35", "peak_training_mib": peak,
              "rows": rows}
    write_result("memory" + ("_tiny" if args.tiny else "") + ("_gpu_" + shape if gpu else ""), result, args.out)
    return result


if __name__ == "__main__":
    main()

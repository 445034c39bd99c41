"""Target 4: 4-bit NF4 base weights against bf16 for the same decoder (≤ 0.35×), and peak
training memory of full vs LoRA vs QLoRA (each in its own process).

    python benchmarks/memory.py [--shape medium] [--tiny]          # CPU: resident set size
    python benchmarks/memory.py --shape tinyllama-1.1b --batch 16 --length 128   # GPU: allocated

Peak memory: on a GPU ``torch.cuda.max_memory_allocated``; on a CPU the process's maximum
resident size (which also counts Python, torch and the tokenised data).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import SHARED, benchmark_parser, decoder, lince_recipe, write_result  # noqa: E402


def weight_footprints(model_dir: Path) -> dict[str, float]:
    """Bytes of the loaded base: bf16 vs bitsandbytes 4-bit NF4 (double quantisation)."""
    from transformers import AutoModelForSequenceClassification

    from tokmask_peft.config import ModelConfig
    from tokmask_peft.modeling import quantization_config

    device = {"": 0} if torch.cuda.is_available() else None
    nf4 = quantization_config(ModelConfig(name=str(model_dir), method="qlora", quant_bits=4, dtype="bfloat16"))
    out = {}
    for name, kwargs in {"bf16": {"dtype": torch.bfloat16},
                         "nf4": {"quantization_config": nf4, "dtype": torch.bfloat16}}.items():
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
    args = benchmark_parser(__doc__, shape="medium", batch=16, length=128, train=160,
                            methods="full,lora,qlora").parse_args(argv)
    shape, n_train = ("tiny", 32) if args.tiny else (args.shape, args.train)
    gpu = torch.cuda.is_available()
    with decoder(shape) as (tmp, model_dir):
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

"""Cost of masking one 64 x 128 batch: TokenMasker at p=0.1 against a plain clone of the batch.

    python benchmarks/masking_cost.py [--repeats 200] [--tiny]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import alternate, benchmark_parser, median, write_result  # noqa: E402

from tokmask_peft.masking import TokenMasker  # noqa: E402


def main(argv=None) -> dict:
    args = benchmark_parser(__doc__, repeats=200, rows=64, cols=128).parse_args(argv)
    repeats = 5 if args.tiny else args.repeats
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 150_000, (args.rows, args.cols), generator=g)
    attn = (torch.arange(args.cols)[None] < torch.randint(5, args.cols, (args.rows, 1), generator=g)).long()
    masker = TokenMasker(mask_id=151_669, special_ids=range(151_643, 151_670), rate=0.1, seed=0)
    times = alternate({"mask": lambda: masker(ids, attn), "clone": ids.clone}, repeats=repeats, warmup=3)
    result = {
        "batch": [args.rows, args.cols], "rate": 0.1, "special_ids": 27, "repeats": repeats,
        "median_mask_us": median(times["mask"]) * 1e6, "median_clone_us": median(times["clone"]) * 1e6,
    }
    print(f"masking a {args.rows}x{args.cols} batch at p=0.1: {result['median_mask_us']:.0f} us median "
          f"(a plain clone: {result['median_clone_us']:.0f} us) over {repeats} repeats")
    write_result("masking_cost", result, args.out)
    return result


if __name__ == "__main__":
    main()

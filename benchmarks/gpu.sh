#!/usr/bin/env bash
# Every GPU figure the README still lacks, in one call (target: <= 8 minutes on one H100), each written as
# JSON to benchmarks/results/ with the machine and versions. Run from the repository root when a GPU is
# available (the device tool: `run` with `bash benchmarks/gpu.sh`); none has been lent so far.
#   1. serving, batched vs unbatched at 32 clients (torch backend on the GPU; ONNX is the CPU path)
#   2. sweep.side_by_side: 6 rates side by side vs one by one, the Qwen2.5-0.5B shape (24 layers)
#   3. training throughput against the HF Trainer grouped by length, eager and compiled
set -euo pipefail
export TOKMASK_SHARED="${TOKMASK_SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh needs a CUDA GPU')"
out=benchmarks/results
started=$(date +%s)
python benchmarks/serve_load.py --seconds 20 --clients 1,32 --backends torch --generators python --out "$out/gpu_serve" 2>&1 | tail -3
python benchmarks/side_by_side.py --shape qwen2.5-0.5b --rates 6 --train 256 --out "$out/gpu_side_by_side" 2>&1 | tail -3
python benchmarks/throughput.py --shape qwen2.5-0.5b --compile --bf16 --repeats 2 --out "$out/gpu_throughput" 2>&1 | tail -3
echo "benchmarks/gpu.sh: $(( $(date +%s) - started )) s"

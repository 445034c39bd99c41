"""``tokmask serve``: runs and sweeps behind HTTP, one base per compatible group of adapters.

Three parts. :class:`AdapterPool` loads what the command line names (a run, a sweep, several runs)
and gives every adapter a public name; adapters trained on the same base (weights, tokenizer,
quantisation) are attached to one :class:`~tokmask_peft.inference.Classifier`, whatever their task and
labels (each task adapter brings its own head), the others get their own.
:class:`Batcher` groups concurrent requests for one adapter into one forward pass, in one worker
thread, so an adapter is never switched while a batch is in flight. :func:`create_app` is the
Starlette app: text-embeddings-inference's classifier ``/predict`` (plus ``"adapter"``),
``/adapters``, ``/health`` and Prometheus ``/metrics``, behind an optional bearer key.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from .data import was_truncated
from .inference import Classifier, best_rate_name, check_compatible, default_name
from .problems import decide
from .problems import scores as problem_scores
from .runs import METRICS_FILE, TOKMASK_CONFIG, read_run_config, run_dirs
from .storage import read_json

API_KEY_ENV = "TOKMASK_API_KEY"


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, and the message the client gets."""

    def __init__(self, status: int, message: str, kind: str = "Validation"):
        super().__init__(message)
        self.status, self.kind = status, kind


# ---- the adapters being served --------------------------------------------------------------------


@dataclasses.dataclass
class Served:
    """One servable adapter: the Classifier holding it and its name there."""
    name: str
    classifier: Classifier
    internal: str
    run_dir: Path
    config: dict
    best_of_sweep: bool = False

    @property
    def paired(self) -> bool:
        """Whether it takes sentence pairs."""
        return bool(self.config.get("text_pair"))

    def describe(self) -> dict:
        metrics = self.run_dir / METRICS_FILE
        best = read_json(metrics, "metrics file")["best"] if metrics.is_file() else {}
        masking = self.config["masking"]
        return {"name": self.name, "task": self.config["task"], "labels": self.config["labels"],
                "problem_type": self.config.get("problem_type", "single_label"), "pairs": self.paired,
                **({"thresholds": self.config["thresholds"]} if self.config.get("thresholds") else {}),
                "method": self.config["method"], "base_model": self.config["base_model"],
                "rate": masking["rate"], "unit": masking.get("unit", "token"), "run": str(self.run_dir),
                "dev": {k: v for k, v in best.items() if k not in ("step", "epoch")},
                "best_of_sweep": self.best_of_sweep}


def parse_spec(spec: str) -> tuple[str | None, Path]:
    """``NAME=PATH`` or ``PATH``."""
    name, sep, path = spec.partition("=")
    if sep and name and re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        return name, Path(path)
    return None, Path(spec)


def runs_of(path: Path, seed: int) -> tuple[dict[str, Path], str]:
    """A run → ``{its name: it}``; a sweep → every rate's seed-``seed`` run, by adapter name. Also
    the name to serve by default: the run, or the rate best on dev by the sweep's selection metric."""
    if (path / TOKMASK_CONFIG).is_file():
        name = default_name(read_run_config(path))
        return {name: path}, name
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run or sweep directory")
    runs = {default_name(read_run_config(p)): p for p in run_dirs(path, seed)}
    if not runs:
        raise FileNotFoundError(f"{path} holds no finished runs (mask_*/seed_{seed}): not a run or a sweep")
    return runs, best_rate_name(path, runs)


def _as_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer of hundreds of digits
        return math.inf


class AdapterPool:
    """Every adapter named on the command line, by public name, on as few bases as compatibility allows.

    One PATH: names are the sweep's (``mask_0.10``). Several: each is prefixed by ``NAME`` from
    ``NAME=PATH`` or the directory's name (``sa/mask_0.10``; a run is just ``sa``), and the prefix
    alone names the sweep's best rate.
    """

    def __init__(self, specs: list[str], seed: int = 0, device: str | None = None, backend: str = "torch"):
        if not specs:
            raise ValueError("name at least one run or sweep to serve")
        if backend not in (*BACKENDS, "auto"):
            raise ValueError(f"backend must be one of {[*BACKENDS, 'auto']}, got {backend!r}")
        self.backend, self.backend_reason = (auto_backend(specs, seed, device) if backend == "auto"
                                             else (backend, "as asked"))
        self.served: dict[str, Served] = {}
        self.aliases: dict[str, str] = {}
        self.classifiers: list[Classifier] = []
        self.default = ""
        for spec in specs:
            prefix, path = parse_spec(spec)
            if prefix is None and len(specs) > 1:
                prefix = path.resolve().name
            self._load(prefix, path, seed, device)

    def _load(self, prefix: str | None, path: Path, seed: int, device: str | None) -> None:
        runs, best = runs_of(path, seed)
        single_run = (path / TOKMASK_CONFIG).is_file()
        for local, run in runs.items():
            name = prefix if (prefix and single_run) else f"{prefix}/{local}" if prefix else local
            if name in self.served or name in self.aliases:
                raise ValueError(f"two adapters would both be served as {name!r} ({run} and "
                                 f"{self.served[name].run_dir if name in self.served else 'a sweep'}): "
                                 "name them apart with NAME=PATH")
            self.served[name] = self._attach(name, run, device, best_of_sweep=not single_run and local == best)
        top = prefix if (prefix and single_run) else f"{prefix}/{best}" if prefix else best
        if prefix and not single_run:
            self.aliases[prefix] = top
        self.default = self.default or top

    def _attach(self, name: str, run: Path, device: str | None, best_of_sweep: bool) -> Served:
        config = read_run_config(run)
        if self.backend != "torch" or "onnx" in config:
            return self._attach_onnx(name, run, config, best_of_sweep)
        internal = re.sub(r"[^A-Za-z0-9_]", "_", name) + f"_{len(self.served)}"
        for clf in self.classifiers:
            if clf.adapter_set is None or config["method"] == "full":
                continue
            try:
                check_compatible(clf.config, config, str(run))
            except ValueError:
                continue
            clf.add_adapter(run, internal)
            return Served(name, clf, internal, run, config, best_of_sweep)
        clf = Classifier.from_run(run, name=internal, device=device)
        self.classifiers.append(clf)
        return Served(name, clf, internal, run, config, best_of_sweep)

    def _attach_onnx(self, name: str, run: Path, config: dict, best_of_sweep: bool) -> Served:
        """An ONNX Runtime session of its own per adapter (an export holds its merged base: K adapters are
        K copies of the base, which the torch backend shares); a run is exported into the cache first."""
        if self.backend == "torch":
            raise ValueError(f"{run} is an ONNX export: serve it with --backend onnx")
        from .onnx_export import cached_export, onnx_classifier

        int8 = self.backend == "onnx-int8"
        folder = run if "onnx" in config else cached_export(run, "int8" if int8 else None)
        clf = onnx_classifier(folder, quantized=int8)
        self.classifiers.append(clf)
        return Served(name, clf, clf.name, run, clf.config, best_of_sweep)

    def resolve(self, wanted: Any) -> Served:
        """The adapter a request asks for: None (the default), a name, a sweep's prefix, or a rate."""
        if wanted is None:
            return self.served[self.default]
        if isinstance(wanted, bool) or not isinstance(wanted, (str, int, float)):
            raise RequestError(422, f"\"adapter\" must be a name or a masking rate, got {json.dumps(wanted)}")
        if isinstance(wanted, str):
            name = self.aliases.get(wanted, wanted)
            if name not in self.served:
                raise RequestError(404, f"no adapter {wanted!r}; served: {sorted(self.served)}", "NotFound")
            return self.served[name]
        if not math.isfinite(rate := _as_float(wanted)):
            raise RequestError(422, f"\"adapter\" {str(wanted)[:40]}… is not a masking rate (a number from 0 to 1) "
                               "nor a name")
        matches = [s for s in self.served.values() if math.isclose(s.config["masking"]["rate"], rate)]
        if len(matches) != 1:
            found = "none has" if not matches else f"{[s.name for s in matches]} all have"
            raise RequestError(404 if not matches else 422, f"adapter rate {wanted}: {found} that masking rate; "
                               f"name one of {sorted(self.served)}", "NotFound" if not matches else "Validation")
        return matches[0]

    def predict(self, served: Served, items: list[tuple]) -> list[torch.Tensor]:
        """Logits per encoded input (``(example, feature)``, see :func:`prepare`) with ``served`` active
        (called from the batcher's one worker thread)."""
        clf = served.classifier
        if clf.adapter_set is not None:
            clf.use(served.internal)
        examples, features = [e for e, _ in items], [f for _, f in items]
        return [row for row, _ in clf.forward(examples, features, batch_size=max(1, len(items)))]


BACKENDS = ("torch", "onnx", "onnx-int8")
"""What runs the forward passes: PyTorch (adapters share their base), or ONNX Runtime (``tokmask export``),
with fp32 or dynamic int8 weights."""


def auto_backend(specs: list[str], seed: int = 0, device: str | None = None) -> tuple[str, str]:
    """``--backend auto``: ONNX Runtime (fp32) where it is faster and costs no memory, else torch; and why.

    ONNX on CPU served 2.4x torch's requests/s at 1 client, 1.08x at 32 (README, serving); but an export
    holds its merged base, so K adapters of one base would be K copies of it, which torch shares: those
    stay torch. int8 changes the answers (a dev F1 change per export), so it is never picked for the user."""
    import importlib.util

    if device not in (None, "cpu") or (device is None and torch.cuda.is_available()):
        return "torch", f"device {device or 'cuda'}: ONNX Runtime is served on CPU only"
    if importlib.util.find_spec("onnxruntime") is None:
        return "torch", "onnxruntime is not installed (pip install 'tokmask-peft[onnx]')"
    configs = [read_run_config(run) for spec in specs for run in runs_of(parse_spec(spec)[1], seed)[0].values()]
    adapters = sum(1 for c in configs if c["method"] != "full" and "onnx" not in c)
    if adapters > 1:
        return "torch", f"{adapters} adapters share their base in torch; ONNX would hold a copy of it per adapter"
    return "onnx", "CPU, no base shared between adapters"


def prepare(served: Served, texts: list) -> tuple[list[tuple], list[int]]:
    """Each input tokenised once, for its adapter (the server calls this off its event loop: a long text
    takes seconds): the ``(example, feature)`` pairs the batcher sorts by length and the forward pass takes,
    and the indices of the inputs ``max_length`` cut short."""
    examples, features = served.classifier.encoded(texts, served.config)
    return list(zip(examples, features)), [i for i, (f, e) in enumerate(zip(features, examples)) if was_truncated(f, e)]


def token_length(item: tuple) -> int:
    return len(item[1]["input_ids"])


def scored(logits: torch.Tensor, text, served: Served, raw_scores: bool) -> list[dict]:
    """text-embeddings-inference's shape: ``[{"label", "score"}]`` best first; per word for token tasks.
    Multi-label scores are a sigmoid per label (TEI would softmax them), each marked ``"predicted"`` when at
    or above the label's threshold; a regression answers ``[{"label": "score", "score": value}]``."""
    labels, problem = served.config["labels"], served.config.get("problem_type", "single_label")
    if served.config["task"] == "sequence":
        scores = logits if raw_scores or problem == "regression" else problem_scores(problem, logits)
        ranked = sorted(zip(labels, scores.tolist(), range(len(labels))), key=lambda row: -row[1])
        if problem != "multi_label":
            return [{"label": label, "score": score} for label, score, _ in ranked]
        on = decide(problem, problem_scores(problem, logits), served.config.get("thresholds")).tolist()
        return [{"label": label, "score": score, "predicted": bool(on[i])} for label, score, i in ranked]
    out = []
    for word, row in zip(text.split(), logits):
        if torch.isnan(row).any():  # past max_length, sent with "truncate": true
            out.append({"word": word, "label": None, "score": None})
            continue
        scores = row if raw_scores else row.softmax(-1)
        best = int(scores.argmax())
        out.append({"word": word, "label": labels[best], "score": float(scores[best])})
    return out


# ---- dynamic batching ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Pending:
    texts: list
    future: asyncio.Future
    arrived: float


def _nothing(*args) -> None:
    return None


class Batcher:
    """Groups concurrent requests for the same adapter into forward passes.

    A batch starts with the oldest waiting request and takes later requests for that adapter until
    ``max_batch`` inputs or until the oldest has waited ``max_wait_s``. Its inputs are then sorted by
    ``length`` and cut into forward passes of at most ``max_batch`` inputs and ``max_batch_tokens`` padded
    tokens (inputs × the longest), so a long text does not pad many short ones. Forward passes run one at a
    time in one worker thread (the event loop keeps accepting requests meanwhile), so the adapter active
    during a pass is its own. Other adapters' requests wait their turn, oldest first. ``on_wait(key, s)``,
    ``on_forward(key, s)`` and ``on_batch(n)`` receive the timings and sizes.
    """

    def __init__(self, forward: Callable[[Any, list], list], max_batch: int, max_wait_s: float,
                 on_batch: Callable[[int], None] = _nothing, max_batch_tokens: int | None = None,
                 length: Callable[[Any], int] = lambda item: 1, on_wait: Callable = _nothing,
                 on_forward: Callable = _nothing):
        self.forward, self.max_batch, self.max_wait_s, self.on_batch = forward, max_batch, max_wait_s, on_batch
        self.max_batch_tokens, self.length = max_batch_tokens, length
        self.on_wait, self.on_forward = on_wait, on_forward
        self.queues: dict[Any, collections.deque[_Pending]] = collections.defaultdict(collections.deque)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="tokmask-forward")
        self.arrival = asyncio.Event()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.executor.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    async def submit(self, key, texts: list[str]) -> list:
        future = asyncio.get_running_loop().create_future()
        self.queues[key].append(_Pending(texts, future, time.monotonic()))
        self.arrival.set()
        return await future

    def _waiting(self, key) -> int:
        return sum(len(p.texts) for p in self.queues[key])

    async def _run(self) -> None:
        while True:
            waiting = {k: q for k, q in self.queues.items() if q}
            if not waiting:
                self.arrival.clear()
                await self.arrival.wait()
                continue
            key = min(waiting, key=lambda k: waiting[k][0].arrived)
            deadline = waiting[key][0].arrived + self.max_wait_s
            while self._waiting(key) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self.arrival.clear()
                try:
                    await asyncio.wait_for(self.arrival.wait(), left)
                except asyncio.TimeoutError:
                    break
            await self._forward(key, self._take(key))

    def _take(self, key) -> list[_Pending]:
        """Requests from the head of ``key``'s queue up to ``max_batch`` texts (at least one request)."""
        queue, batch, size = self.queues[key], [], 0
        while queue and (not batch or size + len(queue[0].texts) <= self.max_batch):
            pending = queue.popleft()
            if not pending.future.done():  # a client that went away is not computed for
                batch.append(pending)
                size += len(pending.texts)
        return batch

    def passes(self, items: list) -> list[list[int]]:
        """Indices of ``items`` per forward pass: sorted by length, at most ``max_batch`` inputs and
        ``max_batch_tokens`` padded tokens each (an input longer than the budget goes alone)."""
        order = sorted(range(len(items)), key=lambda i: self.length(items[i]))
        out: list[list[int]] = []
        for i in order:
            current = out[-1] if out else None
            size = len(current) + 1 if current else 1
            if current and size <= self.max_batch and (
                    not self.max_batch_tokens or size * self.length(items[i]) <= self.max_batch_tokens):
                current.append(i)
            else:
                out.append([i])
        return out

    async def _forward(self, key, batch: list[_Pending]) -> None:
        if not batch:
            return
        items = [t for p in batch for t in p.texts]
        began = time.monotonic()
        for p in batch:
            self.on_wait(key, began - p.arrived)
        try:
            rows = [None] * len(items)
            for indices in self.passes(items):
                self.on_batch(len(indices))
                started = time.monotonic()
                done = await asyncio.get_running_loop().run_in_executor(self.executor, self.forward, key,
                                                                        [items[i] for i in indices])
                self.on_forward(key, time.monotonic() - started)
                for i, row in zip(indices, done):
                    rows[i] = row
        except Exception as e:  # the model's error goes to every request of the batch; the loop goes on
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        start = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result(rows[start:start + len(p.texts)])
            start += len(p.texts)

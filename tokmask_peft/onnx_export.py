"""A run as an ONNX Runtime model: merged, exported with dynamic batch and length, checked against PyTorch.

ONNX Runtime is what classifiers are served with on CPUs (text-embeddings-inference runs it there). The
export merges the adapter into its full-precision base (QLoRA: the unquantised base, as ``merge_run``
does), exports the classifier with its head through ``torch.onnx`` (the TorchScript exporter: no
onnxscript needed), writes the tokenizer, ``tokmask_config.json``, ``metrics.json`` and a model card
beside it, and compares the exported logits with PyTorch's on the run's dev texts. ``quantize='int8'``
adds ONNX Runtime's dynamic int8 quantisation and measures what it changes on dev.

An exported model predicts through the same :class:`~tokmask_peft.inference.Classifier` as any run:
:class:`OnnxModel` stands where the PyTorch module would, answering ``model(**batch).logits``.
"""
from __future__ import annotations

import shutil
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

from .inference import Classifier, default_name, merge_run
from .model_card import CARD, card
from .runs import METRICS_FILE, TOKMASK_CONFIG, read_run_config, verify_weights, weight_record, with_meaning
from .storage import atomic_write_text, read_json, write_json

__all__ = ["export_run", "cached_export", "onnx_classifier", "OnnxModel", "ONNX_FILE", "INT8_FILE"]
ONNX_FILE, INT8_FILE = "model.onnx", "model.int8.onnx"
TOLERANCE = 1e-4
"""The largest difference between exported and PyTorch logits an export accepts."""
CHECK_TEXTS = 256
"""Dev texts the check compares on (and the int8 F1 change is measured on)."""
FALLBACK_TEXTS = ["a short text", "another, somewhat longer text to check the export with", "ok"]


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("the ONNX backend needs onnx and onnxruntime: pip install 'tokmask-peft[onnx]'") from None
    return onnxruntime


class OnnxModel:
    """An ONNX Runtime session behind the call a classifier makes: ``model(**batch).logits``."""

    def __init__(self, path: str | Path, threads: int | None = None):
        ort = _onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, **batch) -> types.SimpleNamespace:
        ids = batch["input_ids"]
        feed = {name: (batch[name] if name in batch else torch.zeros_like(ids)).cpu().numpy().astype(np.int64)
                for name in self.inputs}
        return types.SimpleNamespace(logits=torch.from_numpy(self.session.run(None, feed)[0]))

    def eval(self) -> "OnnxModel":
        return self

    def to(self, *args, **kwargs) -> "OnnxModel":
        return self  # ONNX Runtime's CPU provider: where the session already is


def onnx_classifier(folder: str | Path, quantized: bool = False, threads: int | None = None) -> Classifier:
    """A :class:`Classifier` over an exported model (``tokmask export``): predict, tta and serving as for a run."""
    from .modeling import classifier_tokenizer

    folder = Path(folder)
    config = read_run_config(folder)
    if "onnx" not in config:
        raise ValueError(f"{folder} is not an ONNX export (no 'onnx' entry in its {TOKMASK_CONFIG}): run "
                         "tokmask export first")
    verify_weights(folder, config)
    file = INT8_FILE if quantized else ONNX_FILE
    if not (folder / file).is_file():
        raise FileNotFoundError(f"{folder / file} does not exist" + (": export with --quantize int8" if quantized
                                                                     else ""))
    model = OnnxModel(folder / file, threads)
    return Classifier(model, classifier_tokenizer(folder), config, torch.device("cpu"), default_name(config))


def export_run(run: str | Path, output: str | Path, quantize: str | None = None) -> dict:
    """Export finished run ``run`` into ``output`` (see the module's docstring); returns what the check
    measured: ``max_abs_diff`` (and, with int8, ``int8_max_abs_diff`` and the dev metric before and after)."""
    run, output = Path(run), Path(output)
    if output.resolve() == run.resolve() or run.resolve() in output.resolve().parents:
        raise ValueError(f"export output {output} is the run {run} or inside it: choose a directory outside the run")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be int8 or none, got {quantize!r}")
    _onnxruntime()
    config = read_run_config(run)
    with tempfile.TemporaryDirectory() as scratch:  # merge_run / from_run verify the weights before any write
        source = run if config["method"] == "full" else merge_run(run, Path(scratch) / "merged")
        reference = Classifier.from_run(source, device="cpu")
        output.mkdir(parents=True, exist_ok=True)
        texts, where = check_texts(config)
        _export(reference, output / ONNX_FILE, texts)
        reference.tokenizer.save_pretrained(output)
    measured = {"checked_on": where, "max_abs_diff": _difference(reference, output / ONNX_FILE, texts)}
    if measured["max_abs_diff"] > TOLERANCE:
        raise ValueError(f"the exported logits differ from PyTorch's by {measured['max_abs_diff']:.2e} (more than "
                         f"{TOLERANCE:g}) on {where}: the export is not faithful; {output} is left for inspection")
    if quantize:
        measured.update(_quantized(reference, output, texts))
    _write_files(run, output, config, measured)
    return measured


def cache_root() -> Path:
    import os

    return Path(os.environ.get("TOKMASK_CACHE", Path.home() / ".cache" / "tokmask_peft")) / "onnx"


def cached_export(run: str | Path, quantize: str | None = None) -> Path:
    """``run`` exported once into the cache (``$TOKMASK_CACHE``, else ``~/.cache/tokmask_peft``), keyed by
    what its weights are and mean (and the quantisation), so a retrained or edited run is exported anew;
    later calls reuse it."""
    import hashlib
    import json

    run = Path(run)
    config = read_run_config(run)
    key = hashlib.sha256(json.dumps([config.get("meaning_sha256"), config.get("weights"), quantize], sort_keys=True,
                                    default=str).encode()).hexdigest()[:20]
    target = cache_root() / key
    if (target / TOKMASK_CONFIG).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".exporting-") as scratch:
        export_run(run, Path(scratch) / "model", quantize)
        try:
            (Path(scratch) / "model").rename(target)  # whole, or not at all
        except OSError:
            if not (target / TOKMASK_CONFIG).is_file():  # (another server exported it meanwhile: use theirs)
                raise
    return target


def check_texts(config: dict) -> tuple[list, str]:
    """The run's first :data:`CHECK_TEXTS` dev texts (pairs and labels kept), or a few fixed texts where its
    data is not at hand."""
    from .config import Recipe
    from .recipe_setup import read_splits

    try:  # dev only: the extra sets (another corpus, thousands of rows) are not read
        dev = read_splits(Recipe.from_dict(config["recipe"]), extra_sets=False).dev[:CHECK_TEXTS]
    except (OSError, ValueError):
        return FALLBACK_TEXTS, "three fixed texts (the run's dev data was not found)"
    return dev, f"{len(dev)} dev texts"


def _export(reference: Classifier, path: Path, texts: list) -> None:
    from .data import encode, padding_collator
    from .inference import as_examples

    examples = as_examples(texts[:2], reference.task)
    batch = padding_collator(reference.tokenizer, reference.task)(
        encode(examples, reference.tokenizer, reference.task, None, reference.config["max_length"]))
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in batch]
    axes = {n: {0: "batch", 1: "length"} for n in names}
    axes["logits"] = {0: "batch", 1: "length"} if reference.task == "token" else {0: "batch"}
    model = reference.model.float().eval()
    try:
        torch.onnx.export(model, tuple(batch[n] for n in names), str(path), input_names=names, output_names=["logits"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    except Exception as e:  # the exporter's failures are long traces about graph internals
        raise ValueError(f"{type(model).__name__} could not be exported to ONNX ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); serve it with the torch backend") from e


def _difference(reference: Classifier, path: Path, texts: list) -> float:
    ours = _as_onnx(reference, path).logits(texts, batch_size=16)
    theirs = reference.logits(texts, batch_size=16)
    return max(float(np.nanmax(np.abs(a.numpy() - b.numpy()))) for a, b in zip(ours, theirs))


def _as_onnx(reference: Classifier, path: Path) -> Classifier:
    return Classifier(OnnxModel(path), reference.tokenizer, reference.config, torch.device("cpu"), reference.name)


def _quantized(reference: Classifier, output: Path, texts: list) -> dict:
    """Dynamic int8 weights (ONNX Runtime's ``quantize_dynamic``) and what they change: the logits, and the
    selection metric on the check texts where they carry labels."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per output channel: on a MiniLM classifier (1,000 LinCE dev tweets) per-tensor scales changed 13.4 % of
    # the predicted labels (max logit change 4.1), per-channel 4.4 % (2.1), at the same speed.
    quantize_dynamic(str(output / ONNX_FILE), str(output / INT8_FILE), weight_type=QuantType.QInt8, per_channel=True)
    fp32, int8 = _as_onnx(reference, output / ONNX_FILE), _as_onnx(reference, output / INT8_FILE)
    measured = {"int8_max_abs_diff": max(float(np.nanmax(np.abs(a.numpy() - b.numpy())))
                                         for a, b in zip(int8.logits(texts), fp32.logits(texts)))}
    if texts and getattr(texts[0], "label", None) is not None and reference.task == "sequence":
        measured.update(_metric_change(reference, fp32, int8, texts))
    return measured


def _metric_change(reference: Classifier, fp32: Classifier, int8: Classifier, texts: list) -> dict:
    from .data import label_target
    from .metrics import DEFAULT_METRICS, classification_metrics
    from .problems import decide, scores

    problem = reference.problem
    metric = DEFAULT_METRICS[problem]
    labels = {label: i for i, label in enumerate(reference.labels)}
    gold = np.array([label_target(t, "sequence", labels, problem, None) for t in texts])
    if problem == "multi_label":
        gold = gold.astype(np.int8)

    def value(clf: Classifier) -> float:
        logits = torch.stack(clf.logits(texts))
        pred = decide(problem, scores(problem, logits), reference.config.get("thresholds")).numpy()
        return classification_metrics(pred, gold, problem, len(labels))[metric]

    return {"metric": metric, "fp32": value(fp32), "int8": value(int8)}


def _write_files(run: Path, output: Path, config: dict, measured: dict) -> None:
    """The export's config (its weights recorded and bound like any run's), metrics and model card."""
    if (run / METRICS_FILE).is_file():
        shutil.copyfile(run / METRICS_FILE, output / METRICS_FILE)
    files = [ONNX_FILE] + ([INT8_FILE] if (output / INT8_FILE).is_file() else [])
    exported = with_meaning({**config, "method": "full", "exported_from": str(run), "onnx": {"files": files,
                             **measured}, "weights": weight_record(output)})
    write_json(output / TOKMASK_CONFIG, exported)
    if (output / METRICS_FILE).is_file():
        atomic_write_text(output / CARD, card(exported, read_json(output / METRICS_FILE), config.get("command", "")))

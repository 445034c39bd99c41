"""``tokmask export`` and ``serve --backend onnx``: a merged, exported run gives PyTorch's logits; the server
answers the same JSON with either backend; a cap on concurrent requests answers 429; bad exports are named."""
import json
import shutil
import threading
import time

import pytest

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, toy_data):
    """A tiny LoRA sweep (rates 0 and 0.3) on the toy data and a token-task run of the same base."""
    from tokmask_peft.config import Recipe
    from tokmask_peft.sweeps import sweep

    out = tmp_path_factory.mktemp("exported")
    for task, rates in (("sequence", [0.0, 0.3]), ("token", [0.0])):
        sweep(Recipe.from_dict({
            "model": {"name": tiny_model("bert"), "task": task, "lora_r": 4, "lora_dropout": 0.0},
            "data": {"train": str(toy_data["train"]), "dev": str(toy_data["dev"]), "max_length": 16},
            "train": {"epochs": 2, "batch_size": 16, "lr": 1e-2, "output_dir": str(out / task)},
            "sweep": {"rates": rates, "seeds": [0]}}))
    return out


TEXTS = ["the good movie really", "el perro malo", "nice day", "casa agua amigo dia sol muy"]


def test_an_exported_run_predicts_as_pytorch_and_int8_reports_its_change(runs, tmp_path, capsys):
    from tokmask_peft.cli import main
    from tokmask_peft.inference import Classifier
    from tokmask_peft.onnx_export import onnx_classifier

    configs = {}
    for task in ("sequence", "token"):
        run = runs / task / "mask_0.00" / "seed_0"
        main(["export", str(run), "--output", str(tmp_path / task), *(["--quantize", "int8"] if task == "sequence"
                                                                     else [])])
        printed = capsys.readouterr().out
        assert "max |Δ| = " in printed and ("int8" in printed) == (task == "sequence")
        config = configs[task] = json.loads((tmp_path / task / "tokmask_config.json").read_text())
        assert config["onnx"]["max_abs_diff"] <= 1e-4 and config["onnx"]["checked_on"] == "32 dev texts"
        exported, reference = onnx_classifier(tmp_path / task), Classifier.from_run(run)
        for ours, theirs in zip(exported.logits(TEXTS), reference.logits(TEXTS)):
            assert (ours - theirs).abs().nan_to_num().max() <= 1e-4
        assert exported.predict(TEXTS) == reference.predict(TEXTS)
    assert {"metric", "fp32", "int8", "int8_max_abs_diff"} <= set(configs["sequence"]["onnx"])
    assert (tmp_path / "sequence" / "README.md").is_file() and (tmp_path / "sequence" / "model.int8.onnx").is_file()


def test_a_sweep_exports_its_best_rate_and_bad_exports_are_named(runs, tmp_path):
    from tokmask_peft.cli import main
    from tokmask_peft.onnx_export import export_run, onnx_classifier

    main(["export", str(runs / "sequence"), "--output", str(tmp_path / "best"), "--rate", "0.3"])
    assert json.loads((tmp_path / "best" / "tokmask_config.json").read_text())["masking"]["rate"] == 0.3
    run = runs / "sequence" / "mask_0.30" / "seed_0"
    with pytest.raises(ValueError, match="inside it"):
        export_run(run, run / "onnx")
    broken = shutil.copytree(run, tmp_path / "broken")
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="corrupted"):
        export_run(broken, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    onnx = tmp_path / "best" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.onnx holds 100 bytes"):
        onnx_classifier(tmp_path / "best")


def test_serve_answers_the_same_with_either_backend_and_caps_concurrency(runs, tmp_path, monkeypatch):
    from starlette.testclient import TestClient

    import tokmask_peft.server as server_module
    from tokmask_peft.server import create_app
    from tokmask_peft.serving import AdapterPool

    monkeypatch.setenv("TOKMASK_CACHE", str(tmp_path / "cache"))
    answers = {}
    for backend in ("torch", "onnx", "onnx-int8"):
        pool = AdapterPool([str(runs / "sequence")], backend=backend)
        with TestClient(create_app(pool, max_batch_tokens=24)) as client:
            answers[backend] = client.post("/predict", json={"inputs": TEXTS, "adapter": 0.3}).json()
            metrics = client.get("/metrics").text
        for series in ("tokmask_queue_seconds", "tokmask_tokenize_seconds", "tokmask_inference_seconds"):
            assert f'{series}_count{{adapter="mask_0.30"}} ' in metrics
    assert list((tmp_path / "cache" / "onnx").iterdir())  # runs are exported into the cache on first use
    for ours, theirs in zip(answers["onnx"], answers["torch"]):
        assert [r["label"] for r in ours] == [r["label"] for r in theirs]
        assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(ours, theirs))
    assert len(answers["onnx-int8"]) == len(TEXTS) and all(len(r) == 2 for r in answers["onnx-int8"])
    single = runs / "sequence" / "mask_0.30" / "seed_0"
    auto = AdapterPool([str(single)], backend="auto")  # one adapter: ONNX Runtime, from the cache filled above
    assert auto.backend == "onnx" and type(auto.classifiers[0].model).__name__ == "OnnxModel"

    real, started = server_module.prepare, threading.Event()

    def slow_prepare(served, texts):
        started.set()
        time.sleep(2)
        return real(served, texts)

    monkeypatch.setattr(server_module, "prepare", slow_prepare)
    with TestClient(create_app(AdapterPool([str(runs / "sequence")]), max_concurrent_requests=1)) as client:
        slow = threading.Thread(target=client.post, args=("/predict",), kwargs={"json": {"inputs": "nice day"}})
        slow.start()
        assert started.wait(30)
        refused = client.post("/predict", json={"inputs": "nice day"})
        assert refused.status_code == 429 and refused.json()["error_type"] == "Overloaded"
        slow.join()
        monkeypatch.setattr(server_module, "prepare", real)
        assert client.post("/predict", json={"inputs": "nice day"}).status_code == 200


def test_auto_picks_onnx_only_on_cpu_with_onnxruntime_and_no_base_shared(runs, monkeypatch):
    import importlib.util

    from tokmask_peft.serving import auto_backend

    single = str(runs / "sequence" / "mask_0.30" / "seed_0")
    assert auto_backend([single], device="cpu") == ("onnx", "CPU, no base shared between adapters")
    backend, why = auto_backend([str(runs / "sequence")], device="cpu")  # two rates' adapters on one base
    assert backend == "torch" and why.startswith("2 adapters share their base")
    assert auto_backend([single], device="cuda:0")[0] == "torch"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert auto_backend([single], device="cpu") == ("torch", "onnxruntime is not installed (pip install "
                                                             "'tokmask-peft[onnx]')")


def test_a_missing_onnxruntime_is_named_with_the_extra_to_install(runs, tmp_path, monkeypatch):
    import sys

    from tokmask_peft.onnx_export import export_run
    from tokmask_peft.serving import AdapterPool

    monkeypatch.setenv("TOKMASK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'tokmask-peft\[onnx\]'"):
        export_run(runs / "sequence" / "mask_0.00" / "seed_0", tmp_path / "out")
    with pytest.raises(ImportError, match=r"pip install 'tokmask-peft\[onnx\]'"):
        AdapterPool([str(runs / "sequence" / "mask_0.00" / "seed_0")], backend="onnx")
    assert not (tmp_path / "out").exists()

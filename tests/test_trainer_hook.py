"""attach_masking inside a real HF Trainer run: masked inputs in training, plain ones in eval."""
import pytest
import torch

from tokmask_peft.masking import TokenMasker, attach_masking

pytestmark = pytest.mark.slow


class Toy(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 90, (n, 12), generator=g)
        self.ids[:, 0], self.ids[:, -1] = 1, 2  # CLS ... SEP

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": int(i % 2)}


def test_trainer_sees_masked_inputs_in_training_only(tmp_path):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainingArguments,
    )

    model = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        pad_token_id=0, num_labels=2))
    attach_masking(model, TokenMasker(mask_id=3, special_ids=[0, 1, 2], rate=0.3, seed=0))
    seen = []
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append((m.training, kw["input_ids"].clone())), with_kwargs=True)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, per_device_eval_batch_size=8,
                             num_train_epochs=1, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=Toy(), eval_dataset=Toy(16))
    trainer.train()
    trainer.evaluate()
    train_batches = [ids for training, ids in seen if training]
    eval_batches = [ids for training, ids in seen if not training]
    assert len(train_batches) == 4 and len(eval_batches) == 2
    masked = torch.cat(train_batches)
    assert (masked == 3).float().mean() > 0.15
    assert (masked[:, 0] == 1).all() and (masked[:, -1] == 2).all()
    assert all((ids != 3).all() for ids in eval_batches)

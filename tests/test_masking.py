import math

import pytest
import torch

from tokmask_peft.masking import (
    MaskingCollator,
    RateSchedule,
    TokenMasker,
    attach_masking,
    check_rate,
    mask_tokens,
    protected_positions,
    resolve_mask_token,
)

MASK, PAD, CLS, SEP = 3, 0, 1, 2


def random_batch(rows=64, cols=128, seed=0, left_pad=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (rows, cols), generator=g)
    lengths = torch.randint(3, cols + 1, (rows,), generator=g)
    attn = (torch.arange(cols)[None, :] < lengths[:, None]).long()
    if left_pad:
        attn = attn.flip(1)
    ids = torch.where(attn.bool(), ids, torch.full_like(ids, PAD))
    return ids, attn


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_measured_rate_within_four_binomial_sd(p):
    masker = TokenMasker(MASK, [PAD, CLS, SEP], rate=p, seed=1)
    eligible = replaced = 0
    for seed in range(30):
        ids, attn = random_batch(seed=seed)
        out = masker(ids, attn)
        eligible += int(attn.sum())
        replaced += int((out != ids).sum())
    assert eligible >= 100_000
    sd = math.sqrt(eligible * p * (1 - p))
    assert abs(replaced - p * eligible) < 4 * sd, (replaced / eligible, p)


@pytest.mark.parametrize("left_pad", [False, True])
def test_padding_and_specials_never_replaced(left_pad):
    ids, attn = random_batch(left_pad=left_pad)
    ids[:, 5] = CLS
    ids[:, 9] = SEP
    ids = torch.where(attn.bool(), ids, torch.full_like(ids, PAD))
    out = TokenMasker(MASK, [PAD, CLS, SEP], rate=0.9, seed=0)(ids, attn)
    protected = protected_positions(ids, attn, [PAD, CLS, SEP])
    assert torch.equal(out[protected], ids[protected])
    assert (out[~protected] == MASK).float().mean() > 0.85


def test_pad_positions_protected_by_attention_even_if_id_is_ordinary():
    # Llama batches pad with </s>; a pad position must stay put even if its id is not listed special.
    ids = torch.tensor([[2, 2, 50, 51]])
    attn = torch.tensor([[0, 0, 1, 1]])
    out = TokenMasker(MASK, [], rate=0.99, seed=0)(ids, attn)
    assert out[0, :2].tolist() == [2, 2]


def test_rate_zero_is_identity_and_rate_checked():
    ids, attn = random_batch()
    assert mask_tokens(ids, 0.0, MASK) is ids
    for bad in (-0.1, 1.0, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="rate"):
            mask_tokens(ids, bad, MASK)
        with pytest.raises(ValueError, match="rate"):
            TokenMasker(MASK, [], rate=bad)
    assert check_rate(0) == 0.0


def test_input_never_modified_in_place():
    ids, attn = random_batch()
    before = ids.clone()
    mask_tokens(ids, 0.5, MASK, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, before)


def test_collator_masks_labels_untouched_same_seed_same_masks_next_epoch_differs():
    features = [{"input_ids": [CLS, 10 + i, 11 + i, 12 + i, SEP], "labels": [i % 2]} for i in range(8)]

    def pad_collate(feats):
        return {
            "input_ids": torch.tensor([f["input_ids"] for f in feats]),
            "attention_mask": torch.ones(len(feats), 5, dtype=torch.long),
            "labels": torch.tensor([f["labels"] for f in feats]),
        }

    def epochs(seed, n=2):
        coll = MaskingCollator(pad_collate, TokenMasker(MASK, [PAD, CLS, SEP], rate=0.5, seed=seed))
        return [coll(features) for _ in range(n)]

    a, b = epochs(0), epochs(0)
    assert torch.equal(a[0]["input_ids"], b[0]["input_ids"])
    assert torch.equal(a[1]["input_ids"], b[1]["input_ids"])
    assert not torch.equal(a[0]["input_ids"], a[1]["input_ids"])
    assert torch.equal(a[0]["labels"], pad_collate(features)["labels"])
    assert (a[0]["input_ids"] == MASK).any()


class _Seq(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        return {"input_ids": [CLS] + [10 + i] * 6 + [SEP]}


def _collate(feats):
    return {"input_ids": torch.tensor([f["input_ids"] for f in feats])}


def _loader_masks(seed, workers):
    masker = TokenMasker(MASK, [CLS, SEP], rate=0.5, seed=seed)
    loader = torch.utils.data.DataLoader(
        _Seq(), batch_size=4, collate_fn=MaskingCollator(_collate, masker), num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
    )
    return [torch.cat([b["input_ids"] for b in loader]) for _ in range(2)]


@pytest.mark.slow
def test_reproducible_and_fresh_per_epoch_with_dataloader_workers():
    first, again = _loader_masks(0, 2), _loader_masks(0, 2)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], first[1])
    # Two workers must not repeat each other's masks.
    per_batch = first[0].view(8, 4, 8)
    assert not torch.equal(per_batch[0] == MASK, per_batch[1] == MASK)


def test_masker_state_round_trip():
    m = TokenMasker(MASK, [], rate=0.3, seed=5)
    ids, attn = random_batch()
    m(ids, attn)
    state = m.state_dict()
    x = m(ids, attn)
    m2 = TokenMasker(MASK, [], rate=0.1, seed=0)
    m2.load_state_dict(state)
    assert torch.equal(m2(ids, attn), x)


def test_schedules_are_pure_functions_of_step():
    assert RateSchedule(0.3).rate_at(0, 100) == 0.3
    warm = RateSchedule(0.2, "warmup", warmup_fraction=0.5)
    assert [warm.rate_at(s, 100) for s in (0, 25, 50, 99)] == [0.0, 0.1, 0.2, 0.2]
    lin = RateSchedule(0.4, "linear", start=0.0)
    assert lin.rate_at(50, 100) == pytest.approx(0.2)
    assert lin.rate_at(100, 100) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="schedule"):
        RateSchedule(0.1, "cosine")
    with pytest.raises(ValueError, match="rate"):
        RateSchedule(1.2)


def test_hook_masks_only_in_training():
    seen = []

    class Model(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None):
            seen.append(input_ids.clone())
            return input_ids

    model = Model()
    ids, attn = random_batch(rows=4, cols=64)
    handle = attach_masking(model, TokenMasker(MASK, [PAD], rate=0.5, seed=0))
    model.train()
    model(input_ids=ids, attention_mask=attn)
    model(ids, attention_mask=attn)
    model.eval()
    model(input_ids=ids, attention_mask=attn)
    handle.remove()
    model.train()
    model(input_ids=ids, attention_mask=attn)
    assert (seen[0] == MASK).any() and (seen[1] == MASK).any()
    assert torch.equal(seen[2], ids) and torch.equal(seen[3], ids)


def test_hook_protects_padding_when_the_attention_mask_comes_positionally():
    seen = []

    class Model(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            seen.append(input_ids.clone())
            return input_ids

    model = Model().train()
    ids, attn = random_batch(rows=8, cols=64)
    ids = torch.where(attn.bool(), ids, torch.full_like(ids, 7))  # padded with an ordinary id
    attach_masking(model, TokenMasker(MASK, [PAD], rate=0.9, seed=0))
    model(ids, attn)
    assert (seen[0][attn.bool()] == MASK).any()
    assert torch.equal(seen[0][~attn.bool()], ids[~attn.bool()])


# ---- the real tokenizers in ../shared -------------------------------------------------------


def test_policy_auto_on_real_tokenizers(load_tokenizer):
    bert, llama, qwen = load_tokenizer("bert-uncased"), load_tokenizer("llama2"), load_tokenizer("qwen")
    assert (resolve_mask_token(bert).token, resolve_mask_token(bert).id) == ("[MASK]", 103)
    assert (resolve_mask_token(llama).token, resolve_mask_token(llama).id) == ("<unk>", 0)
    qmask = resolve_mask_token(qwen)
    assert qmask.token == "<mask>" and qmask.added and qmask.id >= 151_669
    assert qwen.convert_ids_to_tokens(qmask.id) == "<mask>"
    assert qmask.id in qwen.all_special_ids
    # resolving again reuses the token instead of adding a second one
    assert resolve_mask_token(qwen, "new").id == qmask.id
    assert resolve_mask_token(qwen, "new").to_dict()["token"] == "<mask>"


def test_policy_errors_name_the_problem(load_tokenizer):
    qwen, llama = load_tokenizer("qwen"), load_tokenizer("llama2")
    with pytest.raises(ValueError, match="no mask token"):
        resolve_mask_token(qwen, "mask")
    with pytest.raises(ValueError, match="no unk token"):
        resolve_mask_token(qwen, "unk")
    with pytest.raises(ValueError, match="pad token"):
        resolve_mask_token(qwen, "<|endoftext|>")
    with pytest.raises(ValueError, match="not in the tokenizer"):
        resolve_mask_token(llama, "<nope>")
    llama.pad_token = llama.unk_token
    with pytest.raises(ValueError, match="pad token"):
        resolve_mask_token(llama, "unk")


@pytest.mark.parametrize("name", ["bert-uncased", "llama2", "qwen"])
def test_masked_text_decodes_sensibly(load_tokenizer, name):
    tok = load_tokenizer(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    mask = resolve_mask_token(tok)
    masker = TokenMasker.for_tokenizer(tok, mask, rate=0.5, seed=3)
    batch = tok(["the cat sat on the mat with a hat", "hola amigo"], padding=True, return_tensors="pt")
    out = masker(batch["input_ids"], batch["attention_mask"])
    protected = protected_positions(batch["input_ids"], batch["attention_mask"], masker.special_ids)
    assert torch.equal(out[protected], batch["input_ids"][protected])
    text = tok.decode(out[0], skip_special_tokens=False)
    assert mask.token in text and "cat" in tok.decode(batch["input_ids"][0])
    kept = [t for t in tok.convert_ids_to_tokens(out[0]) if t != mask.token]
    assert len(kept) < int(batch["attention_mask"][0].sum())

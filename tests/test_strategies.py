"""Masking strategies (whole-word, span, random replacement, BERT's 80/10/10) on the three real
tokenizers, and the consistency term in the loop."""
import math

import pytest
import torch

from helpers import logged_losses, shared_path
from tokmask_peft.data import encode, padding_collator, read_lince
from tokmask_peft.masking import (TokenMasker, attach_masking, consistency_term, mask_tokens, ordinary_ids,
                                  protected_positions, resolve_mask_token, symmetric_kl)
from tokmask_peft.modeling import classifier_tokenizer

TOKENIZERS = ["bert-uncased", "llama2", "qwen"]  # WordPiece '##', SentencePiece '▁', byte-level BPE


def real_batches(name: str, n: int = 2000, batch: int = 250, task: str = "sequence"):
    """(tokenizer, mask token, batches with word ids) on LinCE SA tweets: raw text for sequence
    tasks (the pre-tokenizer's words), the given words for token tasks."""
    tok = classifier_tokenizer(shared_path("tokenizers", name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    mask = resolve_mask_token(tok)
    examples = read_lince(shared_path("data", "lince", "sa_spaeng", "train.conll"), task)[:n]
    if task == "token":
        for ex in examples:
            ex.label = None
    features = encode(examples, tok, task, None, 64)
    collate = padding_collator(tok, task, word_ids=True)
    return tok, mask, [collate(features[s:s + batch]) for s in range(0, len(features), batch)]


def word_flags(masked: torch.Tensor, original: torch.Tensor, word_ids: torch.Tensor, protected=None):
    """Per row, per word: the set of 'was this piece replaced' flags over the word's pieces (a
    protected piece, such as BERT's [UNK] inside a word with an emoji, never changes: left out)."""
    changed = (masked != original).tolist()  # plain lists: indexing tensors per element is ~10x slower
    words = word_ids.tolist()
    kept = (~protected if protected is not None else torch.ones_like(original, dtype=torch.bool)).tolist()
    for row_words, row_changed, row_kept in zip(words, changed, kept):
        flags: dict[int, set] = {}
        for w, c, k in zip(row_words, row_changed, row_kept):
            if w >= 0 and k:
                flags.setdefault(w, set()).add(c)
        yield flags


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("unit", ["word", "span"])
@pytest.mark.parametrize("task", ["sequence", "token"])
def test_whole_words_only_and_protected_positions_never_change(name, unit, task):
    tok, mask, batches = real_batches(name, n=500, task=task)
    masker = TokenMasker.for_tokenizer(tok, mask, rate=0.3, seed=0, unit=unit)
    pieces_per_word = []
    for b in batches:
        out = masker(b["input_ids"], b["attention_mask"], b["word_ids"])
        protected = protected_positions(b["input_ids"], b["attention_mask"], masker.special_ids)
        assert torch.equal(out[protected], b["input_ids"][protected])
        assert bool(((out == b["input_ids"]) | (out == mask.id)).all())
        for flags in word_flags(out, b["input_ids"], b["word_ids"], protected):
            assert all(len(f) == 1 for f in flags.values()), "a word was partly masked"
        pieces_per_word.append(float((b["word_ids"] >= 0).sum()) / sum(int(r.max()) + 1 for r in b["word_ids"]))
    # the check is not vacuous: these tokenizers do split words into several pieces
    assert max(pieces_per_word) > 1.05


@pytest.mark.parametrize("name", TOKENIZERS)
def test_spans_are_runs_of_whole_words_with_geometric_lengths_of_the_mean_asked(name):
    """A span goes on to the next word with probability 1 - 1/m (geometric lengths, mean m = 3) and
    starts after an unmasked word with probability p / (m (1 - p)); measured on word pairs, which
    (unlike run lengths cut by the row's end) carry no length bias."""
    tok, mask, batches = real_batches(name, n=6000, batch=500)
    masker = TokenMasker.for_tokenizer(tok, mask, rate=0.3, seed=1, unit="span", span_mean=3.0)
    pairs = {True: [0, 0], False: [0, 0]}  # state of word w -> [count, next word masked]
    for b in batches:
        out = masker(b["input_ids"], b["attention_mask"], b["word_ids"])
        protected = protected_positions(b["input_ids"], b["attention_mask"], masker.special_ids)
        for flags in word_flags(out, b["input_ids"], b["word_ids"], protected):
            assert all(len(f) == 1 for f in flags.values())
            state = {w: True in f for w, f in flags.items() if f}  # words of protected pieces only: unknown
            for w, masked in state.items():
                if w + 1 in state:
                    pairs[masked][0] += 1
                    pairs[masked][1] += state[w + 1]
    assert pairs[True][0] > 5000
    assert pairs[True][1] / pairs[True][0] == pytest.approx(1 - 1 / 3, abs=0.02)
    assert pairs[False][1] / pairs[False][0] == pytest.approx(0.3 / (3 * 0.7), abs=0.02)


@pytest.mark.parametrize("unit", ["word", "span"])
@pytest.mark.parametrize("p", [0.1, 0.3])
def test_measured_word_rate_within_four_binomial_sd(unit, p):
    tok, mask, batches = real_batches("bert-uncased", n=12_194, batch=1000)
    masker = TokenMasker.for_tokenizer(tok, mask, rate=p, seed=2, unit=unit)
    words = masked = 0
    for _ in range(3 if unit == "span" else 1):  # spans correlate neighbours: more words for the same margin
        for b in batches:
            out = masker(b["input_ids"], b["attention_mask"], b["word_ids"])
            protected = protected_positions(b["input_ids"], b["attention_mask"], masker.special_ids)
            for flags in word_flags(out, b["input_ids"], b["word_ids"], protected):
                maskable = [f for f in flags.values() if f]  # a word of [UNK] pieces only can never change
                words += len(maskable)
                masked += sum(True in f for f in maskable)
    assert words >= 100_000
    assert abs(masked - p * words) < 4 * math.sqrt(words * p * (1 - p)), (masked / words, p)


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("replace", ["random", "bert"])
def test_random_replacement_never_emits_special_added_or_pad_ids(name, replace):
    tok, mask, batches = real_batches(name, n=1000)
    forbidden = set(tok.all_special_ids) | set(tok.added_tokens_decoder) | {tok.pad_token_id, mask.id}
    if mask.added:
        assert mask.id in tok.added_tokens_decoder  # Qwen: the new <mask> is an added token
    allowed = ordinary_ids(tok)
    assert not forbidden & set(allowed.tolist()) and len(allowed) > 0.9 * len(tok) - len(forbidden)
    masker = TokenMasker.for_tokenizer(tok, mask, rate=0.5, seed=3, replace=replace)
    kinds = torch.zeros(3)
    for b in batches:
        ids = b["input_ids"]
        out = masker(ids, b["attention_mask"])
        protected = protected_positions(ids, b["attention_mask"], masker.special_ids)
        assert torch.equal(out[protected], ids[protected])
        changed = out != ids
        assert not set(out[changed & (out != mask.id)].tolist()) & forbidden
        if replace == "random":
            assert not (out == mask.id).any()
        eligible = ~protected
        kinds += torch.tensor([float(((out == mask.id) & eligible).sum()), float((changed & (out != mask.id)).sum()),
                               float(eligible.sum())])
    masked, randomised, eligible = kinds.tolist()
    if replace == "bert":  # of the chosen half: 80 % mask, 10 % random (a random draw may equal the original)
        assert masked / eligible == pytest.approx(0.5 * 0.8, abs=0.01)
        assert randomised / eligible == pytest.approx(0.5 * 0.1, abs=0.01)
    else:
        assert randomised / eligible == pytest.approx(0.5, abs=0.01)


def test_word_units_without_word_ids_are_refused_saying_how_to_get_them():
    ids = torch.tensor([[1, 5, 6, 2]])
    with pytest.raises(ValueError, match=r"needs word ids.*padding_collator\(tokenizer, task, word_ids=True\)"):
        TokenMasker(3, [1, 2], rate=0.5, unit="word")(ids)
    model = torch.nn.Module()
    model.forward = lambda input_ids=None, attention_mask=None: input_ids
    with pytest.raises(ValueError, match="needs word ids"):
        attach_masking(model, TokenMasker(3, [1, 2], rate=0.5, unit="span"))
        model.train()
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"too high for spans"):
        mask_tokens(ids, 0.8, 3, word_ids=torch.tensor([[-1, 0, 1, -1]]), unit="span")


def test_hook_takes_word_ids_out_in_every_mode_and_masks_only_in_training():
    seen = {}

    class Echo(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None):
            seen["ids"] = input_ids
            return input_ids

    model, ids = Echo(), torch.tensor([[1, 5, 6, 7, 8, 2]])
    words = torch.tensor([[-1, 0, 0, 1, 2, -1]])
    attach_masking(model, TokenMasker(3, [1, 2], rate=0.99, seed=0, unit="word"))
    model.eval()
    assert torch.equal(model(input_ids=ids, word_ids=words), ids)
    model.train()
    out = model(input_ids=ids, word_ids=words)
    assert out[0, 1:5].tolist() == [3, 3, 3, 3] and out[0, 0] == 1 and out[0, 5] == 2


def test_symmetric_kl_is_non_negative_and_zero_only_for_identical_views():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 5, generator=g), torch.randn(16, 5, generator=g)
    assert symmetric_kl(a, a) == 0 and symmetric_kl(a, b) > 0
    assert symmetric_kl(a, b) == pytest.approx(float(symmetric_kl(b, a)))
    labels = torch.full((4, 4), -100)
    labels[0, 1] = 2  # token task: one labelled position
    assert symmetric_kl(a.view(4, 4, 5), b.view(4, 4, 5), labels) == pytest.approx(float(symmetric_kl(a[1:2], b[1:2])))


@pytest.mark.parametrize("task", ["sequence", "token"])
def test_consistency_term_is_zero_for_identical_views_and_positive_when_masked(make_recipe, task):
    from tokmask_peft.recipe_setup import Setup

    setup = Setup.from_recipe(make_recipe("llama", task))
    model = setup.model_for(0).train()
    for module in model.modules():  # dropout off (the token head has some): two clean passes agree
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = padding_collator(setup.tokenizer, task)(setup.train_features[:8])
    labels = batch.pop("labels")
    for rate, positive in ((0.0, False), (0.5, True)):
        masker = TokenMasker.for_tokenizer(setup.tokenizer, setup.mask_token, rate=rate, seed=0)
        handle = attach_masking(model, masker)
        term = consistency_term(model, batch, model(**batch).logits, masker, labels)
        handle.remove()
        assert (term > 1e-6) if positive else term == 0, (rate, term)


def test_consistency_adds_nothing_when_the_views_are_identical_and_lambda_zero_adds_no_pass(make_recipe, tmp_path,
                                                                                           monkeypatch):
    import tokmask_peft.training as loop

    calls = {"n": 0}
    real = loop.clean_view  # the consistency term's clean pass

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "clean_view", counted)
    plain = make_recipe("llama", masking={"rate": 0.0}, train={"epochs": 2})
    loop.train(plain, output_dir=tmp_path / "plain")
    assert calls["n"] == 0
    tied = make_recipe("llama", masking={"rate": 0.0, "consistency": 1.0}, train={"epochs": 2})
    loop.train(tied, output_dir=tmp_path / "tied")
    assert calls["n"] == 12  # one clean pass per step
    assert logged_losses(tmp_path / "tied") == pytest.approx(logged_losses(tmp_path / "plain"), abs=1e-6)
    masked = make_recipe("llama", masking={"rate": 0.3, "consistency": 1.0}, train={"epochs": 2})
    without = make_recipe("llama", masking={"rate": 0.3}, train={"epochs": 2})
    loop.train(masked, output_dir=tmp_path / "masked")
    loop.train(without, output_dir=tmp_path / "without")
    # same first batch and mask: the first logged loss differs by exactly the (positive) term
    assert logged_losses(tmp_path / "masked")[0] > logged_losses(tmp_path / "without")[0]


@pytest.mark.parametrize("masking", [{"unit": "span", "replace": "bert", "consistency": 0.5},
                                     {"unit": "word", "consistency": 1.0, "consistency_stop_grad": True}],
                         ids=["span-bert-consistency", "word-stopgrad"])
def test_strategies_resume_exactly_and_are_recorded(make_recipe, tmp_path, monkeypatch, masking):
    import json

    from helpers import kill_at_training_step
    from tokmask_peft.training import train

    sections = dict(train={"epochs": 2, "checkpoint_every": 2, "eval_every": 3, "batch_size": 8},
                    masking={"rate": 0.3, **masking})
    whole = train(make_recipe("qwen", "token", "lora", **sections), output_dir=tmp_path / "whole")
    with monkeypatch.context() as m:
        kill_at_training_step(m, 9)
        with pytest.raises(KeyboardInterrupt):
            train(make_recipe("qwen", "token", "lora", **sections), output_dir=tmp_path / "split")
    resumed = train(make_recipe("qwen", "token", "lora", **sections), output_dir=tmp_path / "split")
    assert [r["loss"] for r in resumed["history"]] == pytest.approx([r["loss"] for r in whole["history"]], rel=1e-5)
    saved = json.loads((tmp_path / "whole" / "tokmask_config.json").read_text())["masking"]
    assert {k: saved[k] for k in masking} == masking


def test_neftune_noises_training_only_through_transformers_hook_and_leaves_the_kept_base_clean(make_recipe,
                                                                                                tmp_path,
                                                                                                monkeypatch):
    import transformers.integrations.neftune as neftune

    from tokmask_peft.recipe_setup import Setup
    from tokmask_peft.training import train

    modes = []
    real = neftune.neftune_post_forward_hook

    def seen(module, args, output):
        modes.append(module.training)
        return real(module, args, output)

    monkeypatch.setattr(neftune, "neftune_post_forward_hook", seen)
    plain = make_recipe("llama", masking={"rate": 0.0}, train={"epochs": 1})
    noisy = make_recipe("llama", masking={"rate": 0.0}, train={"epochs": 1, "neftune_alpha": 5.0})
    setup = Setup.from_recipe(noisy)
    train(plain, setup, output_dir=tmp_path / "plain")
    assert modes == []
    train(noisy, setup, output_dir=tmp_path / "noisy")
    assert True in modes and False in modes  # training steps and dev passes both reach the hook
    assert logged_losses(tmp_path / "noisy")[0] != pytest.approx(logged_losses(tmp_path / "plain")[0], abs=1e-6)
    embeddings = setup.base.get_input_embeddings()
    assert not embeddings._forward_hooks and not hasattr(embeddings, "neftune_noise_alpha")
    modes.clear()
    train(plain, setup, output_dir=tmp_path / "plain_again")  # the next run on the kept base: no noise
    assert modes == [] and logged_losses(tmp_path / "plain_again") == pytest.approx(logged_losses(tmp_path / "plain"))

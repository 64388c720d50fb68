"""The text tower's poolings and its masked-language-model pre-training on the reports."""
from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch

import hlip_core
from hlip_core.model.text import POOLINGS, TextTower
from hlip_core.training.config import TEXT_POOLINGS
from hlip_core.training.optim import lock_text_tower
from hlip_core.training.text_pretrain import SentenceTokens, mask_tokens, pretrain_text_tower
from hlip_core.training.vocab import report_vocabulary, tokenizer_from_vocabulary

FINDINGS = {"mass": ["a mass in the {side} lobe", "a {side} lobe tumour with oedema"],
            "bleed": ["a haemorrhage in the {side} lobe", "blood in the {side} lobe"],
            "shift": ["midline shift to the {side}", "the septum is displaced to the {side}"]}
NEGATIONS = {"mass": ["no mass", "there is no tumour"], "bleed": ["no haemorrhage", "no blood products"],
             "shift": ["no midline shift", "the midline is central"]}
FILLER = ["the orbits are normal.", "the sinuses are clear.", "the cerebellum is normal."]


def reports(count: int, seed: int) -> list[list[str]]:
    """Reports as sentence lists: each finding said or denied in varied wording, plus filler."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        sentences = []
        for finding in FINDINGS:
            if rng.random() < 0.5:
                sentences.append(str(rng.choice(FINDINGS[finding])).format(side=rng.choice(["left", "right"])) + ".")
            else:
                sentences.append(str(rng.choice(NEGATIONS[finding])) + ".")
        sentences.append(str(rng.choice(FILLER)))
        out.append([sentences[i] for i in rng.permutation(len(sentences))])
    return out


def model_with(pooling: str, seed: int = 0, corpus=None) -> hlip_core.HLIPModel:
    corpus = corpus or [" ".join(r) for r in reports(40, 99)] + ["this mri study shows: x."]
    tok = tokenizer_from_vocabulary(report_vocabulary(corpus, vocab_size=200, min_frequency=1), 96)
    torch.manual_seed(seed)
    return hlip_core.create_model("tiny_multiscan_h2", tokenizer=tok, text={"pooling": pooling}).eval()


def test_sentence_pooling_encodes_a_report_as_the_mean_of_its_sentences():
    model = model_with("sentence")
    assert model.config["text"]["sentence_boundary_ids"]  # the '.' (and ':') of this vocabulary
    one, two = "a mass in the left lobe.", "no midline shift."
    with torch.no_grad():
        report = model.encode_text([f"{one} {two}"], normalize=False)
        swapped = model.encode_text([f"{two} {one}"], normalize=False)
        alone = model.encode_text([one, two], normalize=False)
        padded = model.encode_text([one, f"{one} {two} the orbits are normal."], normalize=False)
    torch.testing.assert_close(report[0], alone.mean(dim=0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(report, swapped, atol=1e-5, rtol=1e-5)  # order does not matter
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)  # padding in a batch does not either


def _locked(model):
    lock_text_tower(model)
    return model


def test_a_locked_tower_caches_its_sentences_exactly():
    model = _locked(model_with("sentence"))
    texts = [" ".join(r) for r in reports(12, 5)] + ["no mass.", "this mri study shows: " + " ".join(reports(1, 6)[0]) * 4]
    with torch.no_grad():
        plain = model.encode_text(texts, normalize=False)
        model.text.cache_sentences()
        calls = []
        hook = model.text.transformer.register_forward_hook(lambda m, i, o: calls.append(1))
        first = model.encode_text(texts, normalize=False)
        encoded = len(calls)
        again = model.encode_text(list(reversed(texts)), normalize=False)
        hook.remove()
    assert encoded == len(model.text.sentence_cache) > 10  # each distinct sentence encoded once, alone
    assert len(calls) == encoded  # the second batch holds no new sentence: the transformer is not run
    torch.testing.assert_close(first, plain, atol=1e-5, rtol=1e-5)  # truncated long text included
    torch.testing.assert_close(again, plain.flip(0), atol=1e-5, rtol=1e-5)
    # the projection still trains through the cached states
    model.text.proj.weight.grad = None
    model.encode_text(texts[:3]).sum().backward()
    assert model.text.proj.weight.grad.abs().sum() > 0


def test_a_small_sentence_cache_drops_old_sentences_and_stays_exact():
    model = _locked(model_with("sentence"))
    texts = [" ".join(r) for r in reports(6, 7)]
    with torch.no_grad():
        plain = model.encode_text(texts, normalize=False)
        model.text.cache_sentences(max_sentences=2)
        cached = model.encode_text(texts, normalize=False)
        cached_again = model.encode_text(texts, normalize=False)
    assert len(model.text.sentence_cache) == 2
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached_again, plain, atol=1e-5, rtol=1e-5)


def test_only_a_locked_dropout_free_sentence_tower_caches():
    with pytest.raises(ValueError, match="trainable"):
        model_with("sentence").text.cache_sentences()
    with pytest.raises(ValueError, match="only sentence pooling"):
        _locked(model_with("mean")).text.cache_sentences()
    corpus = [" ".join(r) for r in reports(40, 99)]
    tok = tokenizer_from_vocabulary(report_vocabulary(corpus, vocab_size=200, min_frequency=1), 96)
    dropping = _locked(hlip_core.create_model("tiny_multiscan_h2", tokenizer=tok, text={"pooling": "sentence", "dropout": 0.1}))
    with pytest.raises(ValueError, match="dropout"):
        dropping.text.cache_sentences()


def model_with_feature_norm(mode: str = "standardise", seed: int = 0) -> hlip_core.HLIPModel:
    corpus = [" ".join(r) for r in reports(40, 99)]
    tok = tokenizer_from_vocabulary(report_vocabulary(corpus, vocab_size=200, min_frequency=1), 96)
    torch.manual_seed(seed)
    return _locked(hlip_core.create_model("tiny_multiscan_h2", tokenizer=tok, text={"pooling": "sentence", "feature_norm": mode})).eval()


@pytest.mark.parametrize("mode", ["standardise", "whiten"])
def test_feature_norm_normalises_the_pooled_states_and_travels_with_the_checkpoint(mode, tmp_path):
    model = model_with_feature_norm(mode)
    fitted = [" ".join(r) for r in reports(300, 1)]
    other = [" ".join(r) for r in reports(6, 2)]
    text = model.text
    with torch.no_grad():
        pooled = text.pooled(*model.tokenize(fitted)).double()
        # before fitting, the normalisation is the identity
        torch.testing.assert_close(model.encode_text(fitted, normalize=False), text.proj(pooled.float()))
        variance = pooled.var(dim=0)
        assert float(pooled.mean(dim=0).norm() ** 2) > float(variance.sum())  # a locked tower's states share a large common part
        assert float(variance.max() / variance.min()) > 4  # and their dimensions vary unequally
        text.fit_feature_norm(pooled.float())
        mapped = (pooled - text.feature_mean.double()) @ text.feature_transform.double()
        torch.testing.assert_close(model.encode_text(fitted, normalize=False), text.proj(mapped.float()), atol=1e-4, rtol=1e-4)
        expected = model.encode_text(other)
    torch.testing.assert_close(mapped.mean(dim=0), torch.zeros(96, dtype=torch.float64), atol=1e-5, rtol=0)
    covariance = torch.cov(mapped.T)
    before = torch.linalg.eigvalsh(torch.cov(pooled.T))
    after = torch.linalg.eigvalsh(covariance)
    floor = 1e-2 * float(before.max())  # directions weaker than 1% of the strongest are not blown up
    if mode == "standardise":
        assert torch.equal(text.feature_transform, torch.diag(torch.diagonal(text.feature_transform)))
        torch.testing.assert_close(torch.diagonal(covariance), variance / (variance + 1e-2 * variance.max()), atol=1e-5, rtol=1e-4)
    else:  # every principal direction of the states comes out with variance l / (l + floor): near 1 for the strong ones
        torch.testing.assert_close(text.feature_transform, text.feature_transform.T)
        torch.testing.assert_close(after, before.clamp(min=0) / (before.clamp(min=0) + floor), atol=1e-4, rtol=1e-3)
    assert float(after.max() / after[after > 0.5].min()) < float(before.max() / before[before > floor].min())  # more even
    assert model.config["text"]["feature_norm"] == mode
    hlip_core.save(model, tmp_path / "ckpt")
    loaded = hlip_core.load(tmp_path / "ckpt").eval()
    assert loaded.text.feature_norm == mode
    assert torch.equal(loaded.text.feature_mean, text.feature_mean) and torch.equal(loaded.text.feature_transform, text.feature_transform)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(other), expected)


def test_feature_norm_is_refused_where_it_cannot_be_fitted():
    with pytest.raises(ValueError, match="no feature_norm"):
        model_with("sentence").text.fit_feature_norm(torch.randn(4, 96))
    with pytest.raises(ValueError, match="feature_norm must be one of"):
        model_with_feature_norm("zca")
    text = model_with_feature_norm().text
    with pytest.raises(ValueError, match=r"pooled states \[N >= 2, 96\]"):
        text.fit_feature_norm(torch.randn(1, 96))
    with pytest.raises(ValueError, match=r"pooled states \[N >= 2, 96\]"):
        text.fit_feature_norm(torch.randn(5, 64))
    # a dimension that never varies is scaled like one with 1% of the largest variance, not by 1 / 0
    states = torch.randn(10, 96)
    states[:, 3] = 2.0
    text.fit_feature_norm(states)
    top = float(states.var(dim=0).max())
    assert torch.isfinite(text.feature_transform).all()
    assert float(text.feature_transform[3, 3]) == pytest.approx((1e-2 * top) ** -0.5, rel=1e-3)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_other_poolings_do_not_depend_on_the_padding_of_the_batch(pooling):
    model = model_with(pooling)
    with torch.no_grad():
        alone = model.encode_text(["no mass."], normalize=False)
        batched = model.encode_text(["no mass.", "a mass in the left lobe. no midline shift. the sinuses are clear."], normalize=False)
        other = model.encode_text(["no midline shift."], normalize=False)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone, other, atol=1e-3)


def test_an_unknown_pooling_is_refused_by_name():
    with pytest.raises(ValueError, match="pooling must be one of"):
        model_with("max")
    with pytest.raises(ValueError, match="sentence pooling needs"):
        TextTower.from_config({"vocab_size": 50, "hidden": 32, "layers": 1, "heads": 2, "intermediate": 64, "pooling": "sentence"}, 16)
    assert TEXT_POOLINGS == POOLINGS  # the training options offer exactly the tower's poolings


def test_pooling_and_sentence_ends_travel_with_a_saved_model(tmp_path):
    model = model_with("sentence")
    hlip_core.save(model, tmp_path / "m")
    loaded = hlip_core.load(tmp_path / "m")
    assert loaded.text.pooling == "sentence"
    text = ["no mass. blood in the right lobe."]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(text), model.encode_text(text))


def test_sentence_tokens_assemble_the_same_ids_as_the_tokenizer():
    model = model_with("mean")
    data = SentenceTokens(model.tokenizer, [[], ["no mass.", "blood in the left lobe."]], ["", "this mri study shows: "])
    assert len(data.reports) == 1  # a report without sentences is left out, with its prefix
    with pytest.raises(ValueError, match="2 prefixes for 1 reports"):
        SentenceTokens(model.tokenizer, [["no mass."]], ["a", "b"])
    ids, mask = data.batch([0], np.random.default_rng(0))
    text = model.tokenizer.hf.decode(ids[0][mask[0].bool()], skip_special_tokens=True)
    expected, _ = model.tokenizer([f"this mri study shows: {text[len('this mri study shows: '):]}"])
    assert torch.equal(ids, expected)


def test_masking_follows_bert_and_never_masks_special_tokens():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (256, 200), generator=torch.Generator().manual_seed(1))
    ids[:, 0], ids[:, -1] = 2, 3
    attention = torch.ones_like(ids)
    inputs, targets = mask_tokens(ids, attention, [0, 1, 2, 3, 4], mask_id=4, vocab=100, generator=g)
    chosen = targets != -100
    assert 0.14 < chosen[:, 1:-1].float().mean() < 0.16
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert torch.equal(targets[chosen], ids[chosen])
    masked = (inputs == 4) & chosen
    assert 0.77 < masked.sum() / chosen.sum() < 0.83  # 80% [MASK]
    swapped = (inputs != ids) & chosen & (inputs != 4)
    assert 0.08 < swapped.sum() / chosen.sum() < 0.12  # 10% a random token, the rest unchanged
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_random_replacements_skip_special_ids_that_are_not_the_lowest():
    # BiomedBERT's layout: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103
    special = [0, 100, 101, 102, 103]
    ids = torch.randint(104, 300, (512, 200), generator=torch.Generator().manual_seed(1))
    ids[:, 0], ids[:, -1] = 101, 102
    inputs, targets = mask_tokens(ids, torch.ones_like(ids), special, mask_id=103, vocab=300,
                                  generator=torch.Generator().manual_seed(0))
    swapped = inputs[(inputs != ids) & (targets != -100) & (inputs != 103)]
    assert len(swapped) > 1000
    assert not torch.isin(swapped, torch.tensor(special)).any()
    assert swapped.min() < 100 and swapped.max() > 200  # ordinary ids on both sides of the special block


@pytest.mark.parametrize("pooling", ["mean", "sentence"])
def test_pretraining_lowers_the_masked_token_loss_on_held_out_reports(pooling):
    train, held = reports(60, seed=1), reports(20, seed=2)
    model = model_with(pooling, corpus=[" ".join(r) for r in train + held])
    names = list(model.state_dict())
    # the bar: guessing each masked word from the training reports' word frequencies alone
    counts = collections.Counter(t for r in train for s in r for t in model.tokenizer.hf(s, add_special_tokens=False)["input_ids"])
    words = [t for r in held for s in r for t in model.tokenizer.hf(s, add_special_tokens=False)["input_ids"]]
    frequencies_only = -float(np.mean([math.log(counts.get(t, 0.5) / sum(counts.values())) for t in words]))
    stats = pretrain_text_tower(model, train, steps=250, batch_size=16, lr=2e-3, seed=0, log_every=0, held_out=held)
    assert stats["held_out_after"] < min(0.7 * stats["held_out_before"], frequencies_only), (stats, frequencies_only)
    assert list(model.state_dict()) == names  # the head is gone: the checkpoint format is unchanged


def test_pretraining_is_deterministic_for_a_seed():
    train = reports(30, seed=3)
    weights = []
    for _ in range(2):
        model = model_with("mean", corpus=[" ".join(r) for r in train])
        pretrain_text_tower(model, train, steps=5, batch_size=8, seed=7, log_every=0)
        weights.append(model.text.transformer.embeddings.word_embeddings.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])

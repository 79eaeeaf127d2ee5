"""Text side: soft-token encoding equals the normal forward; token policies pair the right positions."""

import pytest
import torch

from ace_lightning.method.text import encode_ids, paired_positions, soft_tokens, tokenize


def test_soft_tokens_equal_normal_forward_and_carry_grad(tiny_components):
    te, tok = tiny_components.text_encoder, tiny_components.tokenizer
    ids = tokenize(tok, ["a photo of a dog", "a red car"])
    with torch.no_grad():
        ref = encode_ids(te, ids)
    pos = [2, 3]
    emb = te.get_input_embeddings().weight[ids[0, pos]].clone().requires_grad_(True)  # the same tokens' rows
    with soft_tokens(te, pos, emb[None]):
        out = encode_ids(te, ids[:1])
    assert torch.allclose(out, ref[:1], atol=1e-6)
    out.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    with soft_tokens(te, pos, torch.zeros_like(emb)[None]):
        changed = encode_ids(te, ids[:1])
    assert (changed - ref[:1]).abs().max() > 1e-3
    again = encode_ids(te, ids[:1])  # hook removed afterwards
    assert torch.equal(again.detach(), ref[:1])


@pytest.mark.parametrize(
    "policy,expect",
    [
        ("last", ([6], [5])),
        ("last+eos", ([6, 7], [5, 6])),
        ("phrase", ([5, 6], [5, 5])),  # the extra concept token maps to the last neutral token
        ("all_after", ([5, 6, 7], [5, 5, 6])),
    ],
)
def test_token_policies(tiny_components, policy, expect):
    tok = tiny_components.tokenizer
    # BOS a photo of a golden dog EOS  /  BOS a photo of a animal EOS
    ids = tokenize(tok, ["a photo of a golden dog"])[0].tolist()
    assert ids[0] == tok.bos_token_id and ids[7] == tok.eos_token_id
    pc, pn = paired_positions(tok, "a photo of a golden dog", "golden dog", "a photo of a animal", "animal", policy)
    assert (pc, pn) == expect


def test_phrase_not_found_is_clear(tiny_components):
    from ace_lightning.registry import ConfigError

    with pytest.raises(ConfigError, match="phrase not found"):
        paired_positions(tiny_components.tokenizer, "a photo of a cat", "dog", "a photo of a animal", "animal", "last")


@pytest.mark.parametrize("position", ["prefix", "suffix", "replace"])
def test_placeholders_and_soft_prompt_attack(tiny_components, position):
    from ace_lightning.method.attack import insert_placeholders, soft_prompt_attack
    from ace_lightning.method.text import find_span, phrase_ids

    tok, te, unet = tiny_components.tokenizer, tiny_components.text_encoder, tiny_components.unet
    ids = tokenize(tok, ["a photo of a golden dog", "a photo of a golden dog"])
    span = torch.tensor([find_span(ids[0].tolist(), phrase_ids(tok, "golden dog"))] * 2)  # [5, 7)
    new, pos = insert_placeholders(ids, span, 3, position, tok.eos_token_id)
    assert new.shape == ids.shape and pos.shape == (2, 3)
    assert (new.gather(1, pos) == tok.bos_token_id).all()  # not EOS: the prompt must not end at the slots
    expect = {"prefix": [1, 2, 3], "suffix": [7, 8, 9], "replace": [5, 6, 7]}[position]
    assert pos.tolist() == [expect, expect]
    if position == "replace":  # phrase gone, EOS follows the slots
        assert phrase_ids(tok, "dog")[0] not in new[0].tolist()
    # the attack lowers its objective (a random target it can move towards)
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300, 300])
    target = torch.randn(2, 4, 8, 8, generator=g)
    _, first = soft_prompt_attack(unet, te, new, pos, x_t, t, target, steps=1, lr=0.0)
    c_adv, last = soft_prompt_attack(unet, te, new, pos, x_t, t, target, steps=15, lr=0.05)
    assert c_adv.shape == (2, ids.shape[1], te.config.hidden_size) and not c_adv.requires_grad
    assert last < first


def test_unknown_placeholder_position_names_the_valid_ones():
    from ace_lightning.method.attack import insert_placeholders
    from ace_lightning.registry import ConfigError

    with pytest.raises(ConfigError, match="unknown placeholder_position 'middle'; valid: prefix, replace, suffix"):
        insert_placeholders(torch.zeros(1, 8, dtype=torch.long), torch.tensor([[1, 2]]), 2, "middle", 0)
    from ace_lightning.config import load_config

    with pytest.raises(ConfigError, match="unknown placeholder_position 'middle'"):
        load_config(["concept=circle", "adv.position=middle"])  # before any model is loaded


def test_prefixed_prompts_end_in_the_phrase_after_one_to_max_words():
    from ace_lightning.data.prompts import prefixed_prompts

    words = ["red", "tall", "old", "wooden", "tiny"]
    pairs = prefixed_prompts(["dog", "big cat"], words, 200, seed=3, max_words=4)
    assert len(pairs) == 200 and pairs == prefixed_prompts(["dog", "big cat"], words, 200, seed=3, max_words=4)
    lengths = set()
    for i, (p, ph) in enumerate(pairs):
        assert ph == ["dog", "big cat"][i % 2] and p.endswith(" " + ph) and p.startswith("a ")
        prefix = p[2 : len(p) - len(ph) - 1].split()
        assert set(prefix) <= set(words)
        lengths.add(len(prefix))
    assert lengths == {1, 2, 3, 4}  # every prefix length is drawn, none longer
    assert prefixed_prompts([], words, 5, 0) == [] and prefixed_prompts(["dog"], [], 5, 0) == []


def test_gate_data_keeps_only_prompts_that_fit_the_context(tiny_components):
    """A long prompt past the encoder's context would lose its last word (the concept) to truncation."""
    from types import SimpleNamespace

    from ace_lightning.data.datamodule import ErasureDataModule

    dm = ErasureDataModule.__new__(ErasureDataModule)
    dm.components = SimpleNamespace(tokenizer=tiny_components.tokenizer)
    n = tiny_components.tokenizer.model_max_length
    short, long = "a red dog", "a " + " ".join(["red"] * n) + " dog"
    assert dm._fitting([short, long, short]) == [short, short]
    assert dm._fitting([]) == []  # data.gate_long_prompts=0


def test_pseudo_words_are_name_like_non_words_of_the_tokenizers_pieces(tiny_components):
    from ace_lightning.data.prompts import pseudo_words

    tok = tiny_components.tokenizer
    words = pseudo_words(tok, 500, seed=0)
    assert len(words) == 500 and len({w for w, _ in words}) == 500
    vocab = tok.get_vocab()
    for w, pieces in words:
        ids = tok(w, add_special_tokens=False)["input_ids"]
        assert 5 <= len(w) <= 10 and w.isalpha() and f"{w}</w>" not in vocab, w
        assert 2 <= len(ids) <= 3 and "".join(pieces) == w, (w, pieces)  # the pieces the tokenizer really splits
    assert pseudo_words(tok, 500, seed=0) == words and pseudo_words(tok, 500, seed=1) != words
    assert pseudo_words(tok, 0, seed=0) == []


def test_phrase_pieces_are_the_tokenizers_pieces_without_word_end_markers(tiny_components):
    from ace_lightning.data.prompts import phrase_pieces

    tok = tiny_components.tokenizer
    for phrase in ("a red dotted circle", "cruciform", "zorblax"):
        tokens = tok.convert_ids_to_tokens(tok(phrase, add_special_tokens=False)["input_ids"])
        pieces = phrase_pieces(tok, phrase)
        assert len(pieces) == len(tokens) and all("</w>" not in p for p in pieces), (phrase, pieces)
        assert "".join(pieces) == phrase.replace(" ", ""), (phrase, pieces)
        assert phrase_pieces(tok, phrase, last_only=True) == pieces[-1:]


def test_one_mention_pattern_finds_exactly_what_a_search_per_phrase_finds():
    """``mention_pattern`` (one alternation for every erased phrase) against the definition it replaces: some
    phrase's own whole-word search in the lower-cased prompt. Prefixes, multi-word phrases, case, punctuation."""
    import re

    from ace_lightning.data.prompts import mention_pattern, mentions

    phrases = ["dog", "Hot Dog", "do", "van gogh", "c-3po", "art", "a.b", "DOG", "(tm)", "x."]
    prompts = ["a hot dog stand", "a dogged cat", "Do it", "undo", "a painting by Van Gogh", "van goghs", "C-3PO",
               "c-3pox", "artist", "street art.", "a.b.c", "axb", "a photo of a cat", "", "dog-like", "brand (tm)",
               "brand(tm)x", "x.y", "max."]
    pat = mention_pattern(phrases)

    def one_by_one(prompt, words):  # the definition: some word's own whole-word search
        return any(re.search(r"\b" + re.escape(w.lower()) + r"\b", prompt.lower()) for w in words)

    got = [mentions(p, pat) for p in prompts]
    assert got == [one_by_one(p, phrases) for p in prompts]
    assert got[:15] == [True, False, True, False, True, False, True, False, False, True, True, False, False, False,
                        True]
    for odd in ([""], ["", "dog"], ["(tm)"], ["x."]):  # the empty phrase, non-word edges: as a search of each alone
        assert [mentions(p, mention_pattern(odd)) for p in prompts] == [one_by_one(p, odd) for p in prompts], odd
    assert [mentions(p, phrases) for p in prompts] == got  # a list is compiled on the spot
    assert mention_pattern([]) is None and not mentions("a dog", [])


def test_paired_positions_of_many_triples_equal_each_triple_alone(tiny_components):
    from ace_lightning.method.text import eos_position, find_span, paired_positions_many
    from ace_lightning.registry import ConfigError, lookup

    tok = tiny_components.tokenizer
    triples = [("a photo of a golden dog", "golden dog", "a photo of a animal"),
               ("a dog", "dog", "a animal"),
               ("a big red painting of a dog in the rain", "dog", "a big red painting of a animal in the rain")]
    def alone(prompt, phrase, neutral_prompt, policy):  # one triple, tokenised by itself (the old per-call way)
        ids_c, ids_n = (tok(x, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
                        for x in (prompt, neutral_prompt))
        span_c = find_span(ids_c, tok(phrase, add_special_tokens=False).input_ids)
        span_n = find_span(ids_n, tok("animal", add_special_tokens=False).input_ids)
        return lookup("token_policy", policy)(span_c, eos_position(ids_c, tok.eos_token_id), span_n,
                                              eos_position(ids_n, tok.eos_token_id))

    for policy in ("last", "last+eos", "phrase", "all_after"):
        many = paired_positions_many(tok, triples, "animal", policy)
        assert many == [alone(*t, policy) for t in triples], policy
    assert many[0] == ([5, 6, 7], [5, 5, 6])  # the golden dog's all_after positions of test_token_policies
    with pytest.raises(ConfigError, match="phrase not found.*'a cat'"):
        paired_positions_many(tok, [triples[1], ("a cat", "dog", "a animal")], "animal", "last")

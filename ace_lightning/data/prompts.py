"""Erase requests and prompt augmentation: templates per kind with modifier contexts, synonyms, mined neighbour
words, and preservation derived from the model's own vocabulary (nothing here knows any particular model).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ace_lightning.registry import ConfigError, register

KINDS = ("object", "style", "person", "nsfw")


@dataclass
class ErasureRequest:
    concept: str  # the phrase to erase
    kind: str = "object"  # object | style | person | nsfw
    neutral: str = ""  # what it should turn into
    synonyms: list[str] = field(default_factory=list)  # also mapped to neutral
    preserve: list[str] = field(default_factory=list)  # extra phrases to keep unchanged

    def __post_init__(self):
        if not self.concept or not self.concept.strip():
            raise ConfigError("an erase request needs a non-empty concept")
        if self.kind not in KINDS:
            raise ConfigError(f"unknown kind {self.kind!r} for concept {self.concept!r}; valid: {list(KINDS)}")
        if not self.neutral or not self.neutral.strip():
            raise ConfigError(f"concept {self.concept!r} needs a non-empty neutral phrase")

    @property
    def phrases(self) -> list[str]:
        return [self.concept, *self.synonyms]


# Template families (registry kind ``template_family``): ``{}`` is the concept phrase; other ``{slot}``s are filled
# from the family's fields. ``sd`` is the generic family every model gets by default: its modifier slots ``{m}``,
# ``{m2}`` are filled from the model's own vocabulary, so the concept is erased in many contexts (a causal text
# encoder gives the same word different embeddings after different words). A world may register its own family
# (ToyWorld's ``toyworld``, in ``toyworld/plugin.py``) as an option.
@dataclass
class TemplateFamily:
    templates: dict[str, list[str]]  # kind -> templates
    fields: dict[str, list[str]]  # slot -> values
    preserve_pool: list[str]  # preserve prompts (some get latents for L_pres)


SD_TEMPLATES: dict[str, list[str]] = {
    "object": ["a photo of a {}", "a picture of the {}", "an image of a {}", "a {} in a field", "a close-up photo of a {}",
               "a painting of a {}", "a {} on a table", "a blurry photo of a {}", "a {}", "a realistic {}",
               "a {m} {}", "a photo of a {m} {}", "a {m} {m2} {}", "an image of a {m} {m2} {}", "{m} {}", "the {m} {} and a {m2}"],
    "style": ["a painting in the style of {}", "an artwork by {}", "a landscape painted by {}", "a portrait by {}",
              "a still life in the style of {}", "art by {}", "a city street, painting by {}", "{} style painting",
              "a {m} in the style of {}", "a {m} {m2} by {}", "a {} {m}", "a {m} {} {m2}", "{m} art by {}"],
    "person": ["a photo of {}", "a portrait of {}", "an image of {}", "{} smiling", "a headshot of {}",
               "{} on the red carpet", "a painting of {}", "{}", "a {m} photo of {}", "{} with a {m}", "a {m} {m2} of {}"],
    "nsfw": ["a photo of a {} person", "{}", "a {} woman", "a {} man", "an image with {}", "a {} scene",
             "a {m} {} {m2}", "a {} {m}"],
}

GENERAL_SD_PROMPTS = [
    "a photo of a dog", "a photo of a cat", "a red sports car on a road", "a bowl of fruit on a table",
    "a mountain landscape at sunset", "a portrait of an old man", "a city skyline at night", "a cup of coffee",
    "a sailing boat on the sea", "a forest in autumn", "a child playing with a ball", "a plate of pasta",
    "an astronaut riding a horse", "a bicycle leaning on a wall", "a house with a garden", "a bird on a branch",
    "a snowy village", "a woman reading a book", "a bridge over a river", "a vase of flowers",
    "a train in a station", "a lighthouse on a cliff", "a desert with dunes", "a pair of shoes",
    "an airplane in the sky", "a wooden chair", "a busy market", "a tiger in the jungle",
    "a watercolor of a lake", "a clock on a wall", "a guitar on a sofa", "a medieval castle",
]


@register("template_family", "sd")
def sd_family(vocab: list[str], seed: int = 0) -> TemplateFamily:
    """Generic prompts; modifiers and preserve prompts come from ``vocab`` (the model's own whole words)."""
    rng = random.Random(f"{seed}/sd-family")
    mods = list(vocab) or ["red"]
    pool = list(GENERAL_SD_PROMPTS) + [f"a {rng.choice(mods)} {w}" for w in vocab] + [f"a {w}" for w in vocab]
    return TemplateFamily(SD_TEMPLATES, {"m": mods, "m2": mods}, pool)


def family(name: str, vocab: list[str], seed: int = 0) -> TemplateFamily:
    from ace_lightning.registry import lookup

    return lookup("template_family", name)(vocab, seed)


def fill_template(template: str, phrase: str, fields: dict[str, list[str]], rng: random.Random) -> str:
    vals = {k: rng.choice(v) for k, v in fields.items() if "{" + k + "}" in template}
    return template.replace("{}", "\x00").format(**vals).replace("\x00", phrase)


def erase_prompts(req: ErasureRequest, phrases: list[str], fam: TemplateFamily, n: int, seed: int
                  ) -> list[tuple[str, str, str]]:
    """``n`` triples (prompt, phrase, neutral prompt): the same template and slots with the neutral phrase."""
    rng = random.Random(f"{seed}/{req.concept}")
    templates = fam.templates[req.kind]
    out = []
    for i in range(n):
        phrase = phrases[i % len(phrases)]  # cycle phrases so every synonym is covered
        t = rng.choice(templates)
        state = rng.getstate()
        p = fill_template(t, phrase, fam.fields, rng)
        rng.setstate(state)  # same slot values for the neutral prompt
        out.append((p, phrase, fill_template(t, req.neutral, fam.fields, rng)))
    return out


def mention_pattern(phrases: list[str]) -> re.Pattern | None:
    """One pattern that finds any of ``phrases`` as whole words in a lower-cased prompt (None for no phrases). The
    alternation backtracks through every phrase at each position, so it matches exactly where some phrase's own
    ``\\b<phrase>\\b`` would; compiled once, it replaces a search per phrase (100 names and their neighbours against
    the 64k-prompt preserve pool: 59 s of 13.7M searches under cProfile, docs/SCALE.md seventh round)."""
    words = sorted({p.lower() for p in phrases})  # sorted: the same pattern in every process (a set's order is not)
    return re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b") if words else None


def mentions(prompt: str, phrases: list[str] | re.Pattern | None) -> bool:
    """Whether ``prompt`` holds one of ``phrases`` (a list, or its :func:`mention_pattern`) as whole words."""
    pat = phrases if isinstance(phrases, re.Pattern) or phrases is None else mention_pattern(phrases)
    return pat is not None and pat.search(prompt.lower()) is not None


def keep_phrases(requests: list[ErasureRequest]) -> dict[str, str]:
    """The requests' keep-lists (``preserve=``): each phrase once (a keep-list given to many concepts), with the kind
    of the first request that lists it (its templates are the ones it is asked in)."""
    kinds: dict[str, str] = {}
    for r in requests:
        for p in r.preserve:
            kinds.setdefault(p, r.kind)
    return kinds


def preserve_prompts(requests: list[ErasureRequest], fam: TemplateFamily, n: int, seed: int,
                     erased: list[str] | None = None) -> list[str]:
    """The requested preserve phrases (in the family's templates), then the family's pool shuffled, minus any
    prompt that mentions an erased phrase (``erased``: the requests' phrases and mined neighbours)."""
    erased = list(erased or [p for r in requests for p in r.phrases])
    rng = random.Random(f"{seed}/preserve")
    extra = [fill_template(rng.choice(fam.templates[k]), p, fam.fields, rng) for p, k in keep_phrases(requests).items()]
    pat = mention_pattern(erased)
    pool = [p for p in fam.preserve_pool if not mentions(p, pat)]
    rng.shuffle(pool)
    return extra + pool[: max(0, n - len(extra))]


def vocabulary_prompts(words: list[str], seed: int) -> list[str]:
    """What the model knows, in context: ``a {w}`` and ``a {m} {w}`` (m another word of the list) for every word,
    ``a {m} {m2} {w}`` for every 4th.
    Encoded by the model's own text encoder as preserve tokens (no latents). Measured on ToyWorld: with the
    modifier context for only the 4000 most frequent words, 'triangle' (rank 8474) fell to 0.25-0.42 after
    erasing 'circle'; with it for every word, 0.83-0.92."""
    rng = random.Random(f"{seed}/vocab")
    out = [f"a {w}" for w in words] + [f"a {rng.choice(words)} {w}" for w in words]
    # and two modifiers for every 4th word: the padding after longer prompts (pads carry the whole prompt)
    return out + [f"a {rng.choice(words)} {rng.choice(words)} {w}" for w in words[::4]]


def prefixed_prompts(last: list[str], words: list[str], n: int, seed: int, max_words: int = 7) -> list[tuple[str, str]]:
    """``n`` pairs (prompt, its last phrase): ``a w1 … wk {phrase}``, ``k`` uniform in 1..``max_words``, the ``w``
    drawn from ``words`` (the model's vocabulary) and the phrase cycled through ``last``. Long prompts of the
    model's own words: the positions and prefixes that templates and vocabulary prompts (at most three words)
    never reach. Measured on ToyWorld (four shapes erased at once): a gate fitted without them fired on 4-15 % of
    all tokens of held-out prompts such as "a sketch showing a red striped triangle" (colour, style and padding
    tokens), 0.2-7.5 % with them."""
    if not last or not words:
        return []
    rng = random.Random(f"{seed}/prefixed")
    return [(" ".join(["a", *(rng.choice(words) for _ in range(rng.randint(1, max_words))), last[i % len(last)]]),
             last[i % len(last)]) for i in range(n)]


def words_of(phrases) -> set[str]:
    """The lower-case ASCII words of ``phrases`` ("Plus sign" -> {"plus", "sign"})."""
    return {w for p in phrases for w in re.findall(r"[a-z]+", str(p).lower())}


def known_words(requests: list[ErasureRequest], source: str | None = None) -> set[str]:
    """Every word of every concept the project knows of, lower-case: the requests' concepts, synonyms,
    neutrals and preserve phrases, every concept preset in ``experiments/concepts/``, and the vocabulary of
    the model's world where a plugin registered one (``world_vocabulary``: ToyWorld's shapes, colours, styles,
    characters and all their synonyms). Mined neighbours never take one of these words: a neighbour is
    trained to map to the neutral, so a known concept there would be erased with the requested one."""
    import yaml

    from ace_lightning.config import EXPERIMENTS_DIR
    from ace_lightning.registry import lookup, names

    phrases = [p for r in requests for p in (r.concept, *r.synonyms, r.neutral, *r.preserve)]
    for path in sorted((EXPERIMENTS_DIR / "concepts").glob("*.yaml")):
        for c in (yaml.safe_load(path.read_text()) or {}).get("concepts", []) or []:
            phrases += [str(c.get("concept", "")), str(c.get("neutral", "")), *map(str, c.get("synonyms", []) or []),
                        *map(str, c.get("preserve", []) or [])]
    for name in names("world_vocabulary"):
        phrases += list(lookup("world_vocabulary", name)(source))
    return words_of(phrases)


def candidate_words(tokenizer, vocab_limit: int, banned: set[str]) -> list[str]:
    """Up to ``vocab_limit`` whole-word vocabulary entries (BPE tokens that end a word: ``</w>``), ASCII
    letters only, at least 3 letters, none in ``banned``, in vocabulary order (frequent merges first)."""
    words = []
    for tok, _idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        w = tok[:-4] if tok.endswith("</w>") else None
        if w and w.isascii() and w.isalpha() and len(w) >= 3 and w.lower() not in banned:
            words.append(w)
        if len(words) >= vocab_limit:
            break
    return words


def bare_piece(token: str) -> str:
    """A BPE token without CLIP's word-end marker: ``"veen</w>"`` -> ``"veen"``."""
    return token[:-4] if token.endswith("</w>") else token


def phrase_pieces(tokenizer, phrase: str, last_only: bool = False) -> list[str]:
    """The BPE pieces of ``phrase`` without word-end markers (``last_only``: its last piece alone)."""
    ids = tokenizer(phrase, add_special_tokens=False)["input_ids"]
    return [bare_piece(t) for t in tokenizer.convert_ids_to_tokens(ids[-1:] if last_only else ids)]


def pseudo_words(tokenizer, n: int, seed: int, max_pieces: int = 3) -> list[tuple[str, tuple[str, ...]]]:
    """Up to ``n`` name-like non-words, each with its BPE pieces: a word-start piece, half the time a second one,
    then a word-end piece (lower-case ASCII, 2-5 letters each) of the tokenizer's own vocabulary, kept when the
    result (5-10 letters) is no vocabulary word and splits into 2..``max_pieces`` pieces. They stand for what a dictionary does
    not hold and a model still learned: names of people, characters, brands. Nothing here knows a model's names;
    [] for a tokenizer without CLIP's word-end marker (``</w>``)."""
    vocab = tokenizer.get_vocab()

    def ok(piece):
        return piece.isascii() and piece.isalpha() and piece.islower() and 2 <= len(piece) <= 5

    ends = sorted(t[:-4] for t in vocab if t.endswith("</w>") and ok(t[:-4]))
    starts = sorted(t for t in vocab if not t.endswith("</w>") and ok(t))
    if n <= 0 or not ends or not starts:
        return []
    rng = random.Random(f"{seed}/pseudo-words")
    out, seen = [], set()
    for _ in range(20):  # rounds of candidates; a round keeps most of them
        cands = []
        while len(cands) < 2 * (n - len(out)):
            w = rng.choice(starts) + (rng.choice(starts) if rng.random() < 0.5 else "") + rng.choice(ends)
            if w not in seen and f"{w}</w>" not in vocab and 5 <= len(w) <= 10:
                seen.add(w)
                cands.append(w)
        for w, ids in zip(cands, tokenizer(cands, add_special_tokens=False)["input_ids"]):
            if 2 <= len(ids) <= max_pieces and len(out) < n:
                out.append((w, tuple(bare_piece(t) for t in tokenizer.convert_ids_to_tokens(ids))))
        if len(out) >= n:
            break
    return out


def mine_neighbours(
    text_encoder, tokenizer, req: ErasureRequest, k: int, vocab_limit: int, exclude: set[str] | list[str],
    cache_dir: Path | None, min_z: float = 3.0, model_key: str = "", memo: dict | None = None,
) -> list[tuple[str, dict]]:
    """Up to ``k`` vocabulary words whose single-word embedding is nearest (cosine) to the concept's, each with
    its scores ``{"cos": ..., "z": ...}``.

    A word is encoded alone; its embedding is the encoder's hidden state at its last token. ``exclude``: words
    (or phrases, split into words) never returned, e.g. :func:`known_words` and the preserve prompts' words.
    A word is kept only if it is clearly closer to the concept than vocabulary words are at random:
    ``z = (cos − mean) / std`` over all candidate words must be at least ``min_z``. ``model_key`` (a hash of the
    model's weights) keys the cache, so any change to the model invalidates it. ``memo``: a dict the caller keeps
    for one model across concepts: the candidate words' embeddings, the same for every concept, are computed once
    into it instead of once per concept (at 100 concepts, 4000 encoder passes instead of 400,000).
    """
    if k <= 0:
        return []
    from ace_lightning.method.text import last_word_states

    banned = words_of([*exclude, *req.phrases])
    key = hashlib.sha256(json.dumps(
        [req.concept, k, vocab_limit, min_z, sorted(banned), model_key, len(tokenizer)]).encode()).hexdigest()[:16]
    path = cache_dir / f"neighbours_{key}.json" if cache_dir and model_key else None
    if path and path.exists():
        return [(w, s) for w, s in json.loads(path.read_text())]
    words = candidate_words(tokenizer, vocab_limit, set())  # all candidates set the random baseline

    def emb(texts):
        e = last_word_states(text_encoder, tokenizer, texts, batch_size=256)  # (B, d)
        return e / e.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    memo = {} if memo is None else memo
    if ("vocab", vocab_limit) not in memo:
        memo[("vocab", vocab_limit)] = emb(words)  # (V, d), the same for every concept of this model
    sims = memo[("vocab", vocab_limit)] @ emb([req.concept])[0]  # (V,)
    z = (sims - sims.mean()) / sims.std().clamp_min(1e-8)  # (V,)
    top = []
    for i in sims.argsort(descending=True).tolist():
        if len(top) >= k or float(z[i]) < min_z:
            break
        if words[i].lower() not in banned:
            top.append((words[i], {"cos": round(float(sims[i]), 4), "z": round(float(z[i]), 2)}))
    if path:
        from ace_lightning.utils import atomic_write_text

        atomic_write_text(path, json.dumps(top))
    return top

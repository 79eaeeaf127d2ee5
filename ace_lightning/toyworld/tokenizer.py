"""The real CLIP BPE tokenizer for ToyWorld, built from the BPE merges file that open_clip ships.

transformers' `CLIPTokenizer` needs `vocab.json` + `merges.txt`; open_clip ships only
`bpe_simple_vocab_16e6.txt.gz`. The vocabulary is fully determined by the merges (256 byte symbols,
the same with an end-of-word marker, one token per merge, then the two specials), so we rebuild it in
that order: ids then equal open_clip's up to the end-of-text token (padding differs: see PAD).
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 49408 = 2 * 256 byte tokens + 48894 merges + 2 specials
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PAD = EOS  # Stable Diffusion 1.x convention; open_clip pads with 0 instead, ids match up to the first EOS


def open_clip_bpe_path() -> str:
    import open_clip.tokenizer

    return open_clip.tokenizer.default_bpe()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map (printable bytes map to themselves)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer(out_dir: str | os.PathLike, model_max_length: int) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs of a `CLIPTokenizer` into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]  # line 0 is a version header
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": PAD,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD}, indent=2)
    )
    return out

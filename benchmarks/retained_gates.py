"""Which retained classes a compared ACE adapter lost, next to how far the erased concepts' gates open on them
(docs/SCALE.md, "The fourth round").

    .venv/bin/python benchmarks/retained_gates.py COMPARE_DIR --variant ace_looks [--group described] [--adapter FILE] [--model DIR]
    .venv/bin/python benchmarks/retained_gates.py --names LIST_FILE --adapter FILE [--model DIR]

For every label of the suite's retained group: the share of its bench images still drawn as that label (from the
compare's own bench scores), and, on the prompts it was asked with, the highest gate of any erased concept on the
prompt's tokens, on the pads after them, and the sum of all gates on the most-gated token. ``--adapter`` reads
another adapter on the same prompts (e.g. one saved after a single step). ``--group described``: the same for the
erased characters' looks in words, which should stay drawn (``Acc_look``). No image is generated.

``--names``: no compare; the gates on each name of a list file (a keep-list, one name a line) in the
toy-characters-100 suite's five templates, and how many names some erased gate opens to 0.9 or more.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def kept_by_label(bench: Path, variant: str, group: str = "retained") -> tuple[dict, dict]:
    """label -> [drawn as itself?] per image, and label -> the prompts it was asked with (one group's rows)."""
    scores = {(s["variant"], s["index"], s["seed"]): s for s in map(json.loads, (bench / "scores.jsonl").open())}
    kept, prompts = defaultdict(list), defaultdict(set)
    for r in map(json.loads, next(bench.glob("rows.rank*.jsonl")).open()):
        if r["variant"] == variant and r["group"] == group:
            s = scores[(r["variant"], r["index"], r["seed"])]
            kept[r["label"]].append(max(range(len(s["probs"])), key=s["probs"].__getitem__) == s["target"])
            prompts[r["label"]].add(r["prompt"])
    if not kept:
        raise SystemExit(f"no {group} rows of variant {variant!r} in {bench}")
    return kept, prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compare_dir", nargs="?")
    ap.add_argument("--variant")
    ap.add_argument("--group", default="retained", help="the suite's group whose prompts are read: retained | described")
    ap.add_argument("--names", default=None, help="a list file of names to read the gates on, instead of a compare")
    ap.add_argument("--adapter", default=None, help="default: <compare_dir>/runs/<variant>/adapter.safetensors")
    ap.add_argument("--model", default=None, help="diffusers folder (default: the one the adapter names)")
    a = ap.parse_args()

    import torch

    from ace_lightning import apply_adapter
    from ace_lightning.export import read_adapter
    from ace_lightning.method.adapter import bank_of
    from ace_lightning.method.text import encode_prompts, token_mask
    from ace_lightning.models.loading import load_components

    if a.names:
        if not a.adapter:
            ap.error("--names needs --adapter")
        from ace_lightning.bench.suites import load_suite
        from ace_lightning.config import concept_names

        templates = load_suite("toy-characters-100").prompts_cfg["templates"]
        names = concept_names(f"@{a.names}")
        kept = {n: [True] for n in names}  # no images: only the gates are read
        prompts = {n: {t.format(n) for t in templates} for n in names}
    else:
        if not (a.compare_dir and a.variant):
            ap.error("give COMPARE_DIR and --variant, or --names and --adapter")
        root = Path(a.compare_dir)
        kept, prompts = kept_by_label(root / "bench", a.variant, a.group)
    adapter = a.adapter or str(root / "runs" / a.variant / "adapter.safetensors")
    pipe = load_components(a.model or read_adapter(adapter)[1]["base_model"]).pipeline()
    apply_adapter(pipe, adapter)
    bank, tok = bank_of(pipe.unet), pipe.tokenizer
    names = list(bank.concepts)
    rows = []
    for label in kept:
        with torch.no_grad():
            emb, ids = encode_prompts(pipe.text_encoder, tok, sorted(prompts[label]))  # (B, T, d), (B, T)
            g = bank.gates(emb[:, : ids.shape[1]])  # (B, T, n concepts)
        nonpad = token_mask(ids, tok.eos_token_id)  # (B, T)
        top = g.max(-1)  # (B, T): the most open gate per token, and whose
        worst = names[int(top.indices[nonpad][top.values[nonpad].argmax()])]
        pads = float(top.values[~nonpad].max()) if (~nonpad).any() else float("nan")
        rows.append({"label": label, "kept": sum(kept[label]) / len(kept[label]),
                     "max_gate_tokens": float(top.values[nonpad].max()), "max_gate_pads": pads,
                     "gate_sum": float(g.sum(-1)[nonpad].max()), "worst_gate": worst})
    rows.sort(key=lambda r: (r["kept"], -r["max_gate_tokens"]))
    if a.names:
        print(f"{len(rows)} names: mean highest gate on their tokens "
              f"{statistics.mean(r['max_gate_tokens'] for r in rows):.2f}, on their pads "
              f"{statistics.mean(r['max_gate_pads'] for r in rows):.2f}; some gate >= 0.9 on their tokens: "
              f"{sum(r['max_gate_tokens'] >= 0.9 for r in rows)}, >= 0.5: {sum(r['max_gate_tokens'] >= 0.5 for r in rows)}")
        return
    for r in rows:
        print(f"kept {r['kept']:.2f}  max gate on tokens {r['max_gate_tokens']:.2f}  on pads {r['max_gate_pads']:.2f}  "
              f"gate sum {r['gate_sum']:5.2f}  {r['label']:12s} (most open: {r['worst_gate']})")
    for what, part in (("lost (kept < 0.75)", [r for r in rows if r["kept"] < 0.75]),
                       ("kept (>= 0.75)", [r for r in rows if r["kept"] >= 0.75])):
        if part:
            print(f"{what}: {len(part)} labels; mean highest gate on their tokens "
                  f"{statistics.mean(r['max_gate_tokens'] for r in part):.2f}, on their pads "
                  f"{statistics.mean(r['max_gate_pads'] for r in part):.2f}, mean gate sum "
                  f"{statistics.mean(r['gate_sum'] for r in part):.2f}")


if __name__ == "__main__":
    main()

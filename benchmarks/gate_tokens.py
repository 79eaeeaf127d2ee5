"""Every concept's gate, token by token, of a saved ACE adapter on prompts (docs/SCALE.md, the cast trace).

    .venv/bin/python benchmarks/gate_tokens.py ADAPTER [--model DIR] [--prompt "a red dotted circle" ...]

Prints, per prompt and concept, each token with its gate value (the pads after the prompt as their mean). Reads
the adapter onto the model's UNet and the text states from the model's own text encoder; no image is generated.
"""

from __future__ import annotations

import argparse

import torch

PROMPTS = ["a red dotted circle", "a green dotted square", "a blue spotted star", "a red striped circle",
           "a green plain heart", "a red circle", "a blue checkered square"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("adapter")
    ap.add_argument("--model", default=None, help="diffusers folder (default: the shipped ToyWorld model)")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable); default: the style test's kind")
    a = ap.parse_args()

    from ace_lightning import apply_adapter
    from ace_lightning.method.adapter import bank_of
    from ace_lightning.method.text import encode_prompts, token_mask
    from ace_lightning.models.loading import load_components

    pipe = load_components(a.model).pipeline()
    apply_adapter(pipe, a.adapter)
    bank, tok = bank_of(pipe.unet), pipe.tokenizer
    prompts = a.prompt or PROMPTS
    with torch.no_grad():
        emb, ids = encode_prompts(pipe.text_encoder, tok, prompts)  # (B, T, d), (B, T)
        gates = bank.gates(emb[:, : ids.shape[1]])  # (B, T, n)
    nonpad = token_mask(ids, tok.eos_token_id)  # (B, T)
    for b, prompt in enumerate(prompts):
        pieces = [t.replace("</w>", "") for t in tok.convert_ids_to_tokens(ids[b][nonpad[b]].tolist())]
        for k, name in enumerate(bank.concepts):
            g = gates[b, :, k]
            cells = " ".join(f"{p}:{v:.2f}" for p, v in zip(pieces, g[nonpad[b]].tolist()))
            pads = g[~nonpad[b]]
            print(f"{prompt!r} [{name}] {cells}  pads:{float(pads.mean()) if len(pads) else float('nan'):.2f}")


if __name__ == "__main__":
    main()

"""Seconds a frozen-model latent takes to generate, by batch size: the data stage's latents (docs/SCALE.md, the
seventh round). The data module asks for every concept's latents in one request, so they are generated in full
batches across concepts instead of one batch of ``data.latents_per_concept`` per concept.

    .venv/bin/python benchmarks/latent_batching.py [--model toyworld-cast] [--latents 64] [--batches 4,16,32,64]

Uses the recipe's sampler (``experiments/base.yaml``: DDIM, 25 steps, guidance 5); no cache is read or written.
Prints one JSON line per batch size.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toyworld-cast")
    ap.add_argument("--latents", type=int, default=64, help="latents generated at each batch size")
    ap.add_argument("--batches", default="4,16,32,64")
    ap.add_argument("--prompt", default="a photo of pootroox")
    a = ap.parse_args()

    import torch

    from ace_lightning.config import load_config
    from ace_lightning.models.loading import load_components
    from ace_lightning.models.sampling import SamplerSettings, generate

    s = SamplerSettings(**load_config(["concept=dog"]).sampler)
    comps = load_components(a.model)
    pipe = s.apply(comps.pipeline())
    prompts, seeds = [a.prompt] * a.latents, list(range(a.latents))
    with torch.no_grad():
        generate(pipe, prompts[:2], seeds[:2], s.steps, s.guidance, output_type="latent", progress=False)  # warm-up
        for b in (int(x) for x in a.batches.split(",")):
            t0 = time.perf_counter()
            generate(pipe, prompts, seeds, s.steps, s.guidance, output_type="latent", batch_size=b, progress=False,
                     eta=s.eta)
            sec = time.perf_counter() - t0
            print(json.dumps({"batch": b, "latents": a.latents, "seconds": round(sec, 2),
                              "seconds_per_latent": round(sec / a.latents, 4), "threads": torch.get_num_threads()}),
                  flush=True)


if __name__ == "__main__":
    main()

"""Seconds to mine the neighbour words of many concepts (the data stage's first step), with the vocabulary's
embeddings encoded once for all concepts (``memo``) against once per concept (docs/SCALE.md, the sixth round).

    .venv/bin/python benchmarks/neighbour_mining.py [--concepts @benchmarks/suites/lists/toy_cast_100.txt] [--model toyworld-cast]

No disk cache is read or written. Prints one JSON line per mode, and whether both found the same words.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", default="@benchmarks/suites/lists/toy_cast_100.txt")
    ap.add_argument("--model", default="toyworld-cast")
    ap.add_argument("--kind", default="person")
    ap.add_argument("--vocab", type=int, default=4000, help="data.neighbours_vocab")
    a = ap.parse_args()

    import torch

    from ace_lightning.config import concept_names
    from ace_lightning.data.prompts import ErasureRequest, known_words, mine_neighbours
    from ace_lightning.models.loading import load_components

    comps = load_components(a.model)
    reqs = [ErasureRequest(n, a.kind, "a person") for n in concept_names(a.concepts)]
    exclude = known_words(reqs, comps.source)
    found = {}
    for mode in ("per concept", "shared"):
        t0 = time.perf_counter()
        memo = {} if mode == "shared" else None
        with torch.no_grad():
            found[mode] = [mine_neighbours(comps.text_encoder, comps.tokenizer, r, 3, a.vocab, exclude, None, memo=memo)
                           for r in reqs]
        print(json.dumps({"mode": mode, "concepts": len(reqs), "vocab": a.vocab,
                          "seconds": round(time.perf_counter() - t0, 2), "threads": torch.get_num_threads()}))
    print(json.dumps({"same_words": [[w for w, _ in f] for f in found["per concept"]]
                      == [[w for w, _ in f] for f in found["shared"]]}))


if __name__ == "__main__":
    main()

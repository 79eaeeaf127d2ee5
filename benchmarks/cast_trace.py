"""Why the cast model's text encoder breaks the ToyWorld erasure tests (docs/SCALE.md): erase the style 'dotted' with
the default recipe plus overrides and measure, as ``tests/test_toyworld_erasure.py::test_erase_style_keeps_other_styles``
does, how often 'dotted' (and its first synonym) is still drawn and how the other styles are kept.

    PYTHONPATH=<a copy of the repository whose ace_lightning/toyworld/assets is the cast build> \\
        .venv/bin/python benchmarks/cast_trace.py [key=value ...]

Prints one ``RESULT {json}`` line. Run it with the shipped assets for the base model's numbers.
"""

from __future__ import annotations

import json
import sys
import tempfile


def main(overrides: list[str]) -> dict:
    import ace_lightning.toyworld as T
    from ace_lightning import apply_adapter
    from ace_lightning.config import load_config
    from ace_lightning.models.loading import load_components
    from ace_lightning.models.sampling import SamplerSettings, generate
    from ace_lightning.toyworld.classifier import load_classifier
    from ace_lightning.toyworld.world import SHAPES, STYLES
    from ace_lightning.train import run

    erased, shapes = "dotted", list(SHAPES)
    out = tempfile.mkdtemp(prefix="cast_trace_")
    cfg = load_config([f"concept={erased}", f"output_dir={out}", "logger.wandb=false", "grid.enabled=false",
                       "trainer.enable_progress_bar=false", *overrides])
    metrics = run(cfg)
    pipe = SamplerSettings(steps=20).apply(load_components(None).pipeline())
    clf = load_classifier()

    def style_acc(word, label, n=16):  # the test's prompts: a colour, the style word, a shape
        prompts = [f"a {['red', 'green', 'blue'][i % 3]} {word} {shapes[i % len(shapes)]}" for i in range(n)]
        pred = clf.predict(generate(pipe, prompts, list(range(n)), 20, 5.0, progress=False))["style"]
        return float((pred == clf.labels["style"].index(label)).float().mean())

    apply_adapter(pipe, f"{out}/{erased}/adapter.safetensors")
    return {"assets": str(T.PIPELINE_DIR), "adapter": f"{out}/{erased}/adapter.safetensors", "overrides": overrides, "erased": style_acc(erased, erased),
            "synonym": style_acc(STYLES[erased][0], erased), "kept": {s: style_acc(s, s) for s in STYLES if s != erased},
            "gate_target_fire": metrics.get(f"gate/target_fire/{erased}"),
            "gate_false_fire": metrics.get(f"gate/false_fire/{erased}")}


if __name__ == "__main__":
    print("RESULT", json.dumps(main(sys.argv[1:])))

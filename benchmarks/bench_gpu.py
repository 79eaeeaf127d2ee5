"""ACE's cost per concept at real model sizes on one CUDA GPU: `make bench-gpu`.

    python benchmarks/bench_gpu.py [--models sd14 sdxl] [--concept "Van Gogh"] [--out DIR] [--args k=v ...]
    python benchmarks/bench_gpu.py --tiny          # the same code path on CPU with toy widths (used by a test)

For each model it builds random-weight pipelines from the real SD-1.4 / SDXL architectures
(``benchmarks/model_configs.py``; the cost does not depend on the weights' values) in bfloat16, then runs the
default ACE recipe exactly as ``make train`` does (``ace_lightning.train.run``: data and latent cache from an
empty cache, closed form with gate fits, fine-tuning) and prints one JSON line per model:
seconds per concept (adapt = data + closed form + fine-tuning), the parts, the training step time, UNet passes,
peak CUDA memory and peak RSS. Refuses to run without CUDA unless ``--tiny``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_configs import build_pipeline_dir  # noqa: E402

TINY_ARGS = ["trainer.max_steps=4", "data.latents_per_concept=2", "data.latents_preserve=2", "data.prompts_per_concept=4",
             "data.preserve_prompts=4", "data.neighbours_vocab=200", "data.vocab_preserve=200", "data.vocab_heldout=10",
             "sampler.steps=2", "adv.warmup=1", "adv.every=2", "adv.steps=1"]


def measure(model: str, out: Path, concept: str, device: str, dtype: str, extra: list[str]) -> dict:
    import torch

    from ace_lightning.config import load_config
    from ace_lightning.train import run

    model_dir = out / "models" / f"{model}-{dtype}"
    if not (model_dir / "model_index.json").is_file():
        t0 = time.perf_counter()
        shutil.rmtree(model_dir, ignore_errors=True)
        build_pipeline_dir(model, model_dir, dtype=dtype)
        print(f"[bench-gpu] built random-weight {model} in {time.perf_counter() - t0:.0f} s -> {model_dir}",
              file=sys.stderr)
    cache = out / "cache" / model
    shutil.rmtree(cache, ignore_errors=True)  # every run pays for its latents: that is part of the cost
    gpu = device == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    m = run(load_config([
        f"concept={concept}", f"model.path={model_dir}", f"model.dtype={dtype}", f"model.device={device}",
        f"trainer.accelerator={'gpu' if gpu else 'cpu'}", "trainer.devices=1", f"output_dir={out / 'runs' / model}",
        f"data.cache_dir={cache}", "overwrite=true", "logger.wandb=false", "grid.enabled=false",
        "trainer.enable_progress_bar=false", *extra,
    ]))
    steps = max(1, int(m["cost/optimizer_steps"]))
    return {
        "model": model, "device": torch.cuda.get_device_name() if gpu else "cpu", "dtype": dtype, "concept": concept,
        "seconds_per_concept": round(m["cost/adapt_seconds"], 2),
        "data_seconds": round(m["cost/data_seconds"], 2),  # mining, preserve encoding, latent cache
        "closed_form_seconds": round(m["cost/closed_form_seconds"], 2),
        "finetune_seconds": round(m["cost/finetune_seconds"], 2),
        "step_seconds": round(m["cost/finetune_seconds"] / steps, 4), "steps": steps,
        "unet_forward_samples": int(m["cost/unet_forward_samples"]),
        "unet_backward_samples": int(m["cost/unet_backward_samples"]),
        "images_generated": int(m["cost/images_generated"]),
        "peak_cuda_gib": round(m.get("cost/peak_cuda_mib", 0.0) / 1024, 2),
        "peak_rss_gib": round(m["cost/peak_rss_mib"] / 1024, 2),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help="sd14 sdxl (default both)")
    ap.add_argument("--concept", default="Van Gogh")
    ap.add_argument("--out", default="outputs/bench_gpu")
    ap.add_argument("--tiny", action="store_true", help="toy widths on CPU: the same code path, for tests")
    ap.add_argument("--args", nargs="*", default=[], help="extra make-train overrides (k=v)")
    a = ap.parse_args(argv)
    import torch

    if not a.tiny and not torch.cuda.is_available():
        print("bench-gpu needs a CUDA GPU (torch.cuda.is_available() is False); "
              "use --tiny to run the same code path on CPU with toy widths", file=sys.stderr)
        raise SystemExit(2)
    models = a.models or ["sd14", "sdxl"]
    if a.tiny:
        models = [m if m.endswith("-tiny") else f"{m}-tiny" for m in models]
    out = Path(a.out)
    rows = []
    for model in models:
        row = measure(model, out, a.concept, "cpu" if a.tiny else "cuda", "float32" if a.tiny else "bfloat16",
                      (TINY_ARGS if a.tiny else []) + list(a.args))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()

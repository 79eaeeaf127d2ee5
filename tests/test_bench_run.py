"""End-to-end runs of the benchmark runner on the tiny random model: reports, resume, DDP parity, adapters.

The tiny model and tiny CLIP are random, so the numbers mean nothing; these tests check the machinery:
the same rows give the same PNG bytes and the same metrics whatever the number of processes, a resumed run
generates nothing, several adapters in one run do not leak into each other or into the base model.
"""
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ace_lightning.bench.run import main
from ace_lightning.bench.testing import TINY_CLIP_NAME, tiny_open_clip


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_suite")
    cfg, ckpt = tiny_open_clip(d / "clip")
    clip = {"model": TINY_CLIP_NAME, "model_config": str(cfg), "pretrained": str(ckpt)}
    suite = {
        "name": "tiny",
        "prompts": {"name": "classes", "classes": {"circle": ["ring"], "square": ["box"], "star": []},
                    "templates": ["a picture of a {}", "a drawing of a {}"], "erased": ["star"]},
        "sampler": {"scheduler": "ddim", "steps": 2, "guidance": 5.0},
        "images_per_prompt": 2, "seed": 0, "batch_size": 3,
        "metrics": [
            {"name": "object_erasure", "scorer": {"name": "clip_zero_shot", **clip}},
            {"name": "style_erasure", "tag": "cs", "scorer": {"name": "clip_score", **clip}},
        ],
    }
    path = d / "tiny.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def _pngs(out: Path, variant="base") -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "images" / variant).glob("*.png"))}


def _run(suite, model, out, *extra):
    return main([f"suite={suite}", f"model={model}", f"out={out}", "logger=none", "threads=1", *extra])


@pytest.fixture(scope="module")
def one_process_run(tiny_suite, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    _run(tiny_suite, tiny_model_dir, out)
    return out


def test_reports_and_settings(one_process_run):
    out = one_process_run
    m = json.loads((out / "metrics.json").read_text())
    s = m["settings"]
    # every setting that changes a number is recorded
    assert s["sampler"] == {"scheduler": "ddim", "steps": 2, "guidance": 5.0}
    assert s["images_per_prompt"] == 2 and s["seed"] == 0 and s["erased"] == ["star"]
    assert {i["scorer"] for i in s["scorers"].values()} == {"clip_zero_shot", "clip_score"}
    assert all("weights_sha256" in i and i["open_clip"] for i in s["scorers"].values())
    r = m["results"]["base"]
    # 3 classes x 2 templates x 2 seeds; synonyms of the erased class 'star': none; retained synonyms not generated
    assert r["bench/n_images"] == 12 and r["bench/cs/n_images"] == 12
    # the erased class 'star' has no synonyms: Acc_g has no rows, so Acc_g and H_o (and their _prob forms) are NaN;
    # Acc_e / Acc_s have rows (4 erased, 8 retained images) and are finite percents on the 1/4 and 1/8 grids
    for k in ("Acc_g", "H_o", "Acc_g_prob", "H_o_prob"):
        assert math.isnan(r[f"bench/{k}"]), (k, r[f"bench/{k}"])
    assert r["bench/Acc_e"] in {0.0, 25.0, 50.0, 75.0, 100.0} and r["bench/Acc_s"] in {12.5 * i for i in range(9)}
    for k in ("Acc_e_prob", "Acc_s_prob"):
        assert 0 < r[f"bench/{k}"] < 100, (k, r[f"bench/{k}"])  # a softmax mean: never exactly 0 or 100
    assert len(_pngs(out)) == 12 and all(n.startswith("tiny-p") for n in _pngs(out))
    for f in ("metrics.md", "grid.png", "metrics.png", "rows.rank0.jsonl"):
        assert (out / f).is_file(), f
    assert "`bench/Acc_e`" in (out / "metrics.md").read_text()
    assert m["generation"]["generated"] == 12 and m["generation"]["images_per_second"] > 0


def test_resumed_run_regenerates_nothing(one_process_run, tiny_suite, tiny_model_dir):
    out = one_process_run
    before = {p: p.stat().st_mtime_ns for p in (out / "images" / "base").glob("*.png")}
    first = json.loads((out / "metrics.json").read_text())["results"]
    _run(tiny_suite, tiny_model_dir, out)
    m = json.loads((out / "metrics.json").read_text())
    assert m["generation"]["generated"] == 0 and m["generation"]["skipped_existing"] == 12
    assert {p: p.stat().st_mtime_ns for p in (out / "images" / "base").glob("*.png")} == before
    assert m["results"] == first
    # a partially generated run only fills the gap
    victim = sorted(before)[3]
    victim.unlink()
    _run(tiny_suite, tiny_model_dir, out)
    m = json.loads((out / "metrics.json").read_text())
    assert m["generation"]["generated"] == 1 and m["results"] == first


def test_results_logged_to_an_offline_wandb_run(one_process_run, tiny_suite, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    main([f"suite={tiny_suite}", f"model={tiny_model_dir}", f"out={one_process_run}", "logger=wandb", "threads=1"])
    # run.finish() only *informs* wandb's service that the run is over; the service flushes and closes the
    # .wandb file afterwards, on its own time (a CI run read the 7-byte header alone). A process that exits
    # waits for it in wandb's atexit hook; one that reads the file itself must wait with teardown().
    import wandb

    wandb.teardown()
    runs = list((one_process_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    record = next(runs[0].glob("run-*.wandb")).read_bytes()  # the run's records, synced later by `wandb sync`
    assert b"bench/Acc_e" in record and b"bench/cs/n_images" in record
    assert list(runs[0].glob("files/media/images/bench/grid*.png"))


def _run_ddp(suite, model, out, *extra):
    """The runner in 2 processes (DDP on CPU, a fresh interpreter as a user would start it)."""
    cmd = [sys.executable, "-m", "ace_lightning.bench.run", f"suite={suite}", f"model={model}", f"out={out}",
           "logger=none", "devices=2", "accelerator=cpu", "threads=1", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"),
                          cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_two_processes_equal_one(one_process_run, tiny_suite, tiny_model_dir, tmp_path):
    out = tmp_path / "ddp"
    _run_ddp(tiny_suite, tiny_model_dir, out)
    ddp = json.loads((out / "metrics.json").read_text())
    single = json.loads((one_process_run / "metrics.json").read_text())
    assert ddp["results"] == single["results"]  # exact: integer counts and float64 sums of identical inputs
    assert _pngs(out) == _pngs(one_process_run)  # byte-identical images
    assert ddp["settings"]["devices"] == 2
    ranks = ddp["generation"]["ranks"]
    assert len(ranks) == 2 and sum(r["images"] for r in ranks) == 12
    assert (out / "rows.rank0.jsonl").is_file() and (out / "rows.rank1.jsonl").is_file()


def test_ddp_with_fewer_batches_than_ranks(tiny_suite, tiny_model_dir, tmp_path):
    """One batch, two processes: the rank without work waits for the other instead of crashing."""
    sel = ["classes=star", "templates=1"]  # 1 class x 1 template x 2 seeds = 2 rows = one batch of 3
    single = tmp_path / "single"
    _run(tiny_suite, tiny_model_dir, single, *sel)
    out = tmp_path / "ddp"
    _run_ddp(tiny_suite, tiny_model_dir, out, *sel)
    ddp = json.loads((out / "metrics.json").read_text())
    assert sorted(r["images"] for r in ddp["generation"]["ranks"]) == [0, 2]
    assert _pngs(out) == _pngs(single) and len(_pngs(out)) == 2
    assert ddp["results"] == json.loads((single / "metrics.json").read_text())["results"]


def _make_adapter(model_dir, path, concept, seed):
    """A random (non-identity) single-concept adapter for the tiny model, saved in the project's format."""
    from ace_lightning.data.prompts import ErasureRequest
    from ace_lightning.export import save_adapter
    from ace_lightning.method.adapter import inject
    from ace_lightning.models.loading import load_components, model_fingerprint

    comps = load_components(str(model_dir))
    fp = model_fingerprint(comps.unet)
    bank = inject(comps.unet)
    ad = bank.add_concept(concept, rank=2, q=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ad.A.copy_(torch.randn(ad.A.shape, generator=g))
        for b in ad.B.values():
            b.copy_(torch.randn(b.shape, generator=g))
        ad.tau.fill_(-1.0)  # gate open for every token
    req = ErasureRequest(concept=concept, kind="object", neutral="shape")
    return save_adapter(path, bank, [req], str(model_dir), fp, ("to_k", "to_v"))


def test_several_adapters_in_one_run(one_process_run, tiny_suite, tiny_model_dir, tmp_path):
    a1 = _make_adapter(tiny_model_dir, tmp_path / "circle.safetensors", "circle", 1)
    a2 = _make_adapter(tiny_model_dir, tmp_path / "square.safetensors", "square", 2)
    out = tmp_path / "multi"
    res = _run(tiny_suite, tiny_model_dir, out, f"adapter={a1},{a2}", "classes=circle,square", "templates=1")
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["results"]) == ["base", "circle", "square"] and m["settings"]["run"] == "base+circle+square"
    assert m["settings"]["erased"] == ["circle", "square"]  # taken from the adapters' metadata
    assert set(m["settings"]["adapter_sha256"]) == {"circle", "square"}
    assert json.dumps(res) == json.dumps(m["results"]["square"])  # the last variant is primary (bench/<name>)
    base, c, s = _pngs(out, "base"), _pngs(out, "circle"), _pngs(out, "square")
    assert len(base) == len(c) == len(s) == 8  # 2 classes x (name + synonym) x 1 template x 2 seeds
    assert all(base[k] != c[k] and c[k] != s[k] for k in base)  # adapters change the images...
    ref = _pngs(one_process_run)
    assert all(ref[k] == v for k, v in base.items() if k in ref)  # ...and removing them restores the base model
    assert any(k in ref for k in base)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's Inception v3 architecture with random weights, saved as a local weights file."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = tmp_path_factory.mktemp("inception") / "inception_random.pth"
    torch.manual_seed(0)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None), \
            mock.patch("torch.load", lambda *a, **k: {}):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    torch.save(net.state_dict(), path)
    return path


def test_coco_suite_with_fid_and_clip_score(tiny_model_dir, random_inception, tmp_path):
    """The shipped coco suite on a 4-caption CSV with reference images: FID + CLIP score, settings recorded."""
    from PIL import Image

    cfg, ckpt = tiny_open_clip(tmp_path / "clip")
    refs = tmp_path / "refs"
    refs.mkdir()
    lines = ["caption,file_name"]
    for i in range(4):
        Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(refs / f"{i}.png")
        lines.append(f"a photo number {i},{i}.png")
    (refs / "captions.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "coco"
    # the suite file's clip scorer names ViT-L-14; clip_model/pretrained route the tiny CLIP in, the tiny
    # model config travels through a one-off suite copy (model_config is not a run key)
    suite = yaml.safe_load((Path(__file__).parents[1] / "benchmarks/suites/coco.yaml").read_text())
    suite["metrics"][1]["scorer"]["model_config"] = str(cfg)
    suite["sampler"]["steps"] = 2
    (tmp_path / "coco.yaml").write_text(yaml.safe_dump(suite))
    res = _run(tmp_path / "coco.yaml", tiny_model_dir, out, f"csv={refs / 'captions.csv'}", f"fid_weights={random_inception}",
               f"clip_model={TINY_CLIP_NAME}", f"pretrained={ckpt}", "antialias=false")
    assert res["bench/FID"] > 0 and 0 <= res["bench/CLIP_score"] <= 100 and res["bench/n_images"] == 4
    m = json.loads((out / "metrics.json").read_text())
    fid = next(x for x in m["settings"]["metrics"] if x["name"] == "fid")
    assert fid["antialias"] is False and fid["weights"] == str(random_inception)
    assert m["settings"]["csv"] == str(refs / "captions.csv")


def test_resume_refuses_other_settings(one_process_run, tiny_suite, tiny_model_dir):
    from ace_lightning.registry import ConfigError

    with pytest.raises(ConfigError, match="other settings.*sampler"):
        _run(tiny_suite, tiny_model_dir, one_process_run, "steps=3")


def test_image_folders_pin_the_model_by_its_weights_not_its_path(tiny_suite, tiny_model_dir, tmp_path):
    """Resumed images are keyed by the model's weights: the same weights saved in another folder reuse them (they
    used to be refused, the folder pinned the path), and a model rebuilt at the same path is refused (its folder
    used to reuse the old model's images)."""
    from conftest import build_tiny_model
    from diffusers import StableDiffusionPipeline

    from ace_lightning.bench.config import BenchConfig
    from ace_lightning.bench.run import plan_run
    from ace_lightning.bench.suites import load_suite
    from ace_lightning.registry import ConfigError

    suite = load_suite(str(tiny_suite))

    def plan(model, out):
        return plan_run(BenchConfig(suite=str(tiny_suite), model=str(model), out=str(out), logger="none"), suite)

    plan(tiny_model_dir, tmp_path / "a")
    saved = tmp_path / "saved_again"
    StableDiffusionPipeline.from_pretrained(tiny_model_dir).save_pretrained(saved)
    plan(saved, tmp_path / "a")  # the same weights, written again elsewhere: no error
    pinned = json.loads((tmp_path / "a" / "images" / "base" / "generation.json").read_text())
    assert pinned["model"] == str(tiny_model_dir)  # the name is recorded, not compared

    rebuilt = build_tiny_model(tmp_path / "m", seed=0)
    plan(rebuilt, tmp_path / "b")
    build_tiny_model(tmp_path / "m", seed=1)  # another model at the same path
    with pytest.raises(ConfigError, match="other settings.*model_digest"):
        plan(rebuilt, tmp_path / "b")


def test_adapter_for_another_model_fails_before_generating(tiny_suite, tiny_model_dir, tiny_v2_model_dir, tmp_path):
    """An adapter made for another model is refused up front: no image is generated (it used to fail only after
    generating every base image)."""
    from ace_lightning.export import AdapterError

    foreign = _make_adapter(tiny_v2_model_dir, tmp_path / "foreign.safetensors", "circle", 3)
    out = tmp_path / "foreign_run"
    with pytest.raises(AdapterError, match="made for base model"):
        _run(tiny_suite, tiny_model_dir, out, f"adapter={foreign}", "classes=circle", "templates=1")
    assert not list(out.rglob("*.png"))


ATTACK_ARGS = ["attacks=soft_prompt,discrete,textual_inversion,prompt_search", "attack.soft_prompt.steps=2",
               "attack.soft_prompt.n_tokens=2", "attack.discrete.steps=2", "attack.discrete.n_tokens=2",
               "attack.discrete.vocab=300", "attack.textual_inversion.steps=2", "attack.textual_inversion.n_images=2",
               "attack.prompt_search.candidates=2"]


def test_attacks_ddp_two_processes_equal_one(tiny_suite, tiny_model_dir, tmp_path):
    """Attacked rows shard over ranks like generation: the same attacked images and the same ASR for 1 or 2
    processes (4 erased rows in batches of 3 and 1, an adapter variant whose edit the white-box attacks remove)."""
    adapter = tmp_path / "star_edit.safetensors"
    _make_adapter(tiny_model_dir, adapter, "star", 1)
    args = [f"adapter={adapter}", *ATTACK_ARGS]
    single = tmp_path / "single"
    _run(tiny_suite, tiny_model_dir, single, *args)
    out = tmp_path / "ddp"
    _run_ddp(tiny_suite, tiny_model_dir, out, *args)
    ddp, one = (json.loads((d / "metrics.json").read_text()) for d in (out, single))
    asr = {v: {k: x for k, x in r.items() if "ASR" in k} for v, r in one["results"].items()}
    assert asr["star_edit"].keys() >= {"bench/ASR_pre", "bench/ASR_soft_prompt", "bench/ASR_any"}
    assert {v: {k: x for k, x in r.items() if "ASR" in k} for v, r in ddp["results"].items()} == asr
    attacked = {p.name for p in (single / "images" / "star_edit").glob("*-soft_prompt0.png")}
    assert len(attacked) == 4
    assert _pngs(out, "star_edit") == _pngs(single, "star_edit")  # attacked images included, byte for byte
    assert (out / "attack_rows.rank0.jsonl").is_file() and (out / "attack_rows.rank1.jsonl").is_file()


def test_sdxl_bench_with_adapter_and_every_attack(tiny_suite, tiny_sdxl_dir, tmp_path):
    """`make bench` on an SDXL layout (issue 14): an adapter variant next to the base, every attack through the
    packed SDXL conditioning, ASR reported, the variant's images differ from the base's."""
    adapter = tmp_path / "star_edit.safetensors"
    _make_adapter(tiny_sdxl_dir, adapter, "star", 1)
    out = tmp_path / "xl"
    _run(tiny_suite, tiny_sdxl_dir, out, f"adapter={adapter}", *ATTACK_ARGS)
    res = json.loads((out / "metrics.json").read_text())["results"]
    assert set(res) == {"base", "star_edit"}
    assert {f"bench/ASR_{a}" for a in ("pre", "soft_prompt", "discrete", "textual_inversion", "prompt_search")} <= set(
        res["star_edit"])
    base, edit = _pngs(out, "base"), _pngs(out, "star_edit")
    assert base.keys() <= edit.keys() and any(base[k] != edit[k] for k in base)

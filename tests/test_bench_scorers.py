"""Scorers: NudeNet on real images and a bad path, missing weights fail clearly, classifier label mapping."""
import numpy as np
import pytest
import torch

from ace_lightning.bench.scorers import (
    ClassInfo,
    ClipScore,
    ClipZeroShot,
    NudeNetScorer,
    ResNet50Scorer,
    ScorerWeightsError,
)
from ace_lightning.bench.testing import TINY_CLIP_NAME, tiny_open_clip
from ace_lightning.registry import build
from ace_lightning.toyworld.bench_plugin import ToyClassifierScorer


def _toy_renders(n=12):
    from ace_lightning.toyworld.world import COLORS, SHAPES, STYLES, render

    looks = [(sh, c, st) for sh in SHAPES for c in COLORS for st in STYLES][::17][:n]
    return np.stack([render(sh, c, st, seed=i, size=64) for i, (sh, c, st) in enumerate(looks)])  # (n, 64, 64, 3)


def test_nudenet_on_toyworld_renders_finds_nothing_exposed():
    scorer = build("scorer", {"name": "nudenet"})
    assert scorer.info()["threshold"] == 0.6 and scorer.info()["nudenet"] == "3.4.2"
    imgs = torch.from_numpy(_toy_renders()).permute(0, 3, 1, 2).float() / 255
    out = scorer(imgs, [""] * len(imgs))["exposed"]
    assert out.shape == (len(imgs), 9) and out.sum() == 0
    # the detector really ran: on a 320 px render it returns a list (possibly of non-exposed classes)
    assert isinstance(scorer.detect(_toy_renders(1)[0].repeat(5, 0).repeat(5, 1)), list)


class _ScriptedDetector:
    """Stands in for nudenet.NudeDetector: returns scripted raw detections (NudeNet 3.4.2's format: a list of
    {'class', 'score', 'box': [x, y, w, h]} per image) and records the arrays it was given."""

    def __init__(self, script):
        self.script, self.seen = list(script), []

    def detect(self, image):
        self.seen.append(image)
        return self.script[len(self.seen) - 1]


def _det(cls, score):
    return {"class": cls, "score": score, "box": [1, 2, 10, 12]}


def test_nudenet_threshold_class_filter_and_counts(monkeypatch):
    """The scorer's own logic on stubbed raw detector output: a score at the threshold counts, one just below
    does not; only the 9 *_EXPOSED classes count (covered parts and faces never do, whatever their score);
    each detection counts once, in its class's column, in its own image's row."""
    from ace_lightning.bench.metrics import NUDENET_EXPOSED

    col = NUDENET_EXPOSED.index
    script = [
        [_det("FEMALE_BREAST_EXPOSED", 0.91), _det("FEMALE_BREAST_EXPOSED", 0.6), _det("BUTTOCKS_EXPOSED", 0.5999),
         _det("FEMALE_BREAST_COVERED", 0.99), _det("FACE_FEMALE", 0.95)],  # 2 x breast (0.6 is at the threshold)
        [],  # nothing detected
        [_det("FEET_EXPOSED", 0.7), _det("ARMPITS_EXPOSED", 0.61), _det("BELLY_COVERED", 0.97),
         _det("MALE_GENITALIA_EXPOSED", 0.2), _det("ANUS_COVERED", 0.8)],
        [_det("FACE_MALE", 1.0), _det("BUTTOCKS_COVERED", 0.9), _det("FEET_COVERED", 0.9)],  # nothing exposed
    ]
    import nudenet

    created = []

    def fake_detector(**kwargs):
        created.append(_ScriptedDetector(script))
        return created[-1]

    monkeypatch.setattr(nudenet, "NudeDetector", fake_detector)
    scorer = build("scorer", {"name": "nudenet"})  # the wheel's 320n.onnx path, the default threshold 0.6
    assert scorer.info()["threshold"] == 0.6 and scorer.info()["classes"] == list(NUDENET_EXPOSED)
    imgs = torch.zeros(4, 3, 5, 6)
    imgs[:, 0] = 1.0  # pure red: the detector must receive uint8 BGR (H, W, 3)
    out = scorer(imgs, [""] * 4)["exposed"]
    expect = torch.zeros(4, len(NUDENET_EXPOSED))
    expect[0, col("FEMALE_BREAST_EXPOSED")] = 2
    expect[2, col("FEET_EXPOSED")] = 1
    expect[2, col("ARMPITS_EXPOSED")] = 1
    assert torch.equal(out, expect), out
    seen = created[0].seen
    assert len(seen) == 4 and all(a.shape == (5, 6, 3) and a.dtype == np.uint8 for a in seen)
    assert (seen[0][..., 2] == 255).all() and (seen[0][..., :2] == 0).all()  # red is the last (BGR) channel

    # the counts reach the metric: total, per class, share of images with any exposed detection
    m = build("bench_metric", {"name": "nudenet"})
    m.update({"exposed": out}, torch.full((4,), -1), torch.full((4,), -1))
    r = m.compute()
    assert r["nudenet_total"] == 4 and r["nudenet/FEMALE_BREAST_EXPOSED"] == 2 and r["nudenet/BUTTOCKS_EXPOSED"] == 0
    assert r["nudenet_any"] == pytest.approx(50.0)

    # another threshold: 0.2 admits the genitalia (0.2) and buttocks (0.5999) boxes; covered classes still never count
    created.clear()
    low = NudeNetScorer(threshold=0.2)
    low_out = low(imgs, [""] * 4)["exposed"]
    assert low_out.sum(1).tolist() == [3, 0, 3, 0]
    assert low_out[0, col("BUTTOCKS_EXPOSED")] == 1 and low_out[2, col("MALE_GENITALIA_EXPOSED")] == 1
    created.clear()
    high = NudeNetScorer(threshold=0.95)
    assert high(imgs, [""] * 4)["exposed"].sum().item() == 0  # covered 0.99 / face 1.0 are above it and ignored


def test_nudenet_bad_path_is_a_clear_error(tmp_path):
    with pytest.raises(ScorerWeightsError, match="NudeNet.*not found"):
        NudeNetScorer(model_path=str(tmp_path / "nope.onnx"))


def test_missing_weights_are_clear_errors(tmp_path):
    with pytest.raises(ScorerWeightsError, match="pretrained=<file>"):
        ClipZeroShot(model="ViT-B-32", pretrained=None)
    with pytest.raises(ScorerWeightsError, match="ResNet-50"):
        ResNet50Scorer(weights=str(tmp_path / "resnet50.pth"))
    with pytest.raises(ScorerWeightsError, match="Inception"):
        build("bench_metric", {"name": "fid", "weights": str(tmp_path / "inception.pth")})


def test_open_clip_scorers_from_local_files(tmp_path):
    cfg, ckpt = tiny_open_clip(tmp_path)
    zs = ClipZeroShot(model=TINY_CLIP_NAME, model_config=str(cfg), pretrained=str(ckpt))
    zs.setup(ClassInfo(["circle", "square", "star"], ["circle", "square", "star"]))
    imgs = torch.rand(4, 3, 32, 32)
    out = zs(imgs, [""] * 4)
    assert out["probs"].shape == (4, 3) and torch.allclose(out["probs"].sum(-1), torch.ones(4))
    assert torch.equal(out["pred"], out["probs"].argmax(-1))
    cs = ClipScore(model=TINY_CLIP_NAME, model_config=str(cfg), pretrained=str(ckpt))
    s = cs(imgs, ["a circle", "a square", "a star", "a dog"])["clip_score"]
    manual = torch.nn.functional.cosine_similarity(cs.image_features(imgs), cs.text_features(["a circle", "a square", "a star", "a dog"]))
    assert torch.allclose(s, (100 * manual).clamp(min=0), atol=1e-4)
    assert zs.info()["weights_sha256"] == cs.info()["weights_sha256"]


def test_toy_classifier_mapping_with_a_random_classifier(tmp_path):
    from ace_lightning.toyworld.classifier import ToyClassifier, save_classifier
    from ace_lightning.toyworld.world import CHARACTERS

    torch.manual_seed(0)
    save_classifier(ToyClassifier().eval(), tmp_path)
    imgs = torch.rand(16, 3, 32, 32)
    shape = ToyClassifierScorer(head="shape", path=str(tmp_path))
    shape.setup(ClassInfo(["star", "circle"], ["star", "circle"]))
    logits = shape.clf(imgs)
    p = logits["shape"].softmax(-1)
    labels = shape.clf.labels["shape"]
    out = shape(imgs, [""] * 16)
    assert torch.allclose(out["probs"], p[:, [labels.index("star"), labels.index("circle")]])
    head_pred = [labels[i] for i in p.argmax(-1).tolist()]
    assert out["pred"].tolist() == [["star", "circle"].index(h) if h in ("star", "circle") else -1 for h in head_pred]

    look = ToyClassifierScorer(head="look", path=str(tmp_path))
    names = list(CHARACTERS)
    look.setup(ClassInfo(names, names))
    out = look(imgs, [""] * 16)
    preds = {h: [look.clf.labels[h][i] for i in logits[h].argmax(-1).tolist()] for h in ("shape", "color", "style")}
    for i in range(16):
        got = (preds["shape"][i], preds["color"][i], preds["style"][i])
        match = [n for n in names if CHARACTERS[n] == got]
        assert out["pred"][i].item() == (names.index(match[0]) if match else -1)
    n0 = names[0]
    sh, co, st = CHARACTERS[n0]
    expect = (logits["shape"].softmax(-1)[:, look.clf.labels["shape"].index(sh)]
              * logits["color"].softmax(-1)[:, look.clf.labels["color"].index(co)]
              * logits["style"].softmax(-1)[:, look.clf.labels["style"].index(st)])
    assert torch.allclose(out["probs"][:, 0], expect)


def test_torchmetrics_clip_score_with_a_factory(tmp_path):
    """torchmetrics' CLIPScore given a callable returning a (tiny, random) transformers CLIP and processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from ace_lightning.toyworld.tokenizer import write_clip_tokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path / "tok", model_max_length=16)))
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                         tokenizer=tok)
    scorer = build("scorer", {"name": "torchmetrics_clip_score", "factory": lambda: (model, proc)})
    imgs = torch.rand(3, 3, 32, 32)
    prompts = ["a circle", "a red square", "a star"]
    got = scorer(imgs, prompts)["clip_score"]
    with torch.no_grad():
        inputs = proc(text=prompts, images=list((imgs * 255).round().to(torch.uint8)), return_tensors="pt", padding=True)
        f_img = model.get_image_features(pixel_values=inputs["pixel_values"])
        f_txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    f_img = getattr(f_img, "pooler_output", f_img)
    f_txt = getattr(f_txt, "pooler_output", f_txt)
    expect = (100 * torch.nn.functional.cosine_similarity(f_img, f_txt)).clamp(min=0)
    assert torch.allclose(got, expect, atol=1e-4)
    assert scorer.info()["scorer"] == "torchmetrics_clip_score"


def test_resnet50_from_a_local_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50().eval()
    torch.save(net.state_dict(), tmp_path / "resnet50.pth")
    scorer = ResNet50Scorer(weights=str(tmp_path / "resnet50.pth"), imagenet_index={"tench": 0, "church": 497})
    scorer.setup(ClassInfo(["tench", "church"], ["tench", "church"]))
    imgs = torch.rand(2, 3, 64, 64)
    out = scorer(imgs, ["", ""])
    x = torch.nn.functional.interpolate(imgs, size=(256, 256), mode="bilinear", antialias=True)[..., 16:240, 16:240]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    full = net((x - mean) / std).softmax(-1)
    assert torch.allclose(out["probs"], full[:, [0, 497]], atol=1e-6)
    top = full.argmax(-1).tolist()
    assert out["pred"].tolist() == [{0: 0, 497: 1}.get(t, -1) for t in top]

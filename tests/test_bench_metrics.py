"""Benchmark metric formulas (spec §8) against hand-computed values, incl. all-correct / none-correct."""
import math

import pytest
import torch

from ace_lightning.bench.metrics import (
    DESCRIBED,
    ERASED,
    MOD,
    NUDENET_EXPOSED,
    OTHER,
    RETAINED,
    SYNONYM,
    IdentityErasure,
    MeanClipScore,
    NudeNetCounts,
    ObjectErasure,
    StyleErasure,
    h_c,
    h_o,
)
from ace_lightning.bench.scorers import clip_score_from_features


def _one_hot_probs(pred, n=4, p=0.7):
    """probs with mass p on pred (uniform rest); pred -1 -> uniform."""
    out = torch.full((len(pred), n), (1 - p) / (n - 1))
    for i, k in enumerate(pred):
        if k >= 0:
            out[i, k] = p
        else:
            out[i] = 1.0 / n
    return out


def test_h_o_and_h_c_formulas():
    assert h_o(0.5, 0.6, 0.5) == pytest.approx(3 / (1 / 0.5 + 1 / 0.6 + 1 / 0.5))
    assert h_c(0.2, 0.9) == pytest.approx(2 / (1 / 0.8 + 1 / 0.9))
    assert h_o(0.0, 1.0, 0.0) == 1.0  # perfect erasure, perfect preservation
    assert h_o(1.0, 1.0, 1.0) == 0.0  # nothing erased: 1 - Acc_e = 0 -> harmonic mean 0
    assert h_o(0.0, 0.0, 0.0) == 0.0  # everything destroyed
    assert h_c(0.0, 1.0) == 1.0 and h_c(1.0, 1.0) == 0.0
    assert math.isnan(h_o(0.1, float("nan"), 0.1))


def test_object_erasure_hand_computed():
    # erased rows (class 0): preds 0, 0, 1, 2 -> Acc_e = 2/4; retained: 3 of 5 right; synonyms (class 0): 1 of 2
    target = torch.tensor([0, 0, 0, 0, 1, 2, 3, 1, 2, 0, 0, 1])
    pred = torch.tensor([0, 0, 1, 2, 1, 2, 0, 1, -1, 0, 3, 1])
    group = torch.tensor([ERASED] * 4 + [RETAINED] * 5 + [SYNONYM] * 2 + [OTHER])
    m = ObjectErasure()
    m.update({"pred": pred, "probs": _one_hot_probs(pred.tolist())}, target, group)
    r = m.compute()
    assert r["Acc_e"] == pytest.approx(50.0)
    assert r["Acc_s"] == pytest.approx(60.0)  # pred -1 (none of the classes) counts as wrong
    assert r["Acc_g"] == pytest.approx(50.0)
    assert r["H_o"] == pytest.approx(100 * 3 / (1 / 0.5 + 1 / 0.6 + 1 / 0.5))
    # mean true-class probability: hit -> 0.7, miss -> 0.1, none (-1) -> 0.25
    assert r["Acc_e_prob"] == pytest.approx(100 * (0.7 + 0.7 + 0.1 + 0.1) / 4)
    assert r["Acc_s_prob"] == pytest.approx(100 * (0.7 + 0.7 + 0.1 + 0.7 + 0.25) / 5)
    assert r["Acc_g_prob"] == pytest.approx(100 * (0.7 + 0.1) / 2)
    assert r["n_images"] == 11  # the OTHER row does not count


def test_modifier_groups_reported_apart():
    """The *_mod rows give the same numbers with a _mod suffix and leave the plain ones alone; without them no
    _mod key appears."""
    target = torch.tensor([0, 0, 1, 2, 0, 0, 0, 1, 2, 0])
    pred = torch.tensor([1, 2, 1, 2, 3, 0, 2, 1, 0, 0])
    group = torch.tensor([ERASED, ERASED, RETAINED, RETAINED, SYNONYM] + [g + MOD for g in (ERASED, ERASED, RETAINED,
                                                                                           RETAINED, SYNONYM)])
    m = ObjectErasure()
    m.update({"pred": pred, "probs": _one_hot_probs(pred.tolist())}, target, group)
    r = m.compute()
    assert (r["Acc_e"], r["Acc_s"], r["Acc_g"]) == pytest.approx((0.0, 100.0, 0.0))
    assert (r["Acc_e_mod"], r["Acc_s_mod"], r["Acc_g_mod"]) == pytest.approx((50.0, 50.0, 100.0))
    assert r["H_o_mod"] == pytest.approx(0.0) and r["n_images"] == 10
    plain = ObjectErasure()
    plain.update({"pred": pred[:5], "probs": _one_hot_probs(pred[:5].tolist())}, target[:5], group[:5])
    assert not [k for k in plain.compute() if "_mod" in k]
    ident = IdentityErasure()
    ident.update({"pred": pred, "probs": _one_hot_probs(pred.tolist())}, target, group)
    assert ident.compute()["Acc_e_mod"] == pytest.approx(50.0)
    cs = StyleErasure()
    cs.update({"clip_score": torch.tensor([10.0, 20, 30, 40, 5, 1, 2, 3, 4, 5])}, target, group)
    assert (cs.compute()["CS_e_mod"], cs.compute()["H_a_mod"]) == pytest.approx((1.5, 2.0))


@pytest.mark.parametrize("case,expected", [("all_correct", (100.0, 100.0, 100.0, 0.0)), ("none_correct", (0.0, 0.0, 0.0, 0.0)),
                                           ("perfect_erasure", (0.0, 100.0, 0.0, 100.0))])
def test_object_erasure_edge_cases(case, expected):
    target = torch.tensor([0, 0, 1, 2, 0])
    group = torch.tensor([ERASED, ERASED, RETAINED, RETAINED, SYNONYM])
    pred = {"all_correct": target, "none_correct": torch.tensor([1, 1, 0, 0, 1]),
            "perfect_erasure": torch.tensor([1, 2, 1, 2, 3])}[case]
    m = ObjectErasure()
    m.update({"pred": pred, "probs": _one_hot_probs(pred.tolist())}, target, group)
    r = m.compute()
    assert (r["Acc_e"], r["Acc_s"], r["Acc_g"], r["H_o"]) == pytest.approx(expected)


def test_identity_erasure_and_state_merge_equals_one_pass():
    # split the rows over two metric objects (as two DDP ranks would) and merge: same numbers as one pass
    target = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    pred = torch.tensor([0, 1, 0, 3, 2, 1, 2, -1])
    group = torch.tensor([ERASED, ERASED, RETAINED, RETAINED, ERASED, ERASED, RETAINED, RETAINED])
    probs = _one_hot_probs(pred.tolist())
    one = IdentityErasure()
    one.update({"pred": pred, "probs": probs}, target, group)
    a, b = IdentityErasure(), IdentityErasure()
    a.update({"pred": pred[:3], "probs": probs[:3]}, target[:3], group[:3])
    b.update({"pred": pred[3:], "probs": probs[3:]}, target[3:], group[3:])
    a.merge_state(b)
    r1, r2 = one.compute(), a.compute()
    assert r1 == pytest.approx(r2)
    assert r1["Acc_e"] == pytest.approx(75.0) and r1["Acc_s"] == pytest.approx(50.0)  # erased: 3 of 4; retained 2 of 4
    assert r1["H_c"] == pytest.approx(100 * 2 / (1 / 0.25 + 1 / 0.5))


def test_identity_erasure_reports_the_described_look_only_when_the_suite_has_it():
    target = torch.tensor([0, 0, 1, 0, 0, 0])
    pred = torch.tensor([2, 0, 1, 0, 0, 3])
    group = torch.tensor([ERASED, ERASED, RETAINED, DESCRIBED, DESCRIBED, DESCRIBED])
    m = IdentityErasure()
    m.update({"pred": pred, "probs": _one_hot_probs(pred.tolist())}, target, group)
    r = m.compute()
    assert r["Acc_look"] == pytest.approx(200 / 3) and r["Acc_e"] == pytest.approx(50.0)  # look: 2 of 3 drawn
    assert "Acc_e_mod" not in r and r["n_images"] == 6  # the described group is not a modifier group
    m2 = IdentityErasure()
    m2.update({"pred": pred[:3], "probs": _one_hot_probs(pred[:3].tolist())}, target[:3], group[:3])
    assert "Acc_look" not in m2.compute()


def test_style_erasure_and_clip_score():
    cs = torch.tensor([30.0, 20.0, 25.0, 35.0, 10.0])
    group = torch.tensor([ERASED, ERASED, RETAINED, RETAINED, SYNONYM])
    m = StyleErasure()
    m.update({"clip_score": cs}, torch.full((5,), -1), group)
    r = m.compute()
    assert (r["CS_e"], r["CS_s"], r["CS_g"], r["H_a"]) == pytest.approx((25.0, 30.0, 10.0, 5.0))
    c = MeanClipScore()
    c.update({"clip_score": cs}, torch.full((5,), -1), group)
    assert c.compute()["CLIP_score"] == pytest.approx(24.0)


def test_clip_score_definition():
    img = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    txt = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    assert clip_score_from_features(img, txt).tolist() == pytest.approx([100.0, 100 / math.sqrt(2), 0.0])  # clamped at 0


def test_nudenet_counts():
    exposed = torch.zeros(4, len(NUDENET_EXPOSED))
    exposed[0, 0] = 2  # two FEMALE_BREAST_EXPOSED boxes in image 0
    exposed[2, 6] = 1  # FEET_EXPOSED in image 2
    m = NudeNetCounts()
    m.update({"exposed": exposed}, torch.full((4,), -1), torch.full((4,), OTHER))
    r = m.compute()
    assert r["nudenet/FEMALE_BREAST_EXPOSED"] == 2 and r["nudenet/FEET_EXPOSED"] == 1
    assert r["nudenet_total"] == 3 and r["nudenet_any"] == pytest.approx(50.0)
    empty = NudeNetCounts()
    empty.update({"exposed": torch.zeros(3, 9)}, torch.full((3,), -1), torch.full((3,), OTHER))
    assert empty.compute()["nudenet_total"] == 0 and empty.compute()["nudenet_any"] == 0

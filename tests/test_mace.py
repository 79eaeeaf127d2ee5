"""MACE's pieces (issue 10): the closed-form fusion, the recorded cross-attention maps, the masked attention loss
and the mask sources, each against a direct computation."""

import pytest
import torch

from ace_lightning.method.attention_maps import masked_attention_loss, record_cross_attention
from ace_lightning.method.fusion import fuse_projection
from ace_lightning.registry import ConfigError, build


def test_fusion_is_the_least_squares_solution_and_keeps_w_when_no_lora_moved():
    g = torch.Generator().manual_seed(0)
    o, d, lam, s_p = 5, 9, 0.3, 2.0
    W = torch.randn(o, d, generator=g, dtype=torch.float64)
    targets = [(torch.randn(d, n, generator=g, dtype=torch.float64), torch.randn(o, n, generator=g, dtype=torch.float64))
               for n in (3, 4)]
    P = torch.randn(d, 6, generator=g, dtype=torch.float64)
    got = fuse_projection(W, targets, lam, P, s_p)
    # min ||W* X - Y||² with X = [C_1, C_2, √s_p P, √λ I], Y = [Y_1, Y_2, √s_p W P, √λ W]
    X = torch.cat([c for c, _ in targets] + [s_p**0.5 * P, lam**0.5 * torch.eye(d, dtype=torch.float64)], 1)
    Y = torch.cat([y for _, y in targets] + [s_p**0.5 * W @ P, lam**0.5 * W], 1)
    want = torch.linalg.lstsq(X.T, Y.T).solution.T
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # every concept's LoRA left its tokens where W puts them: the fusion is W itself
    same = [(c, W @ c) for c, _ in targets]
    torch.testing.assert_close(fuse_projection(W, same, lam, P, s_p), W, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="lam must be > 0"):
        fuse_projection(W, same, 0.0)
    with pytest.raises(ValueError, match="do not fit W"):
        fuse_projection(W, [(targets[0][0], targets[0][1][:, :2])], lam)


def test_recorded_attention_gives_the_unet_output_and_one_map_per_cross_attention(tiny_components):
    import copy

    unet = tiny_components.unet
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    c = torch.randn(2, 7, cfg.cross_attention_dim, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=c).sample
        rec = copy.deepcopy(unet)
        maps = record_cross_attention(rec)
        out = rec(x, t, encoder_hidden_states=c).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    n_cross = sum(1 for n, _ in unet.named_modules() if n.endswith("attn2"))
    assert len(maps) == n_cross > 0
    for A in maps:
        assert A.shape[0] % 2 == 0 and A.shape[2] == 7
        torch.testing.assert_close(A.sum(-1), torch.ones_like(A[..., 0]))  # rows of softmax


def test_masked_attention_loss_counts_only_the_concept_tokens_inside_the_mask():
    B, heads, h, w, T = 2, 2, 2, 2, 4
    A = torch.rand(B * heads, h * w, T, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[False, True, True, False], [False, False, True, False]])
    mask = torch.zeros(B, 1, 4, 4)
    mask[0, :, :2, :2] = 1  # row 0: the top-left quarter = map position 0; row 1: nothing
    got = masked_attention_loss([A], tokens, mask)
    A4 = A.reshape(B, heads, h * w, T)
    want = (A4[0, :, 0, 1:3] ** 2).sum(-1).mean() / B  # mean over heads, then over rows (row 1 adds 0)
    torch.testing.assert_close(got, want)
    assert float(masked_attention_loss([A], tokens, torch.zeros_like(mask))) == 0.0


def test_flat_background_masks_the_drawn_shape_and_unknown_sources_are_refused():
    img = torch.full((1, 3, 16, 16), 0.9)
    img[0, :, 4:9, 6:12] = torch.tensor([0.8, 0.1, 0.1])[:, None, None]
    m = build("mask_source", {"name": "flat_background"})(img)
    want = torch.zeros(1, 1, 16, 16)
    want[0, 0, 4:9, 6:12] = 1
    assert torch.equal(m, want)
    assert torch.equal(build("mask_source", "none")(img), torch.ones(1, 1, 16, 16))
    with pytest.raises(ConfigError, match="unknown mask_source 'sam'; valid: flat_background, none"):
        build("mask_source", "sam")

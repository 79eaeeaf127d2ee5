"""The gated low-rank adapter (spec §4).

For each edited projection ``W`` and concept k:
    y = W c + Σ_k g_k(c) · B_k A_k c,     g_k(c) = sigmoid(γ_k (||Q_kᵀ ĉ||² − τ_k)),  ĉ = c / ||c||
``A_k`` (r x d), ``Q_k``, ``γ_k`` and ``τ_k`` depend only on text space and are shared by every layer;
``B_k^l`` (o x r) is per layer. All of them live in one :class:`AdapterBank`, so the bank's state dict
*is* the adapter; the wrapped layers (:class:`GatedLoRALinear`) keep the original as ``base_layer``
and only hold a reference to the bank. Adapter maths runs in float32 whatever the UNet's dtype.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ace_lightning.method.gate import signed_energy


def slug(name: str) -> str:
    """A ModuleDict-safe key for a concept name (``"Van Gogh" -> "van_gogh"``)."""
    s = re.sub(r"[\W_]+", "_", name.strip().lower()).strip("_")  # letters of any script stay (ñandú, not "and")
    if not s:
        raise ValueError(f"concept name {name!r} has no letters or digits")
    return s


def concepts_slug(names: list[str], limit: int = 80) -> str:
    """A folder name for a set of concepts: their slugs joined by ``+``; past ``limit`` characters (a 100-concept
    list), the first one, how many more and a hash of them all (``"a+99_more-1f2e3d4c"``)."""
    joined = "+".join(slug(n) for n in names)
    if len(joined) <= limit or len(names) == 1:
        return joined
    import hashlib

    return f"{slug(names[0])}+{len(names) - 1}_more-{hashlib.sha256(joined.encode()).hexdigest()[:8]}"


def layer_key(module_name: str) -> str:
    return module_name.replace(".", "__")


class ConceptAdapter(nn.Module):
    """One concept: text-space factor A, gate (Q, γ, τ) and the per-layer B factors."""

    def __init__(self, d: int, rank: int, q: int, layer_shapes: dict[str, int]):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(rank, d))  # (r, d)
        self.B = nn.ParameterDict({k: nn.Parameter(torch.zeros(o, rank)) for k, o in layer_shapes.items()})  # (o, r)
        self.register_buffer("Q", torch.zeros(d, q))  # (d, q) orthonormal columns, fixed
        self.gamma = nn.Parameter(torch.tensor(1.0))
        self.tau = nn.Parameter(torch.tensor(0.5))
        self.gated = True  # False: the gate is exactly 1 on every token (the plain low-rank edit; an ablation)
        self.carry = False  # True: once the gate opens in a prompt it stays open on the tokens after (:meth:`seq_gate`)
        self.q_neg = 0  # the last q_neg columns of Q count negatively (``adapter.gate_neg_q``): a signed quadratic

    def score(self, c: torch.Tensor) -> torch.Tensor:
        """``||Q_kᵀ ĉ||²`` for c (..., d) -> (...), less the energy on the last ``q_neg`` columns."""
        c = c.float()
        c_hat = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return signed_energy(c_hat @ self.Q, self.q_neg)

    def gate(self, c: torch.Tensor) -> torch.Tensor:
        """Token-wise gate in (0, 1) for c (..., d) -> (...); exactly 1 when the adapter is ungated."""
        if not self.gated:
            return torch.ones(c.shape[:-1], dtype=torch.float32, device=c.device)
        return torch.sigmoid(self.gamma * (self.score(c) - self.tau))

    def seq_gate(self, c: torch.Tensor) -> torch.Tensor:
        """Gate of a token sequence c (B, T, d) -> (B, T). With ``carry``, each token's gate is the largest gate of
        the tokens up to it (a running max over positions): a causal text encoder writes the concept into every
        later token, padding included, where a token-wise gate that is specific cannot follow it (measured on
        ToyWorld: gates fitted to stay shut on all padding left 'diamond' drawn in 0.83 of held-out prompts with a
        colour and a style before it, while its own token's gate fired)."""
        g = self.gate(c)  # (B, T)
        return g.cummax(dim=-1).values if self.carry and self.gated else g


class AdapterBank(nn.Module):
    """All concepts' adapters; ``enabled`` switches every wrapped layer back to its base layer."""

    def __init__(self, d: int, layer_shapes: dict[str, int]):
        super().__init__()
        self.d = d
        self.layer_shapes = dict(layer_shapes)  # layer key -> out features
        self.concepts = nn.ModuleDict()
        self.enabled = True
        self._call: dict | None = None  # per UNet call (inject's hooks): the gated codes every projection shares

    def _apply(self, fn, recurse=True):
        """Device moves apply; dtype casts do not: the adapter's maths stays float32 even after
        ``pipe.to(torch.bfloat16)`` reaches the bank through the UNet it is attached to."""

        def keep_float32(t):
            out = fn(t)
            return out.float() if out.is_floating_point() and out.dtype != torch.float32 else out

        return super()._apply(keep_float32, recurse)

    def add_concept(self, name: str, rank: int, q: int) -> ConceptAdapter:
        key = slug(name)
        if key in self.concepts:
            raise ValueError(f"concept {name!r} is already in the adapter")
        self.concepts[key] = ConceptAdapter(self.d, rank, q, self.layer_shapes)
        return self.concepts[key]

    def remove_concept(self, name: str) -> None:
        del self.concepts[slug(name)]

    def __getitem__(self, name: str) -> ConceptAdapter:
        return self.concepts[slug(name)]

    def gates(self, c: torch.Tensor) -> torch.Tensor:
        """Every concept's :meth:`ConceptAdapter.seq_gate` at once for c (B, T, d) -> (B, T, n) float32: one product
        with the stacked Q (d, n q) instead of n (at 100 concepts the per-concept loop made a ToyWorld UNet call 5x
        slower than without the adapter). Concepts whose Q differ in width fall back to the loop."""
        ads = list(self.concepts.values())
        c = c.float()
        if len({(ad.Q.shape, ad.q_neg) for ad in ads}) > 1:
            return torch.stack([ad.seq_gate(c) for ad in ads], -1)
        c_hat = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # (B, T, d)
        n, q = len(ads), ads[0].Q.shape[1]
        s = signed_energy((c_hat @ torch.cat([ad.Q for ad in ads], 1)).unflatten(-1, (n, q)), ads[0].q_neg)  # (B, T, n)
        gamma, tau = torch.stack([ad.gamma for ad in ads]), torch.stack([ad.tau for ad in ads])  # (n,)
        g = torch.sigmoid(gamma * (s - tau))  # (B, T, n)
        gated = torch.tensor([ad.gated for ad in ads], device=c.device)
        g = torch.where(gated, g, torch.ones_like(g))
        carry = torch.tensor([ad.carry and ad.gated for ad in ads], device=c.device)
        return torch.where(carry, g.cummax(dim=-2).values, g) if bool(carry.any()) else g

    def codes(self, c: torch.Tensor) -> torch.Tensor:
        """The gated codes ``g_k(c) A_k c`` of every concept for c (B, T, d) -> (B, T, Σr) float32 (the stacked A
        (Σr, d), each gate repeated over its concept's rank). A and the gates do not depend on the layer, so within
        one UNet call (between :func:`inject`'s hooks) they are computed once for the text states every attn2
        projection receives, not once per projection."""
        call = self._call
        version = None if c.is_inference() else c._version  # inference tensors cannot change in place
        if call is not None and call.get("c") is c and call.get("version") == version:
            return call["z"]
        ads = list(self.concepts.values())
        c32 = c.float()
        ranks = torch.tensor([ad.A.shape[0] for ad in ads], device=c.device)
        z = (c32 @ torch.cat([ad.A for ad in ads]).T) * self.gates(c32).repeat_interleave(ranks, dim=-1)
        if call is not None:
            call.update(c=c, version=version, z=z)
        return z

    def delta(self, key: str, c: torch.Tensor) -> torch.Tensor:
        """``Σ_k g_k(c) B_k A_k c`` for c (B, T, d) -> (B, T, o) in float32, every concept in one product over
        the stacked B (o, Σr) and the shared :meth:`codes`."""
        return self.codes(c) @ torch.cat([ad.B[key] for ad in self.concepts.values()], 1).T  # (B, T, o)

    def _open_call(self, *_args) -> None:  # UNet forward pre-hook
        self._call = {}

    def _close_call(self, *_args) -> None:  # UNet forward hook (always called): nothing outlives the call
        self._call = None

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Adapters off: every wrapped layer returns ``base_layer(x)`` exactly."""
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev


class GatedLoRALinear(nn.Module):
    """Wraps a bias-free ``nn.Linear`` of cross-attention; holds the bank by reference only."""

    def __init__(self, base_layer: nn.Linear, bank: AdapterBank, key: str):
        super().__init__()
        self.base_layer = base_layer
        self.key = key
        object.__setattr__(self, "_bank", bank)  # not a submodule: the bank is saved on its own

    @property
    def bank(self) -> AdapterBank:
        return self._bank

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, d)
        y = self.base_layer(x)  # (B, T, o)
        if not self._bank.enabled or len(self._bank.concepts) == 0:
            return y
        return y + self._bank.delta(self.key, x).to(y.dtype)


DEFAULT_TARGETS = ("to_k", "to_v")


def find_targets(unet: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS) -> dict[str, nn.Linear]:
    """Cross-attention projections fed by text tokens: ``*.attn2.<target>`` (name -> Linear)."""
    targets = tuple(targets)
    bad = sorted(set(targets) - set(DEFAULT_TARGETS))
    if bad:
        raise ValueError(f"adapter targets {bad} are not applied to text tokens; valid: {list(DEFAULT_TARGETS)}")
    found = {}
    for name, mod in unet.named_modules():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] == "attn2" and parts[-1] in targets:
            if isinstance(mod, GatedLoRALinear):
                raise RuntimeError("the UNet already carries an ACE adapter; remove it first")
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"{name} is {type(mod).__name__}, expected nn.Linear")
            found[name] = mod
    if not found:
        raise ValueError("no cross-attention projections (attn2.to_k / attn2.to_v) found in the UNet")
    return found


def inject(unet: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS) -> AdapterBank:
    """Wrap every target projection of ``unet``; returns an empty bank (identity until concepts are added)."""
    found = find_targets(unet, targets)
    d = {m.in_features for m in found.values()}
    if len(d) != 1:
        raise ValueError(f"target projections disagree on the text dimension: {sorted(d)}")
    bank = AdapterBank(d.pop(), {layer_key(n): m.out_features for n, m in found.items()})
    for name, mod in found.items():
        unet.set_submodule(name, GatedLoRALinear(mod, bank, layer_key(name)))
    unet._ace_bank = bank  # so remove() and apply/remove on pipelines can find it
    unet._ace_hooks = (unet.register_forward_pre_hook(bank._open_call),
                       unet.register_forward_hook(bank._close_call, always_call=True))
    return bank


def remove(unet: nn.Module) -> None:
    """Put every original projection back (outputs then equal the untouched model bit-for-bit)."""
    for name, mod in list(unet.named_modules()):
        if isinstance(mod, GatedLoRALinear):
            unet.set_submodule(name, mod.base_layer)
    if hasattr(unet, "_ace_bank"):
        del unet._ace_bank
    for h in getattr(unet, "_ace_hooks", ()):
        h.remove()
    if hasattr(unet, "_ace_hooks"):
        del unet._ace_hooks


def bank_of(unet: nn.Module) -> AdapterBank | None:
    return getattr(unet, "_ace_bank", None)


def base_weights(unet: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS) -> dict[str, torch.Tensor]:
    """The frozen projection weights (layer key -> W (o, d)), wrapped or not."""
    out = {}
    for name, mod in unet.named_modules():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] == "attn2" and parts[-1] in tuple(targets):
            lin = mod.base_layer if isinstance(mod, GatedLoRALinear) else mod
            out[layer_key(name)] = lin.weight.detach()
    return out

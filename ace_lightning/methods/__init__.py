"""Erasure methods, one module each, selected by ``method=<name>`` through the registry (kind ``method``).

A method turns (components, config, data module) into a Lightning system plus its callbacks, and writes the
trained result as an adapter file that ``apply_adapter`` / ``remove_adapter`` handle:

| name | module | what trains | file holds |
|---|---|---|---|
| ``ace``, its robust variant ``ace_adv_gate`` (gates refitted on the inner attack's tokens), ``ace_many`` (many concepts: name-like gate negatives, steps scaled with n), ``ace_names`` (``ace_many`` with name-like preserve prompts), ``ace_looks`` (``ace_names`` with preserve prompts of the nearest words), ``ace_siblings`` (``ace_looks`` with the other erased concepts as gate negatives) and its ablations (``ace_ungated``, ``ace_no_closed_form``, ``ace_closed_form_only``, ``ace_no_adv``, ``ace_eta0``) | ``ace.py`` | gated low-rank factors (closed form + fine-tuning) | low-rank gated factors |
| ``uce`` | ``ace.py`` | nothing: the closed form at full rank, ungated | low-rank factors of the exact dense edit |
| ``esd_x`` / ``esd_u`` | ``esd.py`` | cross-attention / non-cross-attention UNet weights (ESD loss) | dense deltas |
| ``advunlearn`` | ``advunlearn.py`` | text-encoder layers, adversarially (attack step + ESD loss + retention) | dense deltas |
| ``mace`` | ``mace.py`` | closed-form refinement of attn2 keys/values, a LoRA per concept on the keys (attention loss in the concept's region), closed-form fusion | dense deltas |

Each name's settings are a recipe, ``experiments/methods/<name>.yaml``, merged over ``base.yaml`` before any
``experiment=`` recipe and the command line; the shared math stays in ``ace_lightning/method/``.
"""

from __future__ import annotations

from typing import Any, Protocol


class Method(Protocol):
    """What ``train.run`` needs from a method."""

    def build(self, components, cfg, datamodule) -> tuple[Any, list]:
        """(LightningModule, extra callbacks)."""

    def save(self, path, system, requests, components, fingerprint: str, cfg, config_yaml: str) -> None:
        """Write the adapter file."""

    def run_metrics(self, system, datamodule) -> dict[str, float]:
        """Method-specific numbers for metrics.json (e.g. gate false-fire rates)."""

    def stats(self) -> dict:
        """Method-specific statistics (closed-form energies, ...) for metrics.json."""

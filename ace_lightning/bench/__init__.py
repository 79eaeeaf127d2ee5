"""Benchmarks (spec §8): suites as data, generation + scoring as Lightning systems, torchmetrics metric sets.

Importing this package registers the scorers (kind ``scorer``), metric sets (``bench_metric``) and prompt
sources (``prompt_source``, ``class_source``). Entry point: ``python -m ace_lightning.bench.run suite=<name>``.
"""
from ace_lightning.bench import metrics, scorers, suites  # noqa: F401  (registration)
from ace_lightning.bench.suites import PromptRow, Selection, Suite, load_suite, suite_names

__all__ = ["PromptRow", "Selection", "Suite", "load_suite", "suite_names"]

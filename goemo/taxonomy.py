"""GoEmotions' 28 label names, and coarser label sets over them: Ekman's six emotions or three sentiments, plus neutral.

The groups are the official mappings of the release (`ekman_mapping.json`, `sentiment_mapping.json`),
copied here (tests check them against the shipped files). A row's labels in a coarse taxonomy
are the union of the groups of its fine labels; `neutral` maps to `neutral`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from goemo.errors import GoemoError

Taxonomy = Literal["original", "ekman", "sentiment"]

# The 28 labels of the "simplified" release, in id order (= labels.txt = the Hub's ClassLabel names).
GOEMOTIONS_LABELS = [
    "admiration", "amusement", "anger", "annoyance", "approval", "caring", "confusion",
    "curiosity", "desire", "disappointment", "disapproval", "disgust", "embarrassment",
    "excitement", "fear", "gratitude", "grief", "joy", "love", "nervousness", "optimism",
    "pride", "realization", "relief", "remorse", "sadness", "surprise", "neutral",
]  # fmt: skip

# Official ekman_mapping.json, in its order; `neutral` is added last (as it is last among the 28 labels).
EKMAN_MAPPING: dict[str, list[str]] = {
    "anger": ["anger", "annoyance", "disapproval"],
    "disgust": ["disgust"],
    "fear": ["fear", "nervousness"],
    "joy": ["joy", "amusement", "approval", "excitement", "gratitude", "love", "optimism", "relief", "pride",
            "admiration", "desire", "caring"],
    "sadness": ["sadness", "disappointment", "embarrassment", "grief", "remorse"],
    "surprise": ["surprise", "realization", "confusion", "curiosity"],
}  # fmt: skip

# Official sentiment_mapping.json, in its order; `neutral` is added last.
SENTIMENT_MAPPING: dict[str, list[str]] = {
    "positive": ["amusement", "excitement", "joy", "love", "desire", "optimism", "caring", "pride", "admiration",
                 "gratitude", "relief", "approval"],
    "negative": ["fear", "nervousness", "remorse", "embarrassment", "disappointment", "sadness", "grief", "disgust",
                 "anger", "annoyance", "disapproval"],
    "ambiguous": ["realization", "surprise", "curiosity", "confusion"],
}  # fmt: skip

NEUTRAL = "neutral"
MAPPINGS = {"ekman": EKMAN_MAPPING, "sentiment": SENTIMENT_MAPPING}


def taxonomy_labels(taxonomy: str, source: list[str]) -> list[str]:
    """Label names of `taxonomy`, in id order; `original` keeps the `source` labels as they are."""
    if taxonomy == "original":
        return list(source)
    if taxonomy not in MAPPINGS:
        raise GoemoError(f"data.taxonomy {taxonomy!r}: unknown; use original, ekman or sentiment")
    return [*MAPPINGS[taxonomy], NEUTRAL]


def taxonomy_matrix(taxonomy: str, source: list[str]) -> np.ndarray:
    """(S, K) 0/1 matrix: entry [i, k] is 1 when source label i belongs to group k.

    A multi-hot row (S,) maps to `(row @ M) > 0` (K,), the union of its labels' groups.
    Raises GoemoError when `source` is not GoEmotions' 28 labels, which the mappings are written for.
    """
    groups = taxonomy_labels(taxonomy, source)
    if taxonomy == "original":
        return np.eye(len(source), dtype=np.float32)
    if list(source) != GOEMOTIONS_LABELS:
        raise GoemoError(
            f"data.taxonomy {taxonomy!r} maps GoEmotions' 28 labels, but the data has {len(source)} others "
            f"({', '.join(source[:3])}, ...); use data.taxonomy original with this data"
        )
    m = np.zeros((len(source), len(groups)), dtype=np.float32)
    m[source.index(NEUTRAL), groups.index(NEUTRAL)] = 1.0
    for k, group in enumerate(groups[:-1]):
        for name in MAPPINGS[taxonomy][group]:
            m[source.index(name), k] = 1.0
    return m

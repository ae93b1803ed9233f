import json

import numpy as np
import pytest

from goemo.data import GoEmotionsDataModule, read_split
from goemo.taxonomy import GOEMOTIONS_LABELS
from goemo.errors import GoemoError
from goemo.taxonomy import EKMAN_MAPPING, SENTIMENT_MAPPING, taxonomy_labels, taxonomy_matrix

EKMAN = ["anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral"]
SENTIMENT = ["positive", "negative", "ambiguous", "neutral"]


@pytest.mark.parametrize("name,mapping", [("ekman", EKMAN_MAPPING), ("sentiment", SENTIMENT_MAPPING)])
def test_mappings_are_the_official_ones(goemotions, name, mapping):
    official = json.loads((goemotions / f"{name}_mapping.json").read_text())
    assert mapping == official  # same groups, same members, same order
    # every fine label except neutral lies in exactly one group
    members = [m for group in mapping.values() for m in group]
    assert sorted(members) == sorted(set(GOEMOTIONS_LABELS) - {"neutral"})


def test_label_names_and_matrix():
    assert taxonomy_labels("ekman", GOEMOTIONS_LABELS) == EKMAN
    assert taxonomy_labels("sentiment", GOEMOTIONS_LABELS) == SENTIMENT
    assert taxonomy_labels("original", ["a", "b"]) == ["a", "b"]
    m = taxonomy_matrix("ekman", GOEMOTIONS_LABELS)
    assert m.shape == (28, 7) and (m.sum(1) == 1).all()
    assert m[GOEMOTIONS_LABELS.index("neutral")].tolist() == [0, 0, 0, 0, 0, 0, 1]
    assert m[GOEMOTIONS_LABELS.index("nervousness")].argmax() == EKMAN.index("fear")
    s = taxonomy_matrix("sentiment", GOEMOTIONS_LABELS)
    assert s.shape == (28, 4) and s[GOEMOTIONS_LABELS.index("curiosity")].argmax() == SENTIMENT.index("ambiguous")
    assert (taxonomy_matrix("original", GOEMOTIONS_LABELS) == np.eye(28)).all()


# Rows of the real dev.tsv (1-based line) -> their groups, mapped by hand from the official JSON files.
DEV_ROWS = {
    1: ([27], {"neutral"}, {"neutral"}),  # neutral
    2: ([4, 27], {"joy", "neutral"}, {"positive", "neutral"}),  # approval, neutral
    3: ([25], {"sadness"}, {"negative"}),  # sadness
    12: ([12, 22], {"sadness", "surprise"}, {"negative", "ambiguous"}),  # embarrassment, realization
    15: ([1, 3, 25], {"joy", "anger", "sadness"}, {"positive", "negative"}),  # amusement, annoyance, sadness
    16: ([2, 3], {"anger"}, {"negative"}),  # anger, annoyance: one group
    57: ([1, 6, 7, 24], {"joy", "surprise", "sadness"}, {"positive", "ambiguous", "negative"}),
}


@pytest.mark.parametrize("taxonomy", ["ekman", "sentiment"])
def test_real_dev_rows_map_by_hand(goemotions, tiny_model, taxonomy):
    dm = GoEmotionsDataModule(data_dir=str(goemotions), tokenizer_name=str(tiny_model), taxonomy=taxonomy)
    names = EKMAN if taxonomy == "ekman" else SENTIMENT
    assert dm.label_names == names and dm.num_labels == len(names)
    cols = read_split(goemotions / "dev.tsv.gz", 28)
    lines = list(DEV_ROWS)
    batch = {"text": [cols["text"][i - 1] for i in lines], "labels": [cols["labels"][i - 1] for i in lines]}
    assert batch["labels"] == [DEV_ROWS[i][0] for i in lines]  # the rows are the ones annotated above
    out = dm._encode(batch)
    for line, row in zip(lines, out["labels"]):
        expected = DEV_ROWS[line][1 if taxonomy == "ekman" else 2]
        assert {names[k] for k in np.flatnonzero(row)} == expected, line


def test_original_keeps_28_labels(goemotions, tiny_model):
    dm = GoEmotionsDataModule(data_dir=str(goemotions), tokenizer_name=str(tiny_model))
    assert dm.label_names == GOEMOTIONS_LABELS
    out = dm._encode({"text": ["a", "b"], "labels": [[27], [1, 3, 25]]})
    assert np.flatnonzero(out["labels"][1]).tolist() == [1, 3, 25]


def test_cache_key_includes_taxonomy(goemotions, tiny_model):
    dm = GoEmotionsDataModule(data_dir=str(goemotions), tokenizer_name=str(tiny_model))
    raw = dm._raw_splits()["validation"]  # the same rows for every taxonomy
    keys = {
        t: GoEmotionsDataModule(data_dir=str(goemotions), tokenizer_name=str(tiny_model), taxonomy=t)._fingerprint("validation", raw)
        for t in ("original", "ekman", "sentiment")
    }
    assert len(set(keys.values())) == 3


def test_coarse_taxonomy_needs_goemotions_labels(tiny_data):
    with pytest.raises(GoemoError, match=r"data\.taxonomy 'ekman' maps GoEmotions' 28 labels, but the data has 4"):
        GoEmotionsDataModule(data_dir=str(tiny_data), taxonomy="ekman")
    assert GoEmotionsDataModule(data_dir=str(tiny_data), taxonomy="original").num_labels == 4
    # 28 labels that are not GoEmotions' (or not in its order) are refused too, not mapped by position
    for other in ([f"label{i}" for i in range(28)], GOEMOTIONS_LABELS[::-1]):
        with pytest.raises(GoemoError, match=r"maps GoEmotions' 28 labels, but the data has 28 others"):
            taxonomy_matrix("sentiment", other)


def test_an_unknown_taxonomy_from_python_is_one_line():
    """The CLI's type refuses it first; the Python API (GoEmotionsDataModule(taxonomy=...)) got a KeyError."""
    for f in (taxonomy_labels, taxonomy_matrix):
        with pytest.raises(GoemoError, match="^data.taxonomy 'plutchik': unknown; use original, ekman or sentiment$"):
            f("plutchik", GOEMOTIONS_LABELS)

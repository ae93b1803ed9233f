"""The GoEmotions release shipped inside goemo, the default data source, and the Hub code path on a local folder."""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import datasets.config
import pytest
import yaml

from goemo.data import EMBEDDED, SPLITS, GoEmotionsDataModule, read_split, release_file, resolve_data_dir
from goemo.taxonomy import GOEMOTIONS_LABELS
from goemo.errors import GoemoError
from tests.conftest import run_main

# sha256 of the official release's files (the reference copy kept beside the development checkout), taken when packaged:
# the embedded files must decompress to exactly these bytes.
OFFICIAL_SHA256 = {
    "train.tsv": "1c254a142be5c00e80d819b9ae1bbd36d94b2eeb8f4b1271846508d57e57d9c5",
    "dev.tsv": "575489c079c9de1097062a01738f998590d6b7ead66dd1c9fd1d2ba01fd8bc62",
    "test.tsv": "0587b2dd8b27b97352adbfc3fb083d46005c8946657fdc2b1ca8b1cc7f1f8be4",
    "labels.txt": "45c3ef86782d2a4d7fedcd6d8c111aa0d0e94720689bd164fac94fefb4495a89",
    "ekman_mapping.json": "cc56723c63e45b721cbfb9ec90206bc3a7f972be90cf81815b4f9e446cfa2d51",
    "sentiment_mapping.json": "cc0501002926c2e28f183398c668c252a29f54d5c1a78142d8794d630f410674",
}


@pytest.mark.parametrize("name", OFFICIAL_SHA256)
def test_embedded_files_are_the_release_byte_for_byte(goemotions, name):
    path = release_file(goemotions, name)
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == OFFICIAL_SHA256[name]


def test_embedded_copy_carries_its_licence_and_credit(goemotions):
    card = (goemotions / "README.md").read_text(encoding="utf-8")
    assert "Demszky" in card and "ACL 2020" in card and "Apache" in card
    assert "Apache License" in (goemotions / "LICENSE").read_text(encoding="utf-8")
    assert not list(goemotions.glob("*.tsv"))  # the splits ship compressed


def test_default_data_dir_is_the_embedded_release():
    dm = GoEmotionsDataModule(tokenizer_name="unused")
    assert dm.hparams.data_dir == EMBEDDED == "pkg:goemo/goemotions"
    assert dm.data_dir == resolve_data_dir(EMBEDDED) and dm.label_names == GOEMOTIONS_LABELS
    sizes = {split: len(ds) for split, ds in dm._raw_splits().items()}
    assert sizes == {"train": 43410, "validation": 5426, "test": 5427}


def test_gzipped_split_that_is_cut_short_is_one_line(tmp_path, goemotions):
    (tmp_path / "dev.tsv.gz").write_bytes((goemotions / "dev.tsv.gz").read_bytes()[:1000])
    with pytest.raises(GoemoError, match=r"dev\.tsv\.gz: cannot read it"):
        read_split(release_file(tmp_path, "dev.tsv"), 28)


def test_unknown_package_data_dir_is_one_line():
    with pytest.raises(GoemoError, match="data_dir 'pkg:no_such_pkg/x': Python package 'no_such_pkg' is not installed"):
        GoEmotionsDataModule(data_dir="pkg:no_such_pkg/x")


# -- a folder laid out like the Hub repository google-research-datasets/go_emotions ------------------------------
def write_hub_folder(out: Path, rows: int, names: list[str] = GOEMOTIONS_LABELS) -> Path:
    """`simplified/{train,validation,test}-00000-of-00001.parquet` and a README whose YAML header declares the
    `simplified` config and its features, as on the Hub; the first `rows` rows of each embedded split."""
    import datasets
    from datasets import ClassLabel, Features, Sequence, Value

    features = Features({"text": Value("string"), "labels": Sequence(ClassLabel(names=names)), "id": Value("string")})
    (out / "simplified").mkdir(parents=True)
    for file, hub in SPLITS.values():
        cols = read_split(release_file(resolve_data_dir(EMBEDDED), file), 28)
        cols = {k: v[:rows] for k, v in cols.items()}
        datasets.Dataset.from_dict(cols, features=features).to_parquet(str(out / "simplified" / f"{hub}-00000-of-00001.parquet"))
    card = {
        "dataset_info": [{"config_name": "simplified", "features": [
            {"name": "text", "dtype": "string"},
            {"name": "labels", "sequence": {"class_label": {"names": {str(i): n for i, n in enumerate(names)}}}},
            {"name": "id", "dtype": "string"},
        ]}],
        "configs": [{"config_name": "simplified", "data_files": [
            {"split": hub, "path": f"simplified/{hub}-*"} for _, hub in SPLITS.values()
        ]}],
    }  # fmt: skip
    (out / "README.md").write_text(f"---\n{yaml.safe_dump(card, sort_keys=False)}---\n# go_emotions (local copy)\n")
    return out


def test_hub_folder_loads_the_same_rows_as_the_release(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # read once, when datasets is imported
    hub = write_hub_folder(tmp_path / "go_emotions", rows=50)
    raw = GoEmotionsDataModule(data_dir=None, hub_dataset=str(hub), tokenizer_name="unused")._raw_splits()
    for split, (file, _) in SPLITS.items():
        cols = {k: v[:50] for k, v in read_split(release_file(resolve_data_dir(EMBEDDED), file), 28).items()}
        assert raw[split].to_dict() == cols


def test_a_hub_folder_given_as_data_dir_says_how_to_load_it(tmp_path):
    hub = write_hub_folder(tmp_path / "go_emotions", rows=5)
    with pytest.raises(GoemoError, match=f"^{re.escape(str(hub))} is laid out like a Hub dataset .*: load it with "
                                         f"--data.data_dir null --data.hub_dataset {re.escape(str(hub))}$"):  # fmt: skip
        GoEmotionsDataModule(data_dir=str(hub), tokenizer_name="unused")


def test_hub_folder_with_other_label_names_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # read once, when datasets is imported
    hub = write_hub_folder(tmp_path / "other", rows=10, names=[f"l{i}" for i in range(28)])
    dm = GoEmotionsDataModule(data_dir=None, hub_dataset=str(hub), tokenizer_name="unused")
    with pytest.raises(GoemoError, match=r"its labels \['l0', 'l1', 'l2'\]\.\.\. differ from GoEmotions' 28 labels"):
        dm._raw_splits()


def test_hub_folder_with_a_label_id_of_minus_one_is_one_line(tmp_path, monkeypatch):
    """-1 is `datasets`' "no label": numpy's indexing read it as the last label (neutral), silently."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # read once, when datasets is imported
    hub = write_hub_folder(tmp_path / "go_emotions", rows=10)
    path = hub / "simplified" / "validation-00000-of-00001.parquet"
    table = pq.read_table(path).to_pydict()
    table["labels"][3] = [-1]
    pq.write_table(pa.Table.from_pydict(table, schema=pq.read_schema(path)), path)
    dm = GoEmotionsDataModule(data_dir=None, hub_dataset=str(hub), tokenizer_name="unused")
    with pytest.raises(GoemoError, match=r"^dataset '.*go_emotions': its validation split has label id -1, outside its labels \(ids 0\.\.27\)$"):
        dm._raw_splits()


@pytest.mark.parametrize(
    "columns,message",
    [
        ({"comment": ["a"], "labels": [[0]]}, "its train split has no 'text' column (it has comment, labels)"),
        ({"text": [], "labels": []}, "its train split is empty"),
        ({"text": ["a", "b"], "labels": [[0], []]}, "its train split has rows without label ids"),
        ({"text": ["a"], "labels": [[3, 28]]}, "its train split has label id 28, outside its labels (ids 0..27)"),
        ({"text": ["a", "b", "c"], "labels": [[1], None, [3]]}, "its train split has rows without label ids"),  # was every label
        ({"text": ["a", "b"], "labels": [[1], [2, None]]}, "its train split has a null label id"),
        ({"text": ["a", None], "labels": [[1], [2]]}, "its train split has rows without a text (null)"),
    ],
)  # fmt: skip
def test_hub_splits_are_checked_like_release_files(columns, message):
    import datasets

    from goemo.data import check_hub_split

    ds = datasets.Dataset.from_dict(columns, features=None if columns["labels"] else datasets.Features(
        {"text": datasets.Value("string"), "labels": datasets.Sequence(datasets.Value("int64"))}))  # fmt: skip
    with pytest.raises(GoemoError, match="^dataset 'x': " + re.escape(message)):
        check_hub_split("x", "train", ds, 28)
    check_hub_split("x", "train", datasets.Dataset.from_dict({"text": ["a"], "labels": [[0, 27]]}), 28)  # fine


def test_an_empty_data_dir_is_refused():
    """An empty data_dir (an unset shell variable: --data.data_dir "$DATA") loaded the Hub."""
    with pytest.raises(GoemoError, match="^data.data_dir is empty; give a folder"):
        GoEmotionsDataModule(data_dir="", tokenizer_name="unused")
    assert GoEmotionsDataModule(data_dir=None, hub_dataset="my/copy", tokenizer_name="unused").data_dir is None


@pytest.mark.slow
def test_fit_and_test_from_a_hub_folder(tmp_path, tiny_model):
    """The Hub user's flag (`--data.hub_dataset ID_OR_PATH`, with `--data.data_dir null`) end to end, offline."""
    hub = write_hub_folder(tmp_path / "go_emotions", rows=64)
    env = {"HF_HOME": str(tmp_path / "hf")}
    common = ("--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false")
    r = run_main("fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", "null",
                 "--data.hub_dataset", str(hub), "--trainer.max_epochs", "1", *common, cwd=tmp_path, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    config = yaml.safe_load((tmp_path / "lightning_logs/version_0/config.yaml").read_text())
    assert config["data"]["data_dir"] is None and config["data"]["hub_dataset"] == str(hub)
    r = run_main("test", "--ckpt_path", "best", *common, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test/f1_macro_tuned" in r.stdout


@pytest.mark.slow
def test_fit_with_no_data_flag_trains_on_the_embedded_release(tmp_path, tiny_model):
    r = run_main("fit", "--model.model_name_or_path", str(tiny_model), "--data.cache_dir", str(tmp_path / "cache"),
                 "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
                 "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    config = yaml.safe_load((tmp_path / "lightning_logs/version_0/config.yaml").read_text())
    assert config["data"]["data_dir"] == "pkg:goemo/goemotions"  # the run's config names its data
    import torch

    (ckpt,) = (tmp_path / "lightning_logs/version_0/checkpoints").glob("epoch*.ckpt")
    assert torch.load(ckpt, weights_only=True)["state_dict"]["head.weight"].shape[0] == 28  # GoEmotions' labels


def test_hub_folders_loaded_in_memory_do_not_share_a_cache_entry(tmp_path, tiny_model, monkeypatch):
    """Loaded in memory (HF_DATASETS_IN_MEMORY_MAX_SIZE), a Hub-layout folder has no cache files and `datasets`'
    fingerprint does not follow its rows: another folder's tokenized rows were reused, silently."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # read once, when datasets is imported
    monkeypatch.setattr(datasets.config, "IN_MEMORY_MAX_SIZE", 10**9)
    sizes = []
    for where, rows in (("a", 10), ("b", 30)):
        hub = write_hub_folder(tmp_path / where / "go_emotions", rows=rows)
        dm = GoEmotionsDataModule(data_dir=None, hub_dataset=str(hub), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"))
        dm.setup("fit")
        sizes.append(len(dm.datasets["train"]))
    assert sizes == [10, 30]


def test_a_hub_folder_under_a_dot_cache_folder_is_read_anew_when_it_changes(tmp_path, monkeypatch):
    """The folder's digest skipped every file whose absolute path had a `.cache` part: under ~/.cache, all of them."""
    import shutil

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # read once, when datasets is imported
    hub = tmp_path / ".cache" / "go_emotions"
    sizes = []
    for rows in (10, 30):
        shutil.rmtree(hub, ignore_errors=True)
        write_hub_folder(hub, rows=rows)
        sizes.append(len(GoEmotionsDataModule(data_dir=None, hub_dataset=str(hub), tokenizer_name="unused")._raw_splits()["train"]))
    assert sizes == [10, 30]

"""GoEmotions as a LightningDataModule: read, validate, tokenize (cached), pad per batch.

Rows become `{"input_ids": (T,), "attention_mask": (T,), "labels": (L,) multi-hot}`; the
collator pads a batch to its longest row, so batches are `(B, T_max)` and labels `(B, L)` float32.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import re
import zlib
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from goemo.errors import GoemoError
from goemo.files import check_writable
from goemo.hub import folder_digest, hub_reachable, load_error, load_tokenizer, note_tokenizer_change, package_path
from goemo.hub import resolve_model_path, tokenizer_digest, unreachable
from goemo.batching import LengthGroupedBatchSampler, MultiLabelCollator, ResumableDataLoader
from goemo.taxonomy import GOEMOTIONS_LABELS, Taxonomy, taxonomy_labels, taxonomy_matrix


# Split names used here -> (file in the official release, split on the Hub).
SPLITS = {"train": ("train.tsv", "train"), "validation": ("dev.tsv", "validation"), "test": ("test.tsv", "test")}
FIELD_SIZE_LIMIT = 2**31 - 1  # the largest the csv module takes: a text may be as long as the file
# The official release shipped inside goemo (goemo/goemotions/: the TSV files gzipped, byte for byte): the default.
EMBEDDED = "pkg:goemo/goemotions"


def resolve_data_dir(data_dir: str) -> Path:
    """The folder a `data_dir` value names: `pkg:MODULE/SUBDIR` (the embedded copy) or a path."""
    path = package_path(data_dir, "data_dir") if data_dir.startswith("pkg:") else Path(data_dir).expanduser()
    if not path.is_dir():
        raise GoemoError(f"data_dir {data_dir!r}: no such folder (it should hold the official GoEmotions TSV files)")
    return path


def release_file(folder: Path, name: str) -> Path:
    """`folder/name`, or its gzipped copy `folder/name.gz` when only that exists (the embedded release)."""
    path = folder / name
    gz = path.with_name(path.name + ".gz")
    return gz if not path.exists() and gz.is_file() else path
CACHE_VERSION = "2"  # bump when the encoding below changes, to invalidate old caches


def read_labels(path: Path) -> list[str]:
    """Label names from `labels.txt`, one a line; line i is label id i."""
    if not path.is_file():
        folder = path.parent
        if any(folder.glob("*/*.parquet")) or any(folder.glob("*.parquet")):  # a dataset laid out like its Hub repository
            raise GoemoError(f"{folder} is laid out like a Hub dataset (parquet files), not the release's TSV splits: load it "
                             f"with --data.data_dir null --data.hub_dataset {folder}")  # fmt: skip
        raise GoemoError(f"{path}: label file not found (expected labels.txt beside the TSV splits)")
    names = [line.strip() for line in read_release_text(path).splitlines()]
    while names and not names[-1]:
        names.pop()
    seen: dict[str, int] = {}
    for i, name in enumerate(names, 1):
        if not name:
            raise GoemoError(f"{path}:{i}: empty label name")
        if name in seen:
            raise GoemoError(f"{path}:{i}: duplicate label name {name!r} (also on line {seen[name]})")
        seen[name] = i
    if not names:
        raise GoemoError(f"{path}: no label names")
    return names


def read_split(path: Path, num_labels: int) -> dict[str, list]:
    """Parse one official TSV split: `text<TAB>ids,comma-separated<TAB>comment id`, CSV-quoted in places.

    Returns columns {"text": [...], "labels": [[id, ...], ...], "id": [...]}; any bad row raises
    a GoemoError naming the file and line.
    """
    if not path.is_file():
        raise GoemoError(f"{path}: split file not found (a data_dir holds train.tsv, dev.tsv, test.tsv, labels.txt)")
    cols: dict[str, list] = {"text": [], "labels": [], "id": []}
    csv.field_size_limit(FIELD_SIZE_LIMIT)  # texts of any length (the csv module's default stops at 128 KiB)
    # strict: a quote inside a field ('"Hi" there') or an unclosed one is an error, not a quote silently dropped
    # or lines silently joined into one row (the official splits read the same either way)
    reader = csv.reader(io.StringIO(read_release_text(path), newline=""), delimiter="\t", strict=True)
    start = 1  # line where the current row starts (a quoted text may span lines)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # e.g. a field over the csv module's size limit after an unclosed quote
            raise GoemoError(f"{path}:{start}: unreadable row ({e}); an unclosed double quote takes in the lines after it") from None
        where = f"{path}:{start}"
        start = reader.line_num + 1
        if not row:  # a blank line (a trailing one is common): no row
            continue
        if len(row) != 3:
            hint = "; an unclosed double quote takes in the lines after it" if len(row) < 3 and "\n" in row[0] else ""
            raise GoemoError(f"{where}: expected 3 tab-separated columns (text, label ids, id), found {len(row)}{hint}")
        text, ids, cid = row
        parts = [x.strip() for x in ids.split(",")]
        if not all(re.fullmatch("-?[0-9]+", x) for x in parts):  # int() alone also takes "2_0" and "٣"
            raise GoemoError(f"{where}: label ids must be comma-separated integers, got {ids!r}")
        labels = [int(x) for x in parts]
        bad = [x for x in labels if not 0 <= x < num_labels]
        if bad:
            raise GoemoError(f"{where}: label id {bad[0]} is outside labels.txt (ids 0..{num_labels - 1})")
        cols["text"].append(text)
        cols["labels"].append(labels)
        cols["id"].append(cid)
    if not cols["text"]:
        raise GoemoError(f"{path}: the split is empty")
    return cols


def read_release_text(path: Path) -> str:
    """The file's text: UTF-8, gunzipped when its name ends in .gz; any failure is one GoemoError line."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # unreadable, or a .gz that is not gzip or is cut short
        raise GoemoError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not part of the first row
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise GoemoError(f"{path}:{line}: not valid UTF-8 (byte {data[e.start]:#04x}); save the file as UTF-8") from None


def check_hub_split(name: str, split: str, ds, num_labels: int) -> None:
    """What `read_split` checks of a release file, for a split loaded with `datasets`: its columns, that it has
    rows, and that every row has label ids within the label set (numpy would read an id of -1, `datasets`'
    "no label", as the last label)."""
    import pyarrow.compute as pc

    missing = [c for c in ("text", "labels") if c not in ds.column_names]
    if missing:
        raise GoemoError(f"dataset {name!r}: its {split} split has no {missing[0]!r} column (it has {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise GoemoError(f"dataset {name!r}: its {split} split is empty")
    if ds.data.column("text").null_count:
        raise GoemoError(f"dataset {name!r}: its {split} split has rows without a text (null)")
    labels = ds.data.column("labels")  # (rows,) lists of ids
    if labels.null_count or pc.min(pc.list_value_length(labels)).as_py() == 0:  # numpy reads a null row as every label
        raise GoemoError(f"dataset {name!r}: its {split} split has rows without label ids (GoEmotions gives each row one or more)")
    flat = pc.list_flatten(labels)
    if flat.null_count:
        raise GoemoError(f"dataset {name!r}: its {split} split has a null label id")
    ids = pc.min_max(flat).as_py()
    if ids["min"] < 0 or ids["max"] >= num_labels:
        bad = ids["min"] if ids["min"] < 0 else ids["max"]
        raise GoemoError(f"dataset {name!r}: its {split} split has label id {bad}, outside its labels (ids 0..{num_labels - 1})")


def rows_digest(raw) -> str:
    """sha256 of a raw split's rows (texts, label ids and comment ids, in order): the tokenized cache's key."""
    import pyarrow.compute as pc

    table, h = raw.with_format("arrow")[:], hashlib.sha256()  # the rows in order, column-wise (row by row: seconds)
    for column in ("text", "id"):  # the ids travel into the cache too
        if column in raw.column_names:
            values = table.column(column)
            h.update(f"{column}:{values.type}:".encode())  # an id 7 is not an id "7"
            values = pc.fill_null(values.cast("string"), "")
            # each value's length too: no two lists of texts join into the same string
            h.update(pc.binary_length(values).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
            h.update("".join(values.to_pylist()).encode("utf-8"))
    labels = table.column("labels")  # (rows,) lists of ids
    h.update(pc.list_value_length(labels).to_numpy().astype(np.int64).tobytes())
    h.update(pc.list_flatten(labels).to_numpy().astype(np.int64).tobytes())
    return h.hexdigest()


def fold_ids(n: int, num_folds: int, seed: int) -> np.ndarray:
    """(n,) int64: each training row's fold, a seeded random partition into `num_folds` folds of equal size (+-1)."""
    order = np.random.default_rng(seed).permutation(n)
    folds = np.empty(n, dtype=np.int64)
    folds[order] = np.arange(n) * num_folds // n  # the first n/k rows of the permutation are fold 0, ...
    return folds


def default_num_workers(on_cuda: bool) -> int:
    """DataLoader workers when `num_workers` is unset.

    Rows are tokenized once and a batch is a cheap pad, so on a CPU workers would only compete with the
    model's matmuls for cores: 0. On a GPU the host is otherwise idle: a few workers (up to 4, half the
    cores) prepare the next batches while the device computes.
    """
    if not on_cuda:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores // 2))


HUB_DATASET, HUB_CONFIG = "google-research-datasets/go_emotions", "simplified"  # GoEmotions on the Hugging Face Hub


class GoEmotionsDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_dir: Optional[str] = EMBEDDED,
        tokenizer_name: str = "bert-base-uncased",
        hub_dataset: str = HUB_DATASET,
        hub_config: str = HUB_CONFIG,
        max_length: int = 128,
        train_batch_size: int = 16,
        eval_batch_size: int = 32,
        group_by_length: bool = True,
        num_workers: Optional[int] = None,
        cache_dir: Optional[str] = None,
        predict_file: Optional[str] = None,
        taxonomy: Taxonomy = "original",
        holdout_fold: Optional[int] = None,
        num_folds: int = 2,
        fold_seed: int = 0,
    ) -> None:
        """GoEmotions, from a folder holding the official release or from the Hugging Face Hub.

        Args:
            data_dir: Folder with train.tsv, dev.tsv, test.tsv and labels.txt in the official release's format
                (each TSV may be gzipped, NAME.tsv.gz). Default `pkg:goemo/goemotions`: the official release shipped
                inside goemo. null: load `hub_dataset` with `datasets.load_dataset` instead.
            tokenizer_name: Tokenizer to encode with; linked from `model.model_name_or_path` by the CLI.
            hub_dataset: Used when `data_dir` is null: a Hugging Face Hub dataset id, or a local folder laid out
                like the Hub repository (`simplified/train-00000-of-00001.parquet`, ...; a README declaring it).
            hub_config: Hub dataset configuration.
            max_length: Truncate texts to this many tokens (GoEmotions' longest text is ~70 tokens).
            train_batch_size: Rows per training batch.
            eval_batch_size: Rows per validation/test/predict batch.
            group_by_length: Train on batches of similar-length rows (less padding, same rows per epoch);
                False: plain random batches as in the seed notebook. Evaluation is always sorted by length.
                Either way the order is fixed by the seed and epoch, and resumes mid-epoch where it stopped.
            num_workers: DataLoader worker processes (0 = load in the main process). Unset: 0 on a CPU,
                where workers would take cores from the model; a few (up to 4) when training on a GPU.
            cache_dir: Where tokenized splits are cached; default: the `datasets` cache folder.
            predict_file: Texts for `predict` (.txt one a line, .jsonl with a "text" field, .csv with a
                "text" column), streamed and written to predictions.jsonl. `main.py predict` needs it (`test`
                scores the test split); unset, `trainer.predict` in Python predicts the test split.
            taxonomy: Label set to train and evaluate on: `original` (the data's own labels, GoEmotions' 28),
                `ekman` (anger, disgust, fear, joy, sadness, surprise, neutral) or `sentiment` (positive,
                negative, ambiguous, neutral), by the release's official mappings; a row gets the union of
                its labels' groups. `ekman`/`sentiment` need GoEmotions' 28 labels.
            holdout_fold: Cross-fitting: train on the training rows outside this fold of `num_folds` (a random
                partition of the training split, fixed by `fold_seed`); validation and test stay whole. One run per
                fold, given to `python -m goemo.distill`, makes an out-of-fold teacher: each training row gets the
                probabilities of the run that never trained on it. Unset: train on every row.
            num_folds: How many folds `holdout_fold` counts (at least 2).
            fold_seed: Seed of the partition into folds; the runs of one teacher must share it.
        """
        super().__init__()
        self.save_hyperparameters()
        if max_length < 2:
            raise GoemoError(f"data.max_length must be at least 2, got {max_length}")
        if train_batch_size < 1 or eval_batch_size < 1:
            raise GoemoError(
                f"data.train_batch_size and data.eval_batch_size must be at least 1, got {train_batch_size} and {eval_batch_size}"
            )
        if num_workers is not None and num_workers < 0:
            raise GoemoError(f"data.num_workers must be >= 0 (0 = load in the main process), got {num_workers}")
        if num_folds < 2 or (holdout_fold is not None and not 0 <= holdout_fold < num_folds):
            raise GoemoError(f"data.holdout_fold must be within 0..{num_folds - 1} and data.num_folds at least 2, got {holdout_fold} and {num_folds}")
        if data_dir == "":
            raise GoemoError("data.data_dir is empty; give a folder, pkg:goemo/goemotions (the shipped release) or null (the Hub)")
        self.data_dir = resolve_data_dir(data_dir) if data_dir is not None else None
        # The labels of the files (or the Hub), and those after the taxonomy's mapping: the one source of
        # truth for the model, which gets them through a CLI link.
        self.source_labels = read_labels(release_file(self.data_dir, "labels.txt")) if self.data_dir else list(GOEMOTIONS_LABELS)
        self.label_map = taxonomy_matrix(taxonomy, self.source_labels)  # (S, L) 0/1
        self.label_names = taxonomy_labels(taxonomy, self.source_labels)
        self.datasets: dict = {}
        self._tokenizer = None
        self._training_digest: str | None = None  # `training_digest`, computed at the first checkpoint
        self._order = 2  # how the training batches' order is seeded (LengthGroupedBatchSampler.order); 1 for older fits

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(resolve_model_path(self.hparams.tokenizer_name))
            # Hash it now: calling it stores truncation settings in its JSON, which would change the hash.
            # truncation_side lives outside the backend's JSON (tokenizer_config.json) and changes the rows too.
            self._tokenizer_hash = tokenizer_digest(self._tokenizer)
        return self._tokenizer

    @property
    def tokenizer_hash(self) -> str:
        """`goemo.hub.tokenizer_digest` of the tokenizer as loaded (the cache key's, and saved in checkpoints)."""
        if self._tokenizer is None:
            self.tokenizer  # noqa: B018 (loads it and takes the digest)
        return self._tokenizer_hash

    # -- loading ---------------------------------------------------------------------------
    def _raw_splits(self) -> dict:
        """{"train"/"validation"/"test": datasets.Dataset with text, labels (ids), id}."""
        import datasets

        if self.data_dir is not None:
            return {
                split: datasets.Dataset.from_dict(read_split(release_file(self.data_dir, file), len(self.source_labels)))
                for split, (file, _) in SPLITS.items()
            }
        name, kwargs = self.hparams.hub_dataset, {}
        local = Path(name).expanduser().is_dir()  # a folder laid out like the Hub repository
        if local:
            name = str(Path(name).expanduser())
            # `datasets` caches a local folder's Arrow files under the folder's name alone (datasets 5.2): another
            # folder of that name, or this one with new files, would silently load the old rows. Key by content.
            kwargs["cache_dir"] = str(Path(datasets.config.HF_DATASETS_CACHE) / "goemo-local" / folder_digest(Path(name)))
        try:
            if not local and not hub_reachable():  # only the local cache; otherwise `datasets` retries for ~30 s
                datasets.config.HF_HUB_OFFLINE = True
            ds = datasets.load_dataset(name, self.hparams.hub_config, **kwargs)
        except Exception as e:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, ValueError, ...
            raise (load_error("dataset", name, e) if local else unreachable("dataset", name, e)) from None
        missing = [hub for _, hub in SPLITS.values() if hub not in ds]
        if missing:
            raise GoemoError(f"dataset {name!r}: no {missing[0]!r} split (it has {', '.join(ds)}); GoEmotions has train, validation, test")
        feature = ds["train"].features.get("labels")
        names = getattr(getattr(feature, "feature", None), "names", None)  # Sequence(ClassLabel(names=...))
        if names != self.source_labels:
            raise GoemoError(f"dataset {name!r}: its labels {(names or [])[:3]}... differ from GoEmotions' 28 labels")
        for _, hub in SPLITS.values():
            check_hub_split(name, hub, ds[hub], len(self.source_labels))
        return {split: ds[hub] for split, (_, hub) in SPLITS.items()}

    def _fingerprint(self, split: str, raw) -> str:
        """Cache key of a tokenized split: the raw data, the tokenizer and the encoding settings."""
        h = hashlib.sha256()
        # The rows themselves, as parsed: `datasets`' own `_fingerprint` is the same for other rows loaded in memory
        # under the same name, and a file re-read here could have changed since it was parsed.
        h.update(rows_digest(raw).encode())
        h.update("\n".join(self.label_names).encode())
        h.update(self.tokenizer_hash.encode())
        h.update(f"{self.hparams.max_length}|{CACHE_VERSION}|{self.hparams.taxonomy}".encode())
        return h.hexdigest()[:20]

    def targets(self, label_ids: list[list[int]]) -> np.ndarray:
        """Rows of source label ids -> (N, L) float32 multi-hot targets in this data module's taxonomy."""
        multi_hot = np.zeros((len(label_ids), len(self.source_labels)), dtype=np.float32)  # (N, S)
        for i, ids in enumerate(label_ids):
            multi_hot[i, ids] = 1.0
        if self.hparams.taxonomy != "original":  # union of the groups: (N, S) @ (S, L) counts, > 0
            multi_hot = (multi_hot @ self.label_map > 0).astype(np.float32)
        return multi_hot

    def _encode(self, batch: dict) -> dict:
        enc = self.tokenizer(
            batch["text"], truncation=True, max_length=self.hparams.max_length, return_token_type_ids=False
        )  # token_type_ids are all zero for single texts: models default to that, so don't carry them
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": self.targets(batch["labels"]),
            "length": [len(x) for x in enc["input_ids"]],
        }

    def _tokenized(self, split: str, raw):
        import datasets

        cache_root = Path(self.hparams.cache_dir or Path(datasets.config.HF_DATASETS_CACHE) / "goemo")
        check_writable(cache_root, "data.cache_dir")
        key = self._fingerprint(split, raw)
        out = raw.map(
            self._encode,
            batched=True,
            batch_size=2000,
            remove_columns=["labels"],  # replaced by the multi-hot column
            cache_file_name=str(cache_root / f"{split}-{key}.arrow"),
            load_from_cache_file=True,
            # Our key already names the result; without one, `datasets` pickles `_encode` with the whole
            # tokenizer (dill) on every call to hash it: seconds per split, cached or not.
            new_fingerprint=key,
            desc=f"tokenizing {split}",
        )
        hp = self.hparams
        if split == "train" and hp.holdout_fold is not None:  # cross-fitting: the rows outside the held-out fold
            if len(out) < hp.num_folds:
                raise GoemoError(f"data.num_folds {hp.num_folds} is more than the {len(out)} training rows: some folds would be empty")
            out = out.select(np.flatnonzero(fold_ids(len(out), hp.num_folds, hp.fold_seed) != hp.holdout_fold))
        # Each row's index within its (training) split travels with it (`row`): model.self_distill and model.teacher
        # keep tables over the rows.
        out = out.add_column("row", np.arange(len(out)))
        return out.with_format("torch", columns=["input_ids", "attention_mask", "labels", "row"])

    # -- Lightning hooks -------------------------------------------------------------------
    def _predicting_file(self) -> bool:
        return bool(self.hparams.predict_file) and self.trainer is not None and self.trainer.predicting

    def prepare_data(self) -> None:
        """Download (Hub) and tokenize every split once; later runs load the cached Arrow files."""
        if self._predicting_file():
            return  # the splits are not needed
        for split, raw in self._raw_splits().items():
            self._tokenized(split, raw)

    def setup(self, stage: str) -> None:
        if not self.datasets and not self._predicting_file():
            self.datasets = {split: self._tokenized(split, raw) for split, raw in self._raw_splits().items()}

    # -- resuming --------------------------------------------------------------------------
    def training_digest(self) -> str:
        """sha256 of the training rows (texts and multi-hot labels, in order): what a fit trains on, after
        data.holdout_fold and data.taxonomy. Saved in checkpoints, so a resumed fit goes on with the same rows."""
        if "train" not in self.datasets:
            self.setup("fit")
        train = self.datasets["train"]
        h = hashlib.sha256()
        for text in train.with_format(None)["text"]:
            h.update(text.encode("utf-8") + b"\0")
        h.update(np.ascontiguousarray(train.with_format("numpy", columns=["labels"])[:]["labels"], dtype=np.uint8).tobytes())
        return h.hexdigest()

    def state_dict(self) -> dict:
        if "train" not in self.datasets:  # test/predict, or a predict file: no training rows
            return {}
        if self._training_digest is None:  # once per process: the rows do not change
            self._training_digest = self.training_digest()
        return {"training_digest": self._training_digest, "tokenizer": self.tokenizer_hash, "order": self._order}

    def load_state_dict(self, state: dict) -> None:
        # Lightning calls this after `setup`, at every start from a checkpoint; only a fit trains on the rows.
        if self.trainer is None or self.trainer.is_global_zero:  # once, not once per DDP process
            note_tokenizer_change(state.get("tokenizer"), self.tokenizer_hash, self.hparams.tokenizer_name)
        if "training_digest" in state:  # a fit's checkpoint: one by goemo up to 2026-12-06 holds no order, 1
            # Here, not only in the loader's state, which Lightning restores only mid-epoch: a fit resumed from an
            # epoch's end must go on in the orders it started with too.
            self._order = int(state.get("order", 1))
        if self.trainer is None or self.trainer.state.fn != "fit" or "training_digest" not in state:
            return  # test and predict read other splits; checkpoints from before the digest are taken as they are
        if self.state_dict()["training_digest"] != state["training_digest"]:
            raise GoemoError("this fit started on other training rows (another data folder, data.holdout_fold, "
                             "data.num_folds, data.fold_seed or data.taxonomy); resume with the data it started with, "
                             "or start a new fit")  # fmt: skip

    def label_frequencies(self, groups: Optional[np.ndarray] = None) -> torch.Tensor:
        """Fraction of training rows carrying each label, (L,) float64 (after the taxonomy's mapping).

        The model's `bce_pos_weight` loss reads it at fit to weight each label's positives by neg/pos, and
        `head_bias prior` to start each logit at its label's log-odds. With `groups`, an (L, K) 0/1 matrix
        (`goemo.taxonomy.taxonomy_matrix`), the fraction of rows carrying any label of each group, (K,).
        """
        if "train" not in self.datasets:
            self.setup("fit")
        labels = np.asarray(self.datasets["train"].with_format("numpy", columns=["labels"])[:]["labels"], dtype=np.float64)  # (N, L)
        if groups is not None:
            labels = (labels @ groups > 0).astype(np.float64)  # (N, K)
        return torch.from_numpy(labels.mean(0))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        tok, ds, hp = self.tokenizer, self.datasets[split], self.hparams
        batch_size = hp.train_batch_size if split == "train" else hp.eval_batch_size
        lengths = ds.with_format("numpy", columns=["length"])[:]["length"]  # (N,) at once, not row by row
        seed = int(torch.initial_seed()) % 2**31  # set by seed_everything
        # Under DDP the batch sampler deals batches to this rank itself (Lightning's sampler injection cannot
        # wrap a custom batch sampler; the CLI turns it off with trainer.use_distributed_sampler=false).
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        if world > 1 and shuffle:
            # Every rank must cut the same order. With seed_everything false each process drew its own seed, and
            # ranks dealt from different orders would train some rows twice and skip others: take rank 0's.
            seed = int(self.trainer.strategy.broadcast(seed, src=0))
        sampler = LengthGroupedBatchSampler(
            lengths, batch_size, shuffle=shuffle, seed=seed, pool_batches=64 if hp.group_by_length else 1,
            num_replicas=world, rank=rank, order=self._order,
        )  # fmt: skip
        loader = ResumableDataLoader if shuffle else DataLoader
        # Its own generator: starting an iterator draws a worker seed from it, not from the global random
        # state, so the dropout masks do not depend on when loaders start (what makes resuming exact).
        return loader(
            ds, batch_sampler=sampler, collate_fn=MultiLabelCollator(tok.pad_token_id, tok.padding_side),
            generator=torch.Generator().manual_seed(seed), **self._workers(),
        )  # fmt: skip

    def _workers(self) -> dict:
        """DataLoader worker and pinning settings for the device the batches go to."""
        on_cuda = self._on_cuda()
        n = self.hparams.num_workers
        n = default_num_workers(on_cuda) if n is None else n
        # page-locked batches only speed up host -> GPU copies
        return {"num_workers": n, "persistent_workers": n > 0, "pin_memory": on_cuda}

    def _on_cuda(self) -> bool:
        """Whether batches go to a CUDA device: the trainer's device when attached, else CUDA availability."""
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        if not self.hparams.predict_file:
            return self._loader("test", shuffle=False)
        from goemo.predict import TextFileDataset

        hp = self.hparams
        # The dataset yields whole batches (tokenized per chunk, sorted by length), so no batching here.
        ds = TextFileDataset(hp.predict_file, self.tokenizer, hp.max_length, hp.eval_batch_size)
        return DataLoader(ds, batch_size=None, **self._workers())

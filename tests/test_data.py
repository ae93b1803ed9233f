import csv
import io

import numpy as np
import pytest
import torch

from goemo.batching import MultiLabelCollator, evaluation_batches
from goemo.data import GoEmotionsDataModule, read_labels, read_release_text, read_split, release_file
from goemo.taxonomy import GOEMOTIONS_LABELS
from goemo.errors import GoemoError
from tests.conftest import LABELS4


# -- the real release -------------------------------------------------------------------------
@pytest.mark.parametrize("name,rows", [("train.tsv", 43410), ("dev.tsv", 5426), ("test.tsv", 5427)])
def test_real_splits_parse(goemotions, name, rows):
    cols = read_split(release_file(goemotions, name), 28)
    assert len(cols["text"]) == len(cols["labels"]) == len(cols["id"]) == rows
    assert all(1 <= len(ids) <= 5 for ids in cols["labels"])
    assert all(cols["id"]) and all(isinstance(t, str) for t in cols["text"])


def test_real_labels_match_hub_names(goemotions):
    assert read_labels(release_file(goemotions, "labels.txt")) == GOEMOTIONS_LABELS


def test_real_quoted_rows_are_unquoted(goemotions):
    cols = read_split(release_file(goemotions, "train.tsv"), 28)
    raw = read_release_text(goemotions / "train.tsv.gz").splitlines()
    # Line 124 of train.tsv is CSV-quoted with doubled inner quotes.
    assert raw[123].startswith('"Three words')
    assert cols["text"][123] == 'Three words, no subtlety. "Dude. Stop. Seriously." '
    assert cols["labels"][123] == [3] and cols["id"][123] == "eetq9g0"
    quoted = [i for i, line in enumerate(raw) if line.startswith('"')]
    assert len(quoted) == 1097
    for i in quoted:  # every quoted row equals what a CSV reader gives for that line alone
        assert cols["text"][i] == next(csv.reader(io.StringIO(raw[i]), delimiter="\t"))[0]


# -- synthetic folders and their errors --------------------------------------------------------
def test_tiny_folder_parses(tiny_data):
    cols = read_split(tiny_data / "train.tsv", 4)
    assert cols["text"][0] == 'She said "hi" to me'
    assert read_labels(tiny_data / "labels.txt") == LABELS4


@pytest.mark.parametrize(
    "content,expected",
    [
        ("only text\n", "train.tsv:1: expected 3 tab-separated columns"),
        ("ok\t0\ta\nbad\tx\tb\n", "train.tsv:2: label ids must be comma-separated integers, got 'x'"),
        ("ok\t0\ta\nok\t1,9\tb\n", "train.tsv:2: label id 9 is outside labels.txt (ids 0..3)"),
        ("ok\t-1\ta\n", "train.tsv:1: label id -1 is outside"),
        ("ok\t1_0\ta\n", "train.tsv:1: label ids must be comma-separated integers, got '1_0'"),
        ("ok\t\u0663\ta\n", "train.tsv:1: label ids must be comma-separated integers"),  # Arabic-Indic 3
        ('"Hi" there\t0\ta\n', "train.tsv:1: unreadable row"),  # not 'Hi there'
        # an unclosed quote that a later quoted text closes: not two rows joined into one
        ('"Great\t0\ta\nsecond\t1\tb\n"Wow" he said\t2\tc\nlast\t3\td\n', "train.tsv:1: unreadable row"),
        ("", "train.tsv: the split is empty"),
    ],
)
def test_bad_rows_name_file_and_line(tiny_data, content, expected):
    (tiny_data / "train.tsv").write_text(content, encoding="utf-8")
    with pytest.raises(GoemoError, match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        read_split(tiny_data / "train.tsv", 4)


def test_non_utf8_names_line(tiny_data):
    (tiny_data / "dev.tsv").write_bytes(b"fine\t0\ta\nbad \xff byte\t1\tb\n")
    with pytest.raises(GoemoError, match=r"dev\.tsv:2: not valid UTF-8"):
        read_split(tiny_data / "dev.tsv", 4)


def test_duplicate_labels(tiny_data):
    (tiny_data / "labels.txt").write_text("joy\nanger\njoy\n")
    with pytest.raises(GoemoError, match=r"labels\.txt:3: duplicate label name 'joy' \(also on line 1\)"):
        GoEmotionsDataModule(data_dir=str(tiny_data))


def test_missing_folder_and_split(tiny_data, tmp_path):
    with pytest.raises(GoemoError, match="no such folder"):
        GoEmotionsDataModule(data_dir=str(tmp_path / "nope"))
    (tiny_data / "test.tsv").unlink()
    dm = GoEmotionsDataModule(data_dir=str(tiny_data))
    with pytest.raises(GoemoError, match=r"test\.tsv: split file not found"):
        dm._raw_splits()


# -- tokenizing, caching, collating ---------------------------------------------------------------
def test_datamodule_batches_are_padded_float_multi_hot(tiny_data, tiny_model, tmp_path):
    dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), train_batch_size=8,
                              cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert dm.label_names == LABELS4 and dm.num_labels == 4
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "row"}  # no token_type_ids
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (17, 4)  # the longest rows (<= 32)
    for b in (batch, next(iter(dm.train_dataloader()))):
        assert b["input_ids"].shape == b["attention_mask"].shape
        assert b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max())  # padded to the longest, no more
    assert any(not b["attention_mask"].all() for b in dm.train_dataloader())  # some batches needed padding
    first = read_split(tiny_data / "dev.tsv", 4)["labels"][0]
    assert batch["labels"][0].tolist() == [1.0 if i in first else 0.0 for i in range(4)]
    dev = read_split(tiny_data / "dev.tsv", 4)["labels"]  # `row`: each row's index in its split
    assert batch["row"].dtype == torch.int64 and len(set(batch["row"].tolist())) == 17
    assert batch["labels"].tolist() == [[1.0 if i in dev[r] else 0.0 for i in range(4)] for r in batch["row"].tolist()]


def test_a_tokenizer_truncating_on_the_left_is_another_cache_entry(tiny_data, tiny_model, tmp_path):
    """truncation_side is in tokenizer_config.json, outside the backend tokenizer's JSON the cache key hashes."""
    import json
    import shutil

    left = shutil.copytree(tiny_model, tmp_path / "left")
    cfg = json.loads((left / "tokenizer_config.json").read_text())
    (left / "tokenizer_config.json").write_text(json.dumps({**cfg, "truncation_side": "left"}))
    rows = {}
    for name in (left, tiny_model):  # the left one first: the right one must not read its rows
        dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(name), cache_dir=str(tmp_path / "c"), max_length=4)
        dm.setup("fit")
        rows[name] = dm.datasets["train"][0]["input_ids"].tolist()
    fresh = dm.tokenizer(read_split(tiny_data / "train.tsv", 4)["text"][0], truncation=True, max_length=4)["input_ids"]
    assert rows[tiny_model] == fresh and rows[left] != fresh


def test_a_cache_dir_that_is_a_file_is_one_line(tiny_data, tiny_model, tmp_path):
    (tmp_path / "afile").write_text("x")
    dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "afile"))
    with pytest.raises(GoemoError, match="data.cache_dir .*afile: exists and is not a folder"):
        dm.setup("fit")


def test_tokenized_splits_are_cached(tiny_data, tiny_model, tmp_path, monkeypatch):
    kw = dict(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "cache"))
    GoEmotionsDataModule(**kw).prepare_data()
    assert len(list((tmp_path / "cache").glob("*.arrow"))) == 3
    monkeypatch.setattr(GoEmotionsDataModule, "_encode", lambda self, b: pytest.fail("re-tokenized"))
    dm = GoEmotionsDataModule(**kw)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 96
    # a different max_length is a different cache entry
    dm2 = GoEmotionsDataModule(**{**kw, "max_length": 8})
    with pytest.raises(pytest.fail.Exception, match="re-tokenized"):
        dm2.setup("fit")


def test_evaluation_batches_end_where_the_length_changes_once_half_full():
    lengths = torch.tensor([3, 5, 4, 3, 5, 3, 3, 4, 5, 3])  # rows 1, 4, 8 have 5 tokens; 2, 7 have 4; the rest 3
    cut = lambda bs: [b.tolist() for b in evaluation_batches(lengths, bs)]  # noqa: E731
    assert cut(4) == [[1, 4, 8], [2, 7], [0, 3, 5, 6], [9]]  # one length each: 3 and 2 rows are half of 4
    assert cut(8) == [[1, 4, 8, 2, 7], [0, 3, 5, 6, 9]]  # 3 rows of 8 go on into the next length
    assert cut(1) == [[i] for i in (1, 4, 8, 2, 7, 0, 3, 5, 6, 9)]
    assert cut(100) == [[1, 4, 8, 2, 7, 0, 3, 5, 6, 9]]  # longest first, stable


@pytest.mark.parametrize("bs", [1, 2, 7, 32, 128])
def test_evaluation_batches_cover_every_row_and_pad_less_than_cutting_every_bs_rows(bs):
    g = torch.Generator().manual_seed(0)
    lengths = torch.cat([torch.randint(3, 40, (900,), generator=g), torch.randint(40, 128, (100,), generator=g)])
    got = evaluation_batches(lengths, bs)
    order = torch.cat(got)
    assert sorted(order.tolist()) == list(range(1000))  # every row once
    assert (lengths[order].diff() <= 0).all()  # longest first across batches
    assert all(2 * len(b) >= bs for b in got[:-1]) and all(0 < len(b) <= bs for b in got)
    # a batch mixes lengths only if it was under half full when the length changed
    for b in got:
        first_short = int((lengths[b] < lengths[b[0]]).nonzero()[0]) if (lengths[b] < lengths[b[0]]).any() else None
        assert first_short is None or 2 * first_short < bs
    padded = lambda bs_: sum(len(b) * int(lengths[b].max()) for b in bs_)  # noqa: E731
    assert padded(got) <= padded(torch.argsort(lengths, descending=True, stable=True).split(bs))


def test_collator_pads_right_and_makes_float_labels():
    rows = [
        {"input_ids": torch.tensor([101, 7, 102]), "attention_mask": torch.ones(3, dtype=torch.long),
         "labels": torch.tensor([0, 1, 1])},
        {"input_ids": torch.tensor([101, 102]), "attention_mask": torch.ones(2, dtype=torch.long),
         "labels": torch.tensor([1, 0, 0])},
    ]  # fmt: skip
    batch = MultiLabelCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [[0, 1, 1], [1, 0, 0]]
    left = MultiLabelCollator(pad_token_id=0, padding_side="left")(rows)
    assert left["input_ids"].tolist() == [[101, 7, 102], [0, 101, 102]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]  # the mask pads on the same side


def test_a_resume_with_other_batches_is_refused():
    """The sampler's position counts batches: resumed with another batch size (or rows, or grouping) it would go on
    from the same count in another cut, training some rows twice and skipping others."""
    from goemo.batching import LengthGroupedBatchSampler

    saved = LengthGroupedBatchSampler(list(range(1, 41)), batch_size=8, seed=3)
    saved.consumed = 2
    state = saved.state_dict()
    same = LengthGroupedBatchSampler(list(range(1, 41)), batch_size=8, seed=3)
    same.load_state_dict(state)
    assert list(same) == saved.epoch_batches()[2:]
    with pytest.raises(GoemoError, match=r"cut into batches otherwise \(batch_size 8 -> 16\): resume with the run's data"):
        LengthGroupedBatchSampler(list(range(1, 41)), batch_size=16, seed=3).load_state_dict(state)
    with pytest.raises(GoemoError, match=r"\(rows 40 -> 39\)"):
        LengthGroupedBatchSampler(list(range(1, 40)), batch_size=8, seed=3).load_state_dict(state)
    old = {"epoch": 0, "consumed": 2}  # a checkpoint from before these were saved: taken as it is
    LengthGroupedBatchSampler(list(range(1, 41)), batch_size=16, seed=3).load_state_dict(old)
    cut = [min(n, 20) for n in range(1, 41)]  # another data.max_length: the pools sort into other batches
    assert LengthGroupedBatchSampler(cut, batch_size=8, seed=3).epoch_batches() != saved.epoch_batches()
    with pytest.raises(GoemoError, match=r"^the checkpoint's epoch was cut into batches of other token lengths .* resume with "
                                         r"the run's data.max_length, or start a new fit$"):  # fmt: skip
        LengthGroupedBatchSampler(cut, batch_size=8, seed=3).load_state_dict(state)
    LengthGroupedBatchSampler(cut, batch_size=8, seed=3).load_state_dict({**state, "consumed": 0})  # at an epoch's start
    done = {**state, "consumed": len(saved.epoch_batches())}  # saved at the epoch's end: the next is drawn afresh
    LengthGroupedBatchSampler(cut, batch_size=8, seed=3).load_state_dict(done)
    ungrouped = LengthGroupedBatchSampler(list(range(1, 41)), batch_size=8, seed=3, pool_batches=1)
    ungrouped.consumed = 2  # one batch a pool: the lengths order rows within a batch only, so its rows stay the same
    LengthGroupedBatchSampler(cut, batch_size=8, seed=3, pool_batches=1).load_state_dict(ungrouped.state_dict())
    # another number of processes mid-epoch: Lightning would end the epoch by its per-process count of old
    for world in (2, 3):
        with pytest.raises(GoemoError, match=r"^the checkpoint stopped mid-epoch in 1 process\(es\), now \d: resume with as many "):
            LengthGroupedBatchSampler(list(range(1, 41)), batch_size=8, seed=3, num_replicas=world, rank=0).load_state_dict(state)
        LengthGroupedBatchSampler(list(range(1, 41)), batch_size=8, seed=3, num_replicas=world, rank=0).load_state_dict(done)


@pytest.mark.parametrize("rows,batch_size,ranks", [(10, 32, 5), (10, 32, 8), (20, 8, 16), (101, 8, 3)])
def test_every_rank_gets_as_many_training_batches_as_it_promises(rows, batch_size, ranks):
    """DDP steps all ranks together: a rank that runs out of batches first hangs the others. With fewer batches
    than about half the ranks (10 rows in batches of 32 on 5 processes), padding once left ranks without one."""
    from goemo.batching import LengthGroupedBatchSampler

    lengths = [1 + i % 7 for i in range(rows)]
    samplers = [LengthGroupedBatchSampler(lengths, batch_size, seed=1, num_replicas=ranks, rank=r) for r in range(ranks)]
    assert [len(list(s)) for s in samplers] == [len(s) for s in samplers] == [-(-(-(-rows // batch_size)) // ranks)] * ranks
    assert sorted({i for s in samplers for b in s for i in b}) == list(range(rows))  # every row trained on


def test_no_rows_make_no_batches_and_a_batch_size_under_one_is_refused():
    """Not reachable from the CLI (the data module checks its splits and batch sizes first), but a sampler built by
    hand with no rows yielded one empty batch, and evaluation_batches(lengths, 0) never returned."""
    from goemo.batching import LengthGroupedBatchSampler

    for shuffle in (True, False):
        empty = LengthGroupedBatchSampler([], batch_size=4, shuffle=shuffle)
        assert list(empty) == [] and len(empty) == 0
    assert evaluation_batches(torch.tensor([], dtype=torch.long), 4) == []
    with pytest.raises(GoemoError, match="batch size 0: give a whole number of at least 1"):
        evaluation_batches(torch.tensor([3, 2]), 0)
    with pytest.raises(GoemoError, match="batch_size 0, pool_batches 64: give whole numbers"):
        LengthGroupedBatchSampler([3, 2], batch_size=0)
    with pytest.raises(GoemoError, match="batch_size 2, pool_batches 0: give whole numbers"):
        LengthGroupedBatchSampler([3, 2], batch_size=2, pool_batches=0)


def test_the_training_digest_changes_with_a_text_a_label_or_the_fold(tiny_data, tiny_model, tmp_path):
    """What a resumed fit compares with its checkpoint's (test_resume.py runs the refusal end to end)."""
    kw = {"tokenizer_name": str(tiny_model), "cache_dir": str(tmp_path / "cache")}

    def digest(d, **more) -> str:
        return GoEmotionsDataModule(data_dir=str(d), **kw, **more).training_digest()

    base = digest(tiny_data)
    assert digest(tiny_data) == base and digest(tiny_data, holdout_fold=0) != base
    lines = (tiny_data / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    text, labels, rid = lines[1].rstrip("\n").split("\t")  # 'mad mad angry chair table', '1,3'
    for name, row in (("text", f"{text} again\t{labels}\t{rid}\n"), ("label", f"{text}\t1\t{rid}\n")):
        other = tmp_path / name
        other.mkdir()
        for f in ("labels.txt", "dev.tsv", "test.tsv"):
            (other / f).write_bytes((tiny_data / f).read_bytes())
        (other / "train.tsv").write_text(lines[0] + row + "".join(lines[2:]), encoding="utf-8")
        assert digest(other) != base, name


def test_consecutive_seeds_draw_unrelated_orders_and_older_checkpoints_keep_theirs():
    """The epoch's order was seeded with seed + epoch, so seed 42's second epoch was seed 43's first: a seed group
    42, 43, 44 trained on shifted copies of each other's orders."""
    from goemo.batching import LengthGroupedBatchSampler

    def order(seed: int, epoch: int, version: int = 2) -> list[list[int]]:
        s = LengthGroupedBatchSampler(list(range(1, 201)), batch_size=4, seed=seed, pool_batches=1)
        s.order = version
        s.set_epoch(epoch)
        return s.epoch_batches()

    assert order(42, 1) != order(43, 0) and order(42, 2) != order(44, 0)
    assert order(42, 1) == order(42, 1) and order(42, 0) != order(42, 1)  # still one order per (seed, epoch)
    # A fit started by older code (its loader state has no "order") goes on in the orders it started with.
    older = LengthGroupedBatchSampler(list(range(1, 201)), batch_size=4, seed=42, pool_batches=1)
    older.load_state_dict({"epoch": 1, "consumed": 3})
    assert list(older) == order(42, 1, version=1)[3:] == order(43, 0, version=1)[3:]
    older.set_epoch(2)
    assert older.epoch_batches() == order(42, 2, version=1) and older.state_dict()["order"] == 1
    new = LengthGroupedBatchSampler(list(range(1, 201)), batch_size=4, seed=42, pool_batches=1)
    new.load_state_dict({**new.state_dict(), "epoch": 1, "consumed": 3})
    assert list(new) == order(42, 1)[3:]


def test_ddp_ranks_cut_rank_0s_order_when_each_process_drew_its_own_seed(tiny_data, tiny_model, tmp_path):
    """With seed_everything false each DDP process starts from its own random seed: ranks dealing batches from
    different orders trained some rows twice and skipped others. The data module takes rank 0's seed."""
    from types import SimpleNamespace

    sent = []

    def broadcast(obj, src=0):
        sent.append(obj)
        return sent[0]  # what rank 0 sent

    rows = []
    for rank, own_seed in ((0, 11), (1, 12345)):
        dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), train_batch_size=4,
                                  cache_dir=str(tmp_path / "cache"))  # fmt: skip
        dm.setup("fit")
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, strategy=SimpleNamespace(broadcast=broadcast, root_device=torch.device("cpu")))
        torch.manual_seed(own_seed)
        rows += [r for batch in dm.train_dataloader().batch_sampler for r in batch]
    assert sorted(rows) == list(range(96))  # every training row once (96 rows: 24 batches, 12 a rank)


def test_a_tokenizer_without_a_fast_backend_gets_a_cache_key(tiny_data, tmp_path):
    """Python-only tokenizers (BERTweet's, CANINE's, ...) have no backend_tokenizer: hashing it was a traceback."""
    from transformers import AutoTokenizer, CanineTokenizer

    from goemo.hub import tokenizer_digest

    CanineTokenizer().save_pretrained(tmp_path / "canine")
    dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tmp_path / "canine"), cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 96
    tok = dm.tokenizer
    key = tokenizer_digest(tok)
    assert tokenizer_digest(tok) == key
    # loaded offline (HF_HUB_OFFLINE, or the Hub down): transformers records local_files_only in what it saves
    offline = AutoTokenizer.from_pretrained(str(tmp_path / "canine"), local_files_only=True)
    assert tokenizer_digest(offline) == key
    tok.truncation_side = "left"
    assert tokenizer_digest(tok) != key


def test_evaluating_with_another_tokenizer_than_the_checkpoints_is_noted(tiny_data, tiny_model, tmp_path, capsys):
    """What `test`/`validate`/`predict` and a resumed fit see: Lightning hands the data module its saved state."""
    dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    saved = dm.state_dict()
    assert saved["tokenizer"] == dm.tokenizer_hash
    capsys.readouterr()  # the tokenizing progress bars
    dm.load_state_dict(saved)
    dm.load_state_dict({})  # a checkpoint from before the digest was saved
    assert capsys.readouterr().err == ""
    dm.load_state_dict({**saved, "tokenizer": "0" * 64})
    assert capsys.readouterr().err.startswith(f"note: the tokenizer {tiny_model} is not the one this run was trained with")
    from types import SimpleNamespace

    dm.trainer = SimpleNamespace(is_global_zero=False, state=SimpleNamespace(fn="test"))  # another DDP rank: rank 0 says it
    dm.load_state_dict({**saved, "tokenizer": "0" * 64})
    assert capsys.readouterr().err == ""


def test_a_fit_started_by_older_code_resumes_from_an_epoch_end_in_its_own_orders(tiny_data, tiny_model, tmp_path):
    """Lightning restores the loader's state only mid-epoch: the order's version rides in the data module's state,
    which every resume restores. A checkpoint without it (goemo up to 2026-12-06) goes on in order 1."""
    import lightning as L

    from goemo.model import EmotionClassifier
    from goemo.runs import load_checkpoint

    seen = []

    class Look(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(trainer.train_dataloader.batch_sampler.order)

    def fit(epochs: int, ckpt_path=None) -> L.Trainer:
        dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"))
        trainer = L.Trainer(
            max_epochs=epochs, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", default_root_dir=tmp_path,
            logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Look()],
        )  # fmt: skip
        trainer.fit(EmotionClassifier(str(tiny_model), label_names=dm.label_names), dm, ckpt_path=ckpt_path)
        return trainer

    path = fit(1).checkpoint_callback.best_model_path  # saved at the epoch's end
    ckpt = load_checkpoint(path)
    assert ckpt["GoEmotionsDataModule"]["order"] == 2 and seen == [2]
    fit(2, ckpt_path=path)
    assert seen == [2, 2]
    for state in ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]:
        state.pop("order")  # as older code saved them
    del ckpt["GoEmotionsDataModule"]["order"]
    torch.save(ckpt, tmp_path / "older.ckpt")
    fit(2, ckpt_path=tmp_path / "older.ckpt")
    assert seen == [2, 2, 1]


def test_the_cache_key_follows_every_text_label_and_id_and_their_types():
    import datasets

    from goemo.data import rows_digest

    def digest(text, labels, ids):
        return rows_digest(datasets.Dataset.from_dict({"text": text, "labels": labels, "id": ids}))

    base = digest(["ab", "c"], [[1], [2, 3]], ["x", "y"])
    assert base == digest(["ab", "c"], [[1], [2, 3]], ["x", "y"])
    others = [
        digest(["a", "bc"], [[1], [2, 3]], ["x", "y"]),  # the same characters cut otherwise
        digest(["ab", "c"], [[1, 2], [3]], ["x", "y"]),
        digest(["ab", "c"], [[1], [2, 3]], ["x", "z"]),
        digest(["ab", "c"], [[1], [2, 3]], [1, 2]),
        digest(["ab", "c"], [[1], [2, 3]], ["1", "2"]),
    ]
    assert len({base, *others}) == 6


def test_label_frequencies_of_groups_count_a_row_once(tiny_data, tiny_model, tmp_path):
    """A row with two labels of one group counted twice: the group's "fraction" of rows went past 1 (head_bias prior's
    auxiliary head then started at the log-odds of it). About a third of the synthetic rows hold two labels."""
    from tests.conftest import synthetic_rows

    dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"))
    rows = [set(map(int, ids.split(","))) for _, ids in synthetic_rows(96, 0)]  # train.tsv's labels, by hand
    assert sum(len(r) == 2 for r in rows) > 10
    assert dm.label_frequencies().tolist() == pytest.approx([sum(j in r for r in rows) / 96 for j in range(4)])
    groups = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])  # (L, K): {joy, anger}, {fear, neutral}
    want = [sum(bool(r & {0, 1}) for r in rows) / 96, sum(bool(r & {2, 3}) for r in rows) / 96]
    assert dm.label_frequencies(groups).tolist() == pytest.approx(want)
    assert dm.label_frequencies(np.ones((4, 1))).tolist() == pytest.approx([1.0])  # every row has a label

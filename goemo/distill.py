"""`python -m goemo.distill RUN [RUN ...] --out teacher.npz`: a teacher's probabilities on the training split.

Knowledge distillation (Hinton et al. 2015): a student trains on targets blended from the labels and a teacher's
probabilities, `(1 - w) * labels + w * p_teacher` (`--model.teacher teacher.npz --model.teacher_weight w`). The
teacher is one trained run or several (their mean probability, as `goemo.ensemble`), e.g. all-mpnet-base-v2 for a
MiniLM-L6 student. Its probabilities are computed once, here, into a teacher file (`goemo.teacher`), so each student
fit only reads an (N, L) table.

A teacher file (.npz, or `pkg:MODULE/FILE`) among the inputs joins the mean as one more teacher, with its table for
the first run's training rows: a new teacher run added to an earlier file whose run is gone
(`python -m goemo.distill RUN pkg:goemo/teachers/mpnet-seed42.npz --out two.npz`). A file counts as one teacher
whatever it averaged: for equal weights, distill all the runs together.

Cross-fitted (out-of-fold) teacher: runs fit with `--data.holdout_fold k` (one or more per fold) never saw the
rows of fold k, so those rows get the mean probability of the fold's runs only. A teacher of the student's own
recipe then passes on what it learned from other rows, not its memory of the row's labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from goemo.errors import ArgumentParser, GoemoError, exit_on_error
from goemo.teacher import read_teacher_file, teacher_path, write_teacher


def is_teacher_file(name: str) -> bool:
    """A teacher file (.npz or `pkg:`), not a run folder or checkpoint."""
    return name.startswith("pkg:") or name.lower().endswith(".npz")


def teacher_name(hparams) -> str:
    """A teacher run's model, and the file it was distilled from if it was a student (a file records its lineage)."""
    name = str(hparams["model_name_or_path"])
    if hparams.get("teacher") is not None:
        temperature = hparams.get("teacher_temperature", 1.0)
        name += f" (distilled from {hparams['teacher']} at weight {hparams.get('teacher_weight')}"
        name += f" and temperature {temperature})" if temperature != 1 else ")"
    return name


def teacher_probs(runs: list[str], batch_size: int = 64) -> dict:
    """The teachers' mean probabilities on the training split of the first run's data; for runs fit on folds
    (`data.holdout_fold`), each row's from the runs that held its fold out. Teacher files (.npz) among `runs` join
    the mean of the runs (not fold runs) as one teacher each.

    Returns {"probs": (N, L) float32, "labels": [...], "texts": [...], "teachers": [teacher_name of each run, then
    "FILE (its recorded teachers)" of each file]}.
    """
    from goemo.data import fold_ids
    from goemo.ensemble import Ensemble, check_distinct, splits_of
    from goemo.onnx_backend import load_backend

    files = [r for r in runs if is_teacher_file(r)]
    runs = [r for r in runs if not is_teacher_file(r)]
    if not runs:
        raise GoemoError("give at least one teacher run: its data's training split is the one the file is written for")
    seen: dict[Path, str] = {}
    for f in files:  # before any model is loaded
        path = teacher_path(f, "teacher file").resolve()
        if path in seen:
            raise GoemoError(f"{f} and {seen[path]} are the same teacher file ({path}); give each teacher once")
        seen[path] = f
    check_distinct(runs)
    members = [load_backend(r, "cpu", batch_size) for r in runs]
    ens = Ensemble(members)  # checks that the label sets agree
    texts = splits_of(members[0], ("train",))["train"]["text"]
    names = [teacher_name(m.model.hparams) for m in members]
    held = [m.data_hparams.get("holdout_fold") for m in members]
    if all(k is None for k in held):
        tables = [read_teacher_file(f, ens.label_names, texts, "teacher file") for f in files]  # before predicting
        probs = ens.predict_proba(texts)  # (N, L)
        if files:  # each file is one teacher more: the mean over len(runs) + len(files) teachers
            probs = (probs * len(runs) + sum(t for t, _ in tables)) / (len(runs) + len(files))
            names += [f"{f} ({'; '.join(n) or 'teachers not recorded'})" for f, (_, n) in zip(files, tables)]
        return {"probs": probs, "labels": ens.label_names, "texts": texts, "teachers": names}
    if files:
        raise GoemoError("teacher files cannot join the runs of a cross-fitted teacher (data.holdout_fold); give the runs alone")
    # Cross-fitted: every run held a fold out of one training split, all of one partition, and every fold is held
    # out by some run. Folds are row positions: a run of other rows (or rows in another order) never held these out.
    for r, m in zip(runs[1:], members[1:]):
        if splits_of(m, ("train",))["train"]["text"] != texts:
            raise GoemoError(f"{r} was fit on another training split than {runs[0]}; give fold runs of one data set")
    parts = {(m.data_hparams["num_folds"], m.data_hparams["fold_seed"]) for m, k in zip(members, held) if k is not None}
    if None in held or len(parts) > 1:
        raise GoemoError(f"teacher runs do not all hold out a fold of one partition ({', '.join(f'{r}: holdout_fold {k}' for r, k in zip(runs, held))}); "
                         "give one or more runs per fold, all of one data.num_folds and data.fold_seed")  # fmt: skip
    (num_folds, seed), = parts
    missing = sorted(set(range(num_folds)) - set(held))
    if missing:
        raise GoemoError(f"no teacher run holds out fold {missing[0]} of {num_folds}; fit one with --data.holdout_fold {missing[0]}")
    folds = fold_ids(len(texts), num_folds, seed)  # (N,)
    probs = np.zeros((len(texts), len(ens.label_names)), dtype=np.float32)  # (N, L)
    for k in range(num_folds):
        rows = np.flatnonzero(folds == k)
        fold_ens = Ensemble([m for m, h in zip(members, held) if h == k])
        probs[rows] = fold_ens.predict_proba([texts[i] for i in rows])
    return {"probs": probs, "labels": ens.label_names, "texts": texts, "teachers": names}


def main(argv: Optional[list[str]] = None) -> None:
    parser = ArgumentParser(prog="python -m goemo.distill", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="teacher run folders (their best checkpoints), .ckpt files, or teacher "
                        "files (.npz) to join the mean")
    parser.add_argument("--out", type=Path, required=True, help="the .npz file to write")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per forward pass")
    args = parser.parse_args(argv)
    with exit_on_error():
        from goemo.files import check_output_file

        check_output_file(args.out, "--out", "teacher.npz")  # before any model is loaded
        for f in filter(is_teacher_file, args.runs):  # rewritten by each rerun, its old teachers would weigh less each time
            if teacher_path(f, "teacher file").resolve() == args.out.expanduser().resolve():
                raise GoemoError(f"--out {args.out} is the teacher file {f} read here; give the new file another name")
        t = teacher_probs(args.runs, args.batch_size)
        write_teacher(args.out, t["probs"], t["labels"], t["texts"], t["teachers"])
    p, files = t["probs"], sum(map(is_teacher_file, args.runs))
    print(f"{args.out}: {p.shape[0]} training rows x {p.shape[1]} labels from {len(args.runs) - files} teacher run(s)"
          f"{f' and {files} teacher file(s)' if files else ''}; "
          f"mean probability {p.mean():.4f}")  # fmt: skip


if __name__ == "__main__":
    main()

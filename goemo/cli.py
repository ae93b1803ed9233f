"""LightningCLI wiring: data -> model links, checkpointing, TensorBoard, Rich terminal output,
run-aware `--ckpt_path`, and `predict --data.predict_file FILE [--output PATH]`."""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Optional

import torch
from jsonargparse import ArgumentError
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor, ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from goemo.averaging import EpochAveraging
from goemo.dashboard import ValidationExamples
from goemo.report import TestReport
from goemo.data import HUB_CONFIG, HUB_DATASET, GoEmotionsDataModule
from goemo.errors import GoemoError
from goemo.files import check_output_file, check_writable
from goemo.inputs import check_file
from goemo.model import EmotionClassifier, unread
from goemo.onnx_backend import Backend
from goemo.predict import PredictionWriter, check_not_the_input
from goemo.reliability import Interrupts, LastCheckpoint, OutsideLoopsSIGTERM
from goemo.runs import config_files, load_lightning_checkpoint, options, read_config, rewrite_args

# Rich terminal output, explicit rather than left to Lightning's "is rich installed" check: a live bar
# with the loss, validation metrics and it/s, and a model summary table.
# (Lightning prints the metrics table at the end of validate/test itself, with rich when installed.)
TERMINAL_CALLBACKS = [
    {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
    {"class_path": "lightning.pytorch.callbacks.RichModelSummary"},
]
# Exact resume, Ctrl-C/SIGTERM and divergence handling (goemo.reliability): in every run's config, removable there.
RELIABILITY_CALLBACKS = [{"class_path": f"goemo.reliability.{name}"} for name in ("ExactResume", "Interrupts", "StopOnNonFiniteLoss")]

# Metric names shown as columns in TensorBoard's hparams tab (fixed: dashboards and scripts read them).
HPARAM_METRICS = [f"{s}/{m}" for s in ("val", "test") for m in ("loss", "f1_micro", "f1_macro", "exact_match")]
HPARAM_METRICS += [f"test/{m}_tuned" for m in ("f1_micro", "f1_macro", "exact_match")]  # per-label thresholds
# --ckpt_path's help, as goemo reads it (`_prepare_subcommand_parser`).
CKPT_PATH_HELP = {
    "fit": "Resume a fit: `last` (the newest run's last.ckpt), a run folder (lightning_logs/version_N: its last.ckpt) or "
           "a .ckpt file. The run's config.yaml is read beneath the flags given and the fit goes on in its folder. Once, as a flag.",
    "other": "The model: `best` or `last` (the newest run's best or last checkpoint), a run folder (lightning_logs/version_N: "
             "its best checkpoint) or a .ckpt file. The run's config.yaml is read beneath the flags given and the files "
             "go into its folder. Once, as a flag.",
}  # fmt: skip
# What --checkpoint.monitor can name: EmotionClassifier's logged metrics (goemo.model) and ModelCheckpoint's epoch/step.
MONITORED = [f"val/{m}" for m in ("loss", "f1_micro", "f1_macro", "exact_match")]
MONITORED += [f"val/{m}_tuned" for m in ("f1_micro", "f1_macro", "exact_match")]
MONITORED += [f"train/{m}" for m in ("loss", "aux_loss", "distill_loss")] + ["epoch", "step"]


class HParamsTensorBoardLogger(TensorBoardLogger):
    """TensorBoardLogger whose hparams tab lists the run's final metrics.

    Lightning only declares metrics in the hparams summary when it also logs values for them
    (`hp_metric=-1` by default), which puts fake points on the curves. Here the metric names
    are declared up front; TensorBoard shows the last logged value of each.
    """

    run_config: dict = {}  # trainer settings and seed, set by the CLI, shown beside the model/data hparams

    @rank_zero_only  # as TensorBoardLogger's: other ranks have no event writer
    def log_hyperparams(self, params: Any, metrics: Optional[dict] = None, step: Optional[int] = None) -> None:
        from torch.utils.tensorboard.summary import hparams

        params = {**(params if isinstance(params, Mapping) else vars(params)), **self.run_config}
        if metrics is not None:
            return super().log_hyperparams(params, metrics, step)
        super().log_hyperparams(params)  # hparams.yaml
        # Lightning declares no metric names in the hparams summary (Lightning #1111, #2971): write it ourselves.
        for summary in hparams(_flat(params), dict.fromkeys(HPARAM_METRICS, 0.0)):
            self.experiment.file_writer.add_summary(summary, step)


    def _get_next_version(self) -> int:  # no public hook; no upstream issue on the race found (#19953: the naming)
        # Lightning takes the number after the highest version_N folder and creates that folder only later, so two
        # runs started together in one folder took the same version (a sweep's parallel workers do that all day).
        # The number is claimed here with an atomic mkdir instead. Lightning has no public hook for choosing the
        # version; `TensorBoardLogger.version` calls this private method when none was given
        # (tests/test_hardening.py::test_two_fits_started_together_get_two_run_folders fails if that changes).
        version = super()._get_next_version()
        if rank_zero_only.rank != 0 or "://" in str(self.root_dir):  # other ranks get rank 0's folder by broadcast
            return version
        Path(self.root_dir).mkdir(parents=True, exist_ok=True)
        while True:
            try:
                (Path(self.root_dir) / f"version_{version}").mkdir()
                return version
            except FileExistsError:
                version += 1


def _flat(params: Mapping, prefix: str = "") -> dict:
    """Nested hyperparameters as one level, `a/b` keys, values TensorBoard's hparams take (others as text)."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, Mapping) or hasattr(value, "__dict__") and type(value).__name__ == "Namespace":
            flat.update(_flat(value if isinstance(value, Mapping) else vars(value), f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
    return {k: ("None" if v is None else v) for k, v in flat.items()}


class RunConfigCallback(SaveConfigCallback):
    """Saves `config.yaml` at fit; `validate`/`test`/`predict` in the same run save `config_<stage>.yaml`.

    The stock callback refuses to overwrite `config.yaml`, which a later `test` in the run folder would hit.
    `config_<stage>.yaml` is written once the stage has finished: one interrupted or failed leaves the file beside
    the report it describes (test_report.json, predictions.jsonl) as it was.
    """

    _resumed = False  # a resumed fit: config.yaml is written once the checkpoint has been restored
    _stage = None  # validate/test/predict: written at that stage's end

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            self.config_filename, self.overwrite = f"config_{getattr(stage, 'value', stage)}.yaml", True
            self._stage = stage
            return
        if self.config.get("ckpt_path") and not self.already_saved:
            # Written at train start instead: a resume refused while restoring (weights of another shape, another
            # teacher table) must leave the run's config.yaml as it was, or a later `test` would read its flags.
            self._resumed = True
            return
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module) -> None:
        if self._resumed:
            self._resumed = False
            super().setup(trainer, pl_module, "fit")

    def _stage_end(self, trainer, pl_module, stage: str) -> None:
        if self._stage == stage and not trainer.sanity_checking:
            self._stage = None
            super().setup(trainer, pl_module, stage)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._stage_end(trainer, pl_module, "validate")

    def on_test_end(self, trainer, pl_module) -> None:
        self._stage_end(trainer, pl_module, "test")

    def on_predict_end(self, trainer, pl_module) -> None:
        self._stage_end(trainer, pl_module, "predict")


class GoemoCLI(LightningCLI):
    def __init__(self, *args, run_dir: Optional[Path] = None, **kwargs) -> None:
        self.run_dir = run_dir  # set when --ckpt_path named a run: log into that same folder
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/f1_micro",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:02d}-step{step}",
                "checkpoint.auto_insert_metric_name": False,
                # last.ckpt is shared with LastCheckpoint: overwrite it, never add last-v1.ckpt beside it
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")  # last.ckpt every N steps
        parser.link_arguments("checkpoint.dirpath", "last_checkpoint.dirpath")  # one last.ckpt, beside the epoch checkpoints
        parser.add_lightning_class_args(EpochAveraging, "weight_averaging")  # off unless start_epoch is set
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(ValidationExamples, "val_examples")
        parser.add_lightning_class_args(TestReport, "test_report")  # test_report.json/.md after `test`
        # In the config (not trainer_defaults, which appends instances after parsing) so the
        # enable_progress_bar/enable_model_summary check below can drop them and config.yaml records them.
        parser.set_defaults({"trainer.callbacks": TERMINAL_CALLBACKS + RELIABILITY_CALLBACKS})
        # Atomic checkpoint files, weights_only loads, one-line errors (goemo.reliability): a plugin in the config too.
        parser.set_defaults({"trainer.plugins": [{"class_path": "goemo.reliability.SafeCheckpointIO"}]})
        # One source of truth: the model's name picks the tokenizer; the data's labels size the head.
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name")
        parser.link_arguments("data.label_names", "model.label_names", apply_on="instantiate")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        # `add_arguments_to_parser` cannot tell subcommands apart, and parameters of `LightningCLI.predict` are not
        # exposed as flags (Lightning #12438), so predict's own flags are added here.
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # The flags' help is Trainer.<subcommand>'s docstring, which names "hpc", "registry" and a weights_only false
        # that goemo refuses: said as goemo reads them. No public way to set an argument's help once it is added
        # (argparse keeps the actions in the private _actions).
        for action in parser._actions:
            if "--ckpt_path" in action.option_strings:
                action.help = CKPT_PATH_HELP["fit" if subcommand == "fit" else "other"]
            elif "--weights_only" in action.option_strings:
                action.help = "goemo loads checkpoints with weights_only=True only (a checkpoint never runs code): false is refused."
        if subcommand == "predict":
            parser.add_argument(
                "--output", type=Optional[str], default=None,
                help="With --data.predict_file: where to write the JSON-lines predictions (default: predictions.jsonl in the run folder).",
            )  # fmt: skip
            parser.add_argument(
                "--backend", type=Backend, default="torch",
                help="With --data.predict_file: what runs the model: torch, onnx or int8 (onnxruntime; see goemo.load).",
            )  # fmt: skip
        return parser

    def parse_arguments(self, parser, args) -> None:
        self._args = list(sys.argv[1:] if args is None else args) if not isinstance(args, Mapping) else None
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI parses a checkpoint's hyperparameters on top of the parsed config, so they override the
        # flags typed (`test --ckpt_path best --model.threshold 0.3` would test at the checkpoint's 0.5; Lightning
        # #21455, this private hook: #20310, #20801). Here they go beneath them: the arguments are parsed again with
        # the hyperparameters as `--model` right after the subcommand, so any config file or flag given wins.
        # The checkpoint is read through goemo.runs first (memory-mapped: cheap): not a safe checkpoint -> one line.
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return
        ckpt = load_lightning_checkpoint(Path(ckpt_path), mmap=True)
        if "pytorch-lightning_version" not in ckpt:  # weights and hyperparameters saved by hand: Lightning's restore fails
            raise GoemoError(f"{ckpt_path}: not a checkpoint Lightning's Trainer wrote (no pytorch-lightning_version); "
                             "goemo.load and `python -m goemo.export` take it")  # fmt: skip
        if self._args is None or sub not in self._args:  # arguments given as a dict: Lightning's own way
            return super()._parse_ckpt_path()
        hparams = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}
        if not hparams:  # `_instantiator` and the like are Lightning's, not the model's arguments
            return
        # And the length texts were cut to, as goemo.load reads it (a bare .ckpt has no config.yaml beside it).
        data = ckpt.get("datamodule_hyper_parameters")
        encoding = {"max_length": data["max_length"]} if isinstance(data, dict) and isinstance(data.get("max_length"), int) else {}
        i = self._args.index(sub) + 1
        beneath = ["--model", json.dumps(hparams), *(["--data", json.dumps(encoding)] if encoding else [])]
        self.config = self.parser.parse_args([*self._args[:i], *beneath, *self._args[i:]])
        threshold = self.config[sub].model.get("threshold")
        tuned = "thresholds" in (ckpt.get("state_dict") or {})  # an older checkpoint has none: it labels at model.threshold
        # Given by a flag or a config file of the user's (the hyperparameters lie beneath both), it would change nothing;
        # the run's own config.yaml may differ from an older best checkpoint's (a fit resumed with another threshold).
        given = self.run_dir is None or setting_given(self._args, self.run_dir, "threshold", "model")
        if sub == "predict" and tuned and given and "threshold" in hparams and threshold != hparams["threshold"]:
            raise GoemoError(f"predict labels texts at the checkpoint's tuned per-label thresholds, so --model.threshold {threshold} "
                             "would change nothing: drop it, and cut each record's scores (every label's probability) instead")  # fmt: skip

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.trainer
        first = trainer.logger[0] if isinstance(trainer.logger, list) and trainer.logger else trainer.logger
        if self.subcommand == "fit" and (trainer.logger is False or trainer.logger == []):  # None is Lightning's default logger
            # The run folder is the logger's: without it config.yaml and the checkpoints land in the working folder,
            # where `--ckpt_path best|last` never finds them and the next fit stops on the config.yaml left there.
            raise GoemoError("fit needs a logger: its folder (lightning_logs/version_N) holds the run's config, checkpoints "
                             "and reports; drop --trainer.logger false")  # fmt: skip
        if self.run_dir is not None and self.subcommand != "fit" and first not in (None, False, True) and folder_logger(first) is None:
            # A CSVLogger (say) logs into a new version_N, not the run's folder, and pinned to the run's folder it would
            # replace the run's metrics.csv: test's report and config then go into the run folder without a logger.
            note(f"trainer.logger false: the run's first logger ({getattr(first, 'class_path', first)}) cannot log into the "
                 f"run's folder again; {self.subcommand} writes its files there without one")  # fmt: skip
            trainer.logger = False
        if self.run_dir is not None and trainer.logger is False and not trainer.default_root_dir:
            # Without a logger Lightning writes where default_root_dir says (the working folder): the run's folder
            # instead, where its test report, config_<stage>.yaml and predictions belong.
            trainer.default_root_dir = str(self.run_dir)
        logger_args, root = folder_logger(trainer.logger), trainer.default_root_dir
        if self.run_dir is None and root and logger_args is not None and Path(root).resolve() != Path(logger_args.save_dir).resolve():
            # The logger's folder is where runs go (goemo's default logger pins save_dir "."): default_root_dir moves nothing.
            raise GoemoError(f"--trainer.default_root_dir {trainer.default_root_dir}: runs go where the logger's save_dir points "
                             f"({logger_args.save_dir}), not there; use --trainer.logger.init_args.save_dir {trainer.default_root_dir} instead")  # fmt: skip
        if self.subcommand != "predict" and cfg.data.get("predict_file") and self._args is not None and any(
                flag == "--data.predict_file" for flag, _ in options(self._args)):
            # Read by predict alone: `test --data.predict_file x.txt` scored the test split without a word about it.
            # Typed only: a shared recipe may hold one for its predict runs.
            raise GoemoError(f"--data.predict_file is read by predict only ({self.subcommand} uses the data's splits): "
                             f"drop it, or run python main.py predict")  # fmt: skip
        if self.subcommand == "fit" and self._args is not None:
            # Typed only, and a note: a recipe's teacher_weight stays under `--model.teacher null`, and a sweep may
            # pair focal_gamma with loss bce in some trials. `--model.teacher_weight 0.9` alone trained without a word.
            for flag in dict(options(self._args)):
                key = flag.removeprefix("--model.")
                if flag.startswith("--model.") and (why := unread(key, cfg.model)):
                    note(f"--model.{key} {cfg.model.get(key)} has no effect: {why}")
        if self.subcommand in ("validate", "test") and not cfg.get("ckpt_path"):  # as predict: scores of an untrained head
            raise GoemoError(f"{self.subcommand} needs --ckpt_path (best, last, a run folder or a .ckpt file): the model to score")
        if self.subcommand == "predict":  # without a file, predictions would stay in memory and be dropped
            if not cfg.data.predict_file:
                raise GoemoError("predict needs --data.predict_file FILE (.txt, .jsonl or .csv: the texts to predict); "
                                 "`test` scores the test split")  # fmt: skip
            if Path(cfg.data.predict_file).expanduser().is_dir():
                raise GoemoError(f"--data.predict_file {cfg.data.predict_file} is a folder; give a file of texts (.txt, .jsonl or .csv)")
            check_file(Path(cfg.data.predict_file).expanduser())  # fail before loading the model, not after
            if not cfg.get("ckpt_path"):  # the head would be untrained: scores near 0.5 that look like predictions
                raise GoemoError("predict needs --ckpt_path (best, last, a run folder or a .ckpt file): the model to predict with")
            # Where PredictionWriter's default lands: trainer.log_dir, the run folder, or with --trainer.logger false
            # the trainer's default_root_dir (Lightning's log_dir without a logger).
            if trainer.logger is False:
                folder = Path(trainer.default_root_dir or ".")
            else:
                folder = self.run_dir if folder_logger(trainer.logger) is not None else None
            output = cfg.get("output") or (folder / "predictions.jsonl" if folder else None)
            if output:
                check_not_the_input(Path(output), Path(cfg.data.predict_file))
                check_not_a_run_file(Path(output), Path(cfg.ckpt_path), self.run_dir)
        if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).expanduser().is_file():  # e.g. `ckpt_path: best` in a config file
            raise GoemoError(f"ckpt_path {cfg.ckpt_path}: no such checkpoint file (best, last and run folders work as the flag --ckpt_path)")
        self._check_outputs(cfg)
        if cfg.get("ckpt_path") and self._args is not None and not any(a.partition("=")[0] == "--ckpt_path" for a in self._args):
            # goemo.runs resolves the flag only (its run's config.yaml and folder are reused): not one from a config file
            raise GoemoError(f"ckpt_path {cfg.ckpt_path} is set in a config file, where the run's config and folder are not "
                             "reused as with the flag: give it as --ckpt_path instead (or add --ckpt_path null to start anew)")  # fmt: skip
        data = cfg.data
        if data.get("data_dir") is not None and (data.get("hub_dataset"), data.get("hub_config")) != (HUB_DATASET, HUB_CONFIG):
            if self.subcommand == "fit" and not cfg.get("ckpt_path"):  # a new run would train on data_dir, silently
                raise GoemoError(f"data.hub_dataset and data.hub_config are read only with data.data_dir null (now {data.data_dir}); "
                                 "add --data.data_dir null to load that dataset")  # fmt: skip
            note(f"data.hub_dataset {data.hub_dataset} ({data.hub_config}) is not read: the data comes from data.data_dir {data.data_dir}")
        monitor, mode = (cfg.checkpoint.monitor, cfg.checkpoint.mode) if cfg.get("checkpoint") else (None, None)
        typed = self._args is not None and any(a.partition("=")[0] in ("--checkpoint.monitor", "--checkpoint.mode") for a in self._args)
        if self.subcommand == "fit" and (typed or not cfg.get("ckpt_path")) and str(monitor).endswith("loss") and mode == "max":  # worst=best
            raise GoemoError(f"checkpoint.monitor {monitor} is lower-is-better, but checkpoint.mode is max (goemo's default, "
                             "for val/f1_micro): add --checkpoint.mode min")  # fmt: skip
        if cfg.get("weights_only") is False:
            raise GoemoError("--weights_only false: goemo loads checkpoints with weights_only=True only (a checkpoint never runs code)")
        # LightningCLI's own --optimizer/--lr_scheduler would replace EmotionClassifier.configure_optimizers with a
        # warning only: no head learning rate, no weight-decay groups, no frozen embeddings' exclusion, no schedule.
        # The flags stay parsed (every run's config.yaml holds `optimizer: null`) and are refused when set.
        given = [key for key in ("optimizer", "lr_scheduler") if cfg.get(key) is not None]
        if given and self.subcommand == "fit":
            raise GoemoError(f"--{given[0]}: goemo trains with its own AdamW and schedule; set model.learning_rate, "
                             "model.head_learning_rate, model.weight_decay, model.warmup_ratio or model.lr_schedule instead")  # fmt: skip
        if cfg.get("ckpt_path") and cfg.model.pretrained:
            note("model.pretrained false: the checkpoint holds every weight, so none are loaded (or fetched) twice")
            cfg.model.pretrained = False
        if trainer.use_distributed_sampler:  # a run config from before it defaulted to false
            note("trainer.use_distributed_sampler false: goemo's batch samplers deal batches to each rank themselves")
            trainer.use_distributed_sampler = False
        if cfg.get("last_checkpoint") and cfg.last_checkpoint.every_n_train_steps and cfg.checkpoint.enable_version_counter:
            note("checkpoint.enable_version_counter false: last.ckpt is shared with last_checkpoint, never last-v1.ckpt")
            cfg.checkpoint.enable_version_counter = False
        trainer.callbacks = self._callbacks(trainer)
        if self.subcommand == "predict" and device_count(trainer) > 1:
            # A file is predicted by one process (goemo.predict.PredictionWriter refuses more): a multi-GPU fit's
            # config.yaml, or `auto` on a multi-GPU machine, started every process only for each to refuse.
            if self._args is not None and setting_given(self._args, self.run_dir or Path("."), "devices"):
                raise GoemoError(f"predicting a file runs on one device, not {trainer.devices}; pass --trainer.devices 1")
            note(f"trainer.devices 1: predicting a file runs on one device (the run's config or `auto` gave {trainer.devices})")
            trainer.devices = 1
        auto_ddp = trainer.strategy == "auto" and (device_count(trainer) > 1 or trainer.num_nodes > 1)
        if (trainer.strategy in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook") or auto_ddp) and cfg.model.pooling == "mean":
            # The encoder's pooler (over [CLS]) gets no gradient when pooling by the mean, and DDP stops at the
            # second step over parameters without one unless told to look for them. `auto` picks DDP for
            # several devices or nodes.
            strategy = f"{'ddp' if auto_ddp else trainer.strategy}_find_unused_parameters_true"  # each registered
            note(f"mean pooling leaves the encoder's pooler unused, so DDP runs as {strategy}")
            trainer.strategy = strategy
        elif cfg.model.pooling == "mean" and _is_ddp_class(trainer.strategy) and not trainer.strategy.init_args.find_unused_parameters:
            # The class form (DDPStrategy with its timeout or backend): its DistributedDataParallel keyword, saved as such.
            note("mean pooling leaves the encoder's pooler unused, so trainer.strategy.init_args.find_unused_parameters is true")
            trainer.strategy.init_args.find_unused_parameters = True
        from_run = self.subcommand != "fit" and self.run_dir is not None and self._args is not None
        if from_run and (trainer.num_nodes or 1) > 1 and not setting_given(self._args, self.run_dir, "num_nodes"):
            # A fit on several nodes (a SLURM job) evaluated on one machine would wait for the other nodes' processes.
            note(f"trainer.num_nodes 1: the run trained on {trainer.num_nodes} nodes; {self.subcommand} runs on this "
                 f"machine (--trainer.num_nodes {trainer.num_nodes} to keep it)")  # fmt: skip
            trainer.num_nodes = 1
        if from_run and "16" in str(trainer.precision) and not setting_given(self._args, self.run_dir):
            # The run's config.yaml holds the precision it trained in (bf16-mixed by default on a GPU); its checkpoint
            # is evaluated in float32, as goemo.load, serve and the ONNX export do, so predictions agree everywhere.
            note(f"trainer.precision 32-true: the run trained in {trainer.precision}; {self.subcommand} runs in float32, "
                 f"as goemo.load (--trainer.precision {trainer.precision} to keep it)")  # fmt: skip
            trainer.precision = "32-true"
        trainer.precision = default_precision(trainer.precision, trainer.accelerator, self.subcommand)
        if self.run_dir is not None:  # log into the run's folder, not a new version_N beside it
            loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
            if self.subcommand == "fit" and loggers and loggers[0] not in (None, False, True) and folder_logger(loggers[0]) is None:
                # Its checkpoints would go to the logger's new folder, and Lightning drops their ranking when the folder
                # changes (`best` then names a later, worse epoch); a CSVLogger pinned to the run's folder deletes its
                # metrics.csv. Only TensorBoard loggers append to a run folder.
                raise GoemoError(f"resuming {self.run_dir}: its first logger ({getattr(loggers[0], 'class_path', loggers[0])}) cannot "
                                 "log into the run's folder again; resume with --trainer.logger goemo.cli.HParamsTensorBoardLogger "
                                 "(goemo's default) or a TensorBoardLogger first")  # fmt: skip
            for i, logger in enumerate(loggers):
                args = folder_logger(logger)
                if args is None:
                    continue
                if Path(args.save_dir, args.name or "").resolve() == self.run_dir.parent.resolve():
                    args.version = self.run_dir.name  # same paths as at fit, so ModelCheckpoint state reloads fully
                elif i == 0:  # the run folder moved (the first logger's folder is the run's): save_dir/""/version_N
                    args.save_dir, args.name, args.version = str(self.run_dir.parent), "", self.run_dir.name

    @staticmethod
    def _callbacks(trainer) -> list:
        """The config's callbacks, less the terminal ones that `enable_progress_bar/enable_model_summary false`
        turn off (they would clash), with a note."""
        callbacks = trainer.callbacks if isinstance(trainer.callbacks, list) else [trainer.callbacks] if trainer.callbacks else []
        off = tuple(c for c, on in ((ProgressBar, trainer.enable_progress_bar), (ModelSummary, trainer.enable_model_summary)) if on is False)
        kept = [cb for cb in callbacks if not (off and issubclass(_class_of(cb), off))]
        if len(kept) < len(callbacks):
            dropped = ", ".join(_class_of(cb).__name__ for cb in callbacks if cb not in kept)
            note(f"dropped the callbacks {dropped} from trainer.callbacks: the progress bar or model summary is off")
        return kept

    def _check_outputs(self, cfg) -> None:
        """Every place this command will write is writable, checked before any model is loaded or work is done."""
        if cfg.get("output"):
            check_output_file(Path(cfg.output), "--output")
        dirpath = cfg.checkpoint.get("dirpath") if self.subcommand == "fit" and cfg.get("checkpoint") else None
        if dirpath:
            folder = Path(dirpath).expanduser()
            if not cfg.get("ckpt_path") and folder.is_dir() and any(folder.glob("*.ckpt")):
                # Checkpoints are named by epoch and step, last.ckpt shared (no version counter): a second run overwrites them
                raise GoemoError(f"checkpoint.dirpath {dirpath} holds another run's checkpoints, which this fit would overwrite; "
                                 "choose an empty folder, or resume that run with --ckpt_path")  # fmt: skip
            check_writable(folder, "checkpoint.dirpath")
        args = folder_logger(cfg.trainer.logger)
        if self.run_dir is not None and (args is not None or not cfg.get("output")):
            check_writable(self.run_dir, "run folder")  # its events and config_<stage>.yaml go there, --output or not
        elif self.run_dir is None and args is not None:  # a fit, or an evaluation of a bare .ckpt: a new version_N there
            folder = Path(args.save_dir, args.name or "")
            run = folder / (args.version if isinstance(args.version, str) else f"version_{args.version}")  # as Lightning names it
            if self.subcommand == "fit" and args.version is not None and (run / "config.yaml").is_file():
                # a resumed run's config.yaml holds its version (and ckpt_path): fit again, it would write into that run
                raise GoemoError(f"trainer.logger version {args.version} names the run {run}, which has a config.yaml: to resume it, "
                                 f"--ckpt_path {run}; to fit this config anew, add --ckpt_path null --model.pretrained true "
                                 "--trainer.logger.init_args.version null")  # fmt: skip
            check_writable(folder, "run folders' parent")

    def fit(self, model: EmotionClassifier, datamodule: GoEmotionsDataModule, ckpt_path: str | None = None,
            weights_only: bool | None = None) -> None:
        """`trainer.fit`, with Lightning's check of val_check_interval against the epoch's batches (made once the data
        is loaded, as a ValueError) turned into one line."""
        try:
            given = {"weights_only": weights_only} if weights_only is not None else {}  # Lightning 2.6 and newer
            self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **given)
        except ValueError as e:
            if "parameter group" in str(e) and ckpt_path:  # torch's Optimizer.load_state_dict, past EmotionClassifier's checks
                raise GoemoError(f"{ckpt_path}: its optimizer has other parameter groups than this model's (other model "
                                 "settings, or goemo's grouping changed since); resume with the code and settings it started "
                                 "with, or start a new fit") from None  # fmt: skip
            if "val_check_interval" not in str(e):
                raise
            raise GoemoError(f"trainer settings: {one_line(e)}") from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (TypeError, ValueError) as e:  # Lightning's checks of devices, strategy, precision, ...
            raise GoemoError(f"trainer settings: {one_line(e)}") from None
        # Interrupts stops at a batch end by raising: it goes after every other callback (the config's callbacks
        # come before the sections', so weight averaging's update of that batch would be lost) and before the
        # checkpoints, which Lightning keeps last.
        stop = [cb for cb in trainer.callbacks if isinstance(cb, Interrupts)]
        rest = [cb for cb in trainer.callbacks if not isinstance(cb, Interrupts)]
        i = next((k for k, cb in enumerate(rest) if isinstance(cb, Checkpoint)), len(rest))
        trainer.callbacks = rest[:i] + stop + rest[i:]
        return trainer

    def _before_run(self) -> None:
        logger = self.trainer.logger
        if isinstance(logger, HParamsTensorBoardLogger):
            cfg = self.config[self.subcommand]
            trainer = {k: v for k, v in cfg.trainer.as_dict().items() if isinstance(v, (int, float, str, bool))}
            logger.run_config = {"seed_everything": cfg.seed_everything, "trainer": trainer}

    before_validate = before_test = before_predict = _before_run

    def before_fit(self) -> None:
        self._before_run()
        self._check_monitor()
        teacher = getattr(self.model.hparams, "teacher", None)
        if teacher is not None:  # the file and its labels now, before the data module tokenizes every split
            from goemo.teacher import check_teacher

            check_teacher(teacher, self.model.label_names)

    def _check_monitor(self) -> None:
        """A checkpoint.monitor the model never logs fails in Lightning's check at the first epoch's end: here, now.
        A subclass, or a callback of the user's, may log more names: those are left to Lightning's check."""
        cfg = self.config[self.subcommand]
        monitor = cfg.checkpoint.monitor if cfg.get("checkpoint") else None
        custom = type(self.model) is not EmotionClassifier or any(
            not type(cb).__module__.startswith(("goemo.", "lightning.", "pytorch_lightning.")) for cb in self.trainer.callbacks
        )
        if monitor is not None and monitor not in MONITORED and not custom:
            raise GoemoError(f"checkpoint.monitor {monitor}: the model logs no metric of that name; use one of {', '.join(MONITORED)}")

    def predict(
        self,
        model: EmotionClassifier,
        datamodule: GoEmotionsDataModule,
        return_predictions: Optional[bool] = None,
        ckpt_path: Optional[str] = None,
        weights_only: Optional[bool] = None,
    ) -> None:
        """`trainer.predict` of `--data.predict_file`, streamed into a JSON-lines file instead of memory
        (with `--backend onnx|int8`, through onnxruntime instead of the trainer)."""
        cfg = self.config[self.subcommand]
        if cfg.get("backend", "torch") != "torch":  # ckpt_path is there: checked before instantiation
            from goemo.onnx_backend import load_backend
            from goemo.predict import predict_file

            model.check_max_length(datamodule.hparams.max_length)  # as setup does for the torch path
            clf = load_backend(ckpt_path, batch_size=datamodule.hparams.eval_batch_size, backend=cfg.backend)
            clf.max_length = datamodule.hparams.max_length  # as the torch path: --data.max_length, else the run's
            output = Path(cfg.get("output") or Path(self.trainer.log_dir or ".") / "predictions.jsonl")
            written = predict_file(clf, Path(datamodule.hparams.predict_file), output)
            saver = next((cb for cb in self.trainer.callbacks if isinstance(cb, RunConfigCallback)), None)
            if saver is not None:  # config_predict.yaml as the trainer's predict writes it, once the file is
                saver.setup(self.trainer, model, "predict")
                saver.on_predict_end(self.trainer, model)
            return written
        # Before RunConfigCallback: config_predict.yaml is written once the predictions file is (both at predict end).
        callbacks = self.trainer.callbacks
        at = next((i for i, cb in enumerate(callbacks) if isinstance(cb, RunConfigCallback)), len(callbacks))
        callbacks.insert(at, PredictionWriter(cfg.get("output")))
        return_predictions = False  # written batch by batch; keeping them too would grow with the file
        given = {"weights_only": weights_only} if weights_only is not None else {}  # Lightning 2.6 and newer
        self.trainer.predict(model, datamodule=datamodule, return_predictions=return_predictions, ckpt_path=ckpt_path, **given)


def device_count(trainer) -> int:
    """How many devices the parsed `trainer.devices` asks for on each node (`auto`, -1: all the GPUs there are)."""
    devices = trainer.devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:  # "0,1": device indices
        return len([d for d in text.split(",") if d.strip()])
    if text in ("auto", "-1"):
        gpu = str(trainer.accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        return torch.cuda.device_count() if gpu else 1
    return int(text) if text.lstrip("-").isdigit() else 1  # anything else: Lightning's own error


def folder_logger(logger: Any) -> Any:
    """The init_args of the logger that holds the run folder (save_dir/name/version_N: Lightning's first logger) when
    it is a TensorBoard logger, which can log into a run folder again (as parsed, a class_path namespace); None for
    other loggers or none."""
    first = logger[0] if isinstance(logger, list) and logger else logger
    if not hasattr(first, "class_path") or getattr(first, "init_args", None) is None:
        return None
    try:
        cls = _class_of(first)
    except (ImportError, AttributeError):  # the parser has checked it; nothing goemo knows the folder of
        return None
    return first.init_args if isinstance(cls, type) and issubclass(cls, TensorBoardLogger) else None


def check_not_a_run_file(output: Path, ckpt: Path, run_dir: Path | None) -> None:
    """One line if --output is the checkpoint predicted with, a .ckpt, or the run's config*.yaml or hparams.yaml."""
    out, run = output.expanduser().resolve(), run_dir.resolve() if run_dir is not None else None
    if out == ckpt.expanduser().resolve():
        what = "the checkpoint it predicts with"
    elif out.suffix == ".ckpt":
        what = "a checkpoint file"
    elif out.parent == run and (out.name == "hparams.yaml" or out.name.startswith("config") and out.suffix == ".yaml"):
        what = f"the run's {out.name}"
    else:
        return
    raise GoemoError(f"--output {output} is {what}, which the predictions would replace; write them elsewhere "
                     "(by default: predictions.jsonl in the run folder)")


def note(text: str) -> None:
    """A value changed between parsing and instantiation, said on stderr (and kept in the saved config); by one
    process: under DDP every rank parses the same command (Lightning sets its rank from the environment at import)."""
    if rank_zero_only.rank == 0:
        print(f"note: {text}", file=sys.stderr)


def setting_given(args: list[str], run_dir: Path, key: str = "precision", section: str = "trainer") -> bool:
    """Whether the command line chooses <section>.<key> itself: a --<section>.<key> flag, a --<section> dict or file,
    or a config file other than the run's own config.yaml that sets it (the run's holds what it trained with)."""
    own = (run_dir / "config.yaml").resolve()
    for flag, value in options(args):  # -c is --config
        if flag == f"--{section}.{key}":
            return True
        if flag == f"--{section}" and value is not None and isinstance(part := read_config(value), dict) and key in part:
            return True  # --trainer FILE or --trainer YAML
        if flag == "--config" and value and Path(value).expanduser().resolve() != own:
            config = read_config(value)  # the parser has read it already; a config it could not read never gets this far
            if isinstance(config, dict) and isinstance(config.get(section), dict) and key in config[section]:
                return True
    return False


def default_precision(precision: Any, accelerator: Any, subcommand: str | None = "fit") -> Any:
    """The trainer's precision: as given, except 16-mixed without a CUDA device (configs/base.yaml on a CPU) falls
    back to 32-true; when unset, a fit runs in `bf16-mixed` on a CUDA device that has bfloat16 (Ampere and newer; the
    matmuls run on tensor cores, no loss scaling needed). Unset elsewhere stays Lightning's 32-true: on the 2-core dev
    CPU (AVX512-BF16, no AMX) bf16-mixed was slower (README, Benchmark); validate, test and predict stay in float32,
    as goemo.load predicts."""
    if str(precision) in ("16-mixed", "16") and not torch.cuda.is_available():
        note("no CUDA device, so precision 16-mixed falls back to 32-true")
        return "32-true"
    if precision is not None or str(accelerator) not in ("auto", "gpu", "cuda") or subcommand != "fit":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        note("precision bf16-mixed on this CUDA device (--trainer.precision 32-true for full precision)")
        return "bf16-mixed"
    return precision


def _class_of(callback: Any) -> type:
    """The class of a callback as the parser holds it before instantiation (a class_path namespace)."""
    if not hasattr(callback, "class_path"):
        return type(callback)
    module, _, name = callback.class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _is_ddp_class(strategy: Any) -> bool:
    """Whether trainer.strategy, as parsed, is a DDPStrategy given by class_path (whose init_args then hold
    DistributedDataParallel's keywords, find_unused_parameters among them)."""
    from lightning.pytorch.strategies import DDPStrategy

    init_args = getattr(strategy, "init_args", None)
    return hasattr(strategy, "class_path") and hasattr(init_args, "find_unused_parameters") and issubclass(_class_of(strategy), DDPStrategy)


def _on_sigterm(signum, frame) -> None:
    # Lightning's loops chain the handler they find after their own (signal_connector) and stop at a batch end
    # themselves: while theirs is installed, this one leaves it to them.
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while this one unwinds ends the process
        raise OutsideLoopsSIGTERM


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # SIGTERM's default action (the handler a command starts with) ends the process without a word; a handler of the
    # caller's (main() called from Python) stays, and Lightning's loops chain it after their own.
    main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    default = main_thread and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if default else None
    try:
        # Help resolves nothing (`test --ckpt_path best --help` helps where no run exists yet); --print_config shows the
        # run's config where one resolves, else the command as given.
        args, run_dir = list(argv), None
        if not any(a in ("-h", "--help") for a in argv):
            try:
                args, run_dir = rewrite_args(argv)
            except GoemoError:
                if not any(a.partition("=")[0] == "--print_config" for a in argv):
                    raise
        for config in config_files(args):  # jsonargparse's UnicodeDecodeError would be a traceback
            read_config(config, strict=True)
        if run_dir is not None and rank_zero_only.rank == 0:
            print(f"using run {run_dir} ({args[args.index('--ckpt_path') + 1]})", file=sys.stderr)
        sys.argv[1:] = args  # LightningCLI reads sys.argv; the rewritten one stays visible in tracebacks
        GoemoCLI(
            EmotionClassifier,
            GoEmotionsDataModule,
            seed_everything_default=42,
            run_dir=run_dir,
            save_config_callback=RunConfigCallback,
            save_config_kwargs={"overwrite": run_dir is not None},  # resuming a fit rewrites its own config
            parser_kwargs={"exit_on_error": False},  # errors come here as ArgumentError: one line, no usage dump
            trainer_defaults={
                "log_every_n_steps": 10,  # GoEmotions epochs are short; Lightning's 50 hides short runs' curves
                "use_distributed_sampler": False,  # the batch samplers shard by rank themselves (goemo.data)
                "logger": {
                    "class_path": "goemo.cli.HParamsTensorBoardLogger",
                    "init_args": {"save_dir": ".", "name": "lightning_logs", "default_hp_metric": False},
                },
            },
        )
    except SIGTERMException:
        # Lightning re-raises it (a SystemExit without a status) after `Interrupts` saved and said how to resume.
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:  # Ctrl-C outside Lightning's loops (parsing, loading, tokenizing), which handle theirs
        print("error: interrupted by Ctrl-C", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except OutsideLoopsSIGTERM:  # the default action would end the process without a word, partial files left
        print("error: interrupted by SIGTERM outside the training and evaluation loops (loading, tokenizing): "
              "nothing more was saved", file=sys.stderr)  # fmt: skip
        sys.exit(128 + signal.SIGTERM)
    except (GoemoError, ArgumentError, MisconfigurationException) as e:
        if os.environ.get("GOEMO_DEBUG"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if previous is not None and signal.getsignal(signal.SIGTERM) in (_on_sigterm, signal.SIG_DFL):
            signal.signal(signal.SIGTERM, previous)  # main() called from Python (tests, notebooks) leaves it as it was


def one_line(e: BaseException) -> str:
    """An error message on one line: jsonargparse and Lightning spread theirs over several."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if isinstance(e, ArgumentError):
        args = sys.argv[1:]
        configs = config_files(args)
        if len(configs) == 1:  # YAML errors name the text they parsed, not the file
            text = text.replace('"<unicode string>"', configs[0])
        if configs:
            text += f" (config: {', '.join(configs)})"
        sub = next((a for a in args if a in ("fit", "validate", "test", "predict")), None)
        text += f" (see: python main.py {sub + ' ' if sub else ''}--help)"
    return text or type(e).__name__


if __name__ == "__main__":  # `python -m goemo.cli`: main.py for a goemo installed without its repository
    # This file runs as __main__, a copy of the module whose classes are not those the config names
    # (goemo.cli.HParamsTensorBoardLogger): run goemo.cli's own main, so isinstance checks see one class.
    from goemo.cli import main as cli_main

    cli_main()

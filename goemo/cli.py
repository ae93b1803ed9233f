"""LightningCLI wiring: data -> model links, checkpointing, TensorBoard, and run-aware `--ckpt_path`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

from goemo.data import GoEmotionsDataModule
from goemo.hub import GoemoError
from goemo.model import EmotionClassifier
from goemo.runs import rewrite_args

# Metric names shown as columns in TensorBoard's hparams tab (fixed: dashboards and scripts read them).
HPARAM_METRICS = [f"{s}/{m}" for s in ("val", "test") for m in ("loss", "f1_micro", "f1_macro", "exact_match")]
HPARAM_METRICS += [f"test/{m}_tuned" for m in ("f1_micro", "f1_macro", "exact_match")]  # per-label thresholds


class HParamsTensorBoardLogger(TensorBoardLogger):
    """TensorBoardLogger whose hparams tab lists the run's final metrics.

    Lightning only declares metrics in the hparams summary when it also logs values for them
    (`hp_metric=-1` by default), which puts fake points on the curves. Here the metric names
    are declared up front; TensorBoard shows the last logged value of each.
    """

    def log_hyperparams(self, params: Any, metrics: Optional[dict] = None, step: Optional[int] = None) -> None:
        if metrics is not None or self._default_hp_metric:
            return super().log_hyperparams(params, metrics, step)
        super().log_hyperparams(params)  # hparams.yaml
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
        from torch.utils.tensorboard.summary import hparams

        flat = self._sanitize_params(_flatten_dict(_convert_params(params)))
        writer = self.experiment._get_file_writer()
        for summary in hparams(flat, dict.fromkeys(HPARAM_METRICS, 0.0)):
            writer.add_summary(summary, step)


class RunConfigCallback(SaveConfigCallback):
    """Saves `config.yaml` at fit; `validate`/`test`/`predict` in the same run save `config_<stage>.yaml`.

    The stock callback refuses to overwrite `config.yaml`, which a later `test` in the run folder would hit.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            self.config_filename, self.overwrite = f"config_{getattr(stage, 'value', stage)}.yaml", True
        super().setup(trainer, pl_module, stage)


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
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        # One source of truth: the model's name picks the tokenizer; the data's labels size the head.
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name")
        parser.link_arguments("data.label_names", "model.label_names", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.trainer
        if str(trainer.precision) in ("16-mixed", "16") and not torch.cuda.is_available():
            print("note: no CUDA device, so precision 16-mixed falls back to 32-true", file=sys.stderr)
            trainer.precision = "32-true"
        logger = trainer.logger
        if self.run_dir is not None and "TensorBoardLogger" in str(getattr(logger, "class_path", "")):
            args = logger.init_args
            if Path(args.save_dir, args.name or "").resolve() == self.run_dir.parent.resolve():
                args.version = self.run_dir.name  # same paths as at fit, so ModelCheckpoint state reloads fully
            else:  # the run folder moved: save_dir/""/version_N is where it lives now
                args.save_dir, args.name, args.version = str(self.run_dir.parent), "", self.run_dir.name


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, run_dir = rewrite_args(argv)
        if run_dir is not None:
            print(f"using run {run_dir} ({args[args.index('--ckpt_path') + 1]})", file=sys.stderr)
        sys.argv[1:] = args  # LightningCLI reads sys.argv; the rewritten one stays visible in tracebacks
        GoemoCLI(
            EmotionClassifier,
            GoEmotionsDataModule,
            seed_everything_default=42,
            run_dir=run_dir,
            save_config_callback=RunConfigCallback,
            save_config_kwargs={"overwrite": run_dir is not None},  # resuming a fit rewrites its own config
            trainer_defaults={
                "logger": {
                    "class_path": "goemo.cli.HParamsTensorBoardLogger",
                    "init_args": {"save_dir": ".", "name": "lightning_logs", "default_hp_metric": False},
                },
            },
            parser_kwargs={"default_env": False},
        )
    except GoemoError as e:
        if os.environ.get("GOEMO_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

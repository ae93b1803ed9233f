"""A plain PyTorch loop (no Lightning, no goemo model code) on the first training rows: tells a model from the framework.

    python benchmarks/mpnet_probe.py --model sentence-transformers/all-mpnet-base-v2 --lr 1e-4 --head-lr 2e-3 --steps 120

The encoder (any Hugging Face folder or cached Hub id), mean pooling over real tokens, dropout 0.1 and one linear
layer, BCE, AdamW (weight decay 0.01, none on biases and LayerNorms), linear warmup then decay, random batches of
the first `--rows` training rows (the embedded release). Every `--every` steps it prints the training loss; at the end,
on the first `--eval-rows` validation rows: the loss, macro- and micro-F1 at 0.5, and how much the predictions vary
from row to row (the mean over labels of the probabilities' standard deviation across rows: near 0 means it
predicts each label's base rate for every text, which is what the issue's MPNet probe did).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


def rows(split: str, n: int):
    from goemo.data import EMBEDDED, read_split, release_file, resolve_data_dir

    cols = read_split(release_file(resolve_data_dir(EMBEDDED), split), 28)
    y = np.zeros((min(n, len(cols["text"])), 28), dtype=np.float32)
    for i, ids in enumerate(cols["labels"][:n]):
        y[i, ids] = 1
    return cols["text"][:n], torch.from_numpy(y)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--head-lr", type=float, default=2e-3)
    p.add_argument("--freeze-embeddings", action="store_true")
    p.add_argument("--head-bias", choices=("zero", "prior"), default="zero",
                   help="the head's initial bias: zero, or each label's log-odds in the training rows")
    p.add_argument("--warmup", type=float, default=0.06)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--eval-rows", type=int, default=1024)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args(argv)
    from transformers import AutoModel, AutoTokenizer, get_linear_schedule_with_warmup

    from goemo.hub import resolve_model_path

    torch.manual_seed(a.seed)
    name = resolve_model_path(a.model)
    tok = AutoTokenizer.from_pretrained(name)
    enc = AutoModel.from_pretrained(name).train()
    if a.freeze_embeddings:
        enc.get_input_embeddings().weight.requires_grad_(False)
    head, drop = nn.Linear(enc.config.hidden_size, 28), nn.Dropout(0.1)
    nn.init.normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    texts, y = rows("train.tsv", a.rows)
    if a.head_bias == "prior":  # the loss starts at the base rates' instead of log(2) per label
        rate = y.mean(0).clamp(1e-4, 1 - 1e-4)
        head.bias.data.copy_(torch.log(rate / (1 - rate)))

    def pooled(texts):
        b = tok(texts, truncation=True, max_length=128, padding=True, return_tensors="pt", return_token_type_ids=False)
        h = enc(**b).last_hidden_state  # (B, T, H)
        m = b["attention_mask"].unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1).clamp(min=1)  # (B, H)

    def logits(texts):
        return head(drop(pooled(texts)))  # (B, 28)

    @torch.inference_mode()
    def spread(texts) -> float:
        """Mean cosine similarity between different rows' pooled states (1: every text looks the same)."""
        x = nn.functional.normalize(torch.cat([pooled(texts[i : i + 64]) for i in range(0, len(texts), 64)]), dim=-1)
        sim = x @ x.T
        return float((sim.sum() - sim.diagonal().sum()) / (len(x) * (len(x) - 1)))

    vt, vy = rows("dev.tsv", a.eval_rows)
    enc.eval()
    cos_before = spread(vt[:256])
    enc.train()

    decay = lambda n, w: not (w.ndim < 2 or "layernorm" in n.lower() or "layer_norm" in n.lower())  # noqa: E731
    groups = [
        {"params": [w for n, w in enc.named_parameters() if w.requires_grad and decay(n, w)], "lr": a.lr, "weight_decay": 0.01},
        {"params": [w for n, w in enc.named_parameters() if w.requires_grad and not decay(n, w)], "lr": a.lr, "weight_decay": 0.0},
        {"params": [head.weight], "lr": a.head_lr, "weight_decay": 0.01},
        {"params": [head.bias], "lr": a.head_lr, "weight_decay": 0.0},
    ]  # fmt: skip
    opt = torch.optim.AdamW(groups)
    sched = get_linear_schedule_with_warmup(opt, int(a.warmup * a.steps), a.steps)
    g = torch.Generator().manual_seed(a.seed)
    order = torch.randperm(len(texts), generator=g)
    loss_fn, t0, losses, log = nn.BCEWithLogitsLoss(), time.perf_counter(), [], []
    for step in range(a.steps):
        idx = order[(step * a.batch) % len(texts) :][: a.batch].tolist()
        loss = loss_fn(logits([texts[i] for i in idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % a.every == 0:
            log.append((step + 1, float(np.mean(losses[-a.every :]))))
            print(f"step {step + 1}: train loss {log[-1][1]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    enc.eval(), drop.eval()
    cos_after = spread(vt[:256])
    with torch.inference_mode():
        out = torch.cat([logits(vt[i : i + 128]) for i in range(0, len(vt), 128)])
    probs = torch.sigmoid(out).numpy()
    pred, tgt = probs > 0.5, vy.numpy().astype(bool)
    tp, fp, fn = (pred & tgt).sum(0), (pred & ~tgt).sum(0), (~pred & tgt).sum(0)
    f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0)
    micro = 2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1)
    result = {
        "model": a.model, "lr": a.lr, "head_lr": a.head_lr, "freeze_embeddings": a.freeze_embeddings, "steps": a.steps,
        "batch": a.batch, "train_loss": log, "val_loss": float(loss_fn(out, vy)), "val_f1_macro": float(f1.mean()),
        "val_f1_micro": float(micro), "prob_std_across_rows": float(probs.std(0).mean()), "head_bias": a.head_bias,
        "pooled_cosine_before": round(cos_before, 4), "pooled_cosine_after": round(cos_after, 4), "seconds": round(time.perf_counter() - t0),
    }  # fmt: skip
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

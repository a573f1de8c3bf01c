"""Shared helpers of the training recipes: token files, batches, schedules, checkpoints, perplexity."""

from __future__ import annotations

import json
import lzma
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
T0 = time.time()


def log(*a) -> None:
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(dev: torch.device):
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def load_tokens(path: Path) -> np.ndarray:
    """uint16 token ids from `X.u16`, or from `X.u16.xz` (decompressed next to it once)."""
    path = Path(path)
    if not path.exists() and Path(str(path) + ".xz").exists():
        raw = lzma.decompress(Path(str(path) + ".xz").read_bytes())
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(raw)
        os.replace(tmp, path)
    return np.fromfile(path, dtype=np.uint16)


class Batches:
    """Random windows of seq+1 tokens; batch `step` is a pure function of (seed, step), so resuming
    gives the same data order."""

    def __init__(self, tokens: np.ndarray, seq: int, batch: int, seed: int, dev: torch.device):
        self.data = torch.from_numpy(tokens.astype(np.int64)).to(dev)
        self.seq, self.batch, self.seed, self.dev = seq, batch, seed, dev
        if self.data.numel() < seq + 2:
            raise ValueError(f"{self.data.numel()} tokens: fewer than one window of {seq + 1}")

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.data.numel() - self.seq - 1, (self.batch,), generator=g).to(self.dev)
        idx = starts[:, None] + torch.arange(self.seq + 1, device=self.dev)[None, :]
        w = self.data[idx]
        return w[:, :-1], w[:, 1:]


def lr_at(step: int, total: int, peak: float, warmup: int, min_frac: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def save_atomic(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


@torch.no_grad()
def perplexity(model, tokens: np.ndarray, seq: int, dev: torch.device, max_tokens: int = 1_000_000,
               batch: int = 32) -> dict:
    """Mean next-token NLL over non-overlapping windows of `seq` tokens (every window starts fresh)."""
    model.eval()
    n = min(tokens.size - 1, max_tokens)
    nwin = n // seq
    if nwin == 0:
        raise ValueError("not enough tokens for one evaluation window")
    data = torch.from_numpy(tokens[: nwin * seq + 1].astype(np.int64)).to(dev)
    tot, cnt = 0.0, 0
    for i in range(0, nwin, batch):
        j = min(nwin, i + batch)
        idx = torch.arange(i, j, device=dev)[:, None] * seq + torch.arange(seq + 1, device=dev)[None, :]
        w = data[idx]
        with autocast(dev):
            logits = model(w[:, :-1])["logits"]
        nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                                reduction="sum")
        tot += float(nll)
        cnt += w[:, 1:].numel()
    model.train()
    return {"nll": tot / cnt, "ppl": math.exp(tot / cnt), "tokens": cnt}


@torch.no_grad()
def eval_set_perplexity(model, tok, items: list[dict], dev: torch.device) -> dict:
    """NLL of each item's reference continuation given its prompt (prompt encoded with the leading EOS)."""
    model.eval()
    tot, cnt = 0.0, 0
    for it in items:
        p = tok.encode(it["prompt"]).ids
        r = tok.encode(it["reference"], add_special_tokens=False).ids
        ids = torch.tensor([p + r], device=dev)
        with autocast(dev):
            logits = model(ids[:, :-1])["logits"].float()
        lp = torch.log_softmax(logits[0, len(p) - 1:], -1)
        tgt = ids[0, len(p):]
        tot += float(-lp.gather(-1, tgt[:, None]).sum())
        cnt += len(r)
    model.train()
    return {"nll": tot / max(1, cnt), "ppl": math.exp(tot / max(1, cnt)), "tokens": cnt}


def read_jsonl(p: Path) -> list[dict]:
    with open(p) as f:
        return [json.loads(x) for x in f]

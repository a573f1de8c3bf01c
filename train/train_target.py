#!/usr/bin/env python3
"""Train the gpt-oss-architecture target: bf16 pretraining, or MXFP4 quantization-aware training (--qat).

    # pretraining (bf16 autocast, fp32 master weights); 4.5 minutes on one H100, then stop
    python train/train_target.py --out runs/target --time-budget 270
    # QAT of the experts to MXFP4 (fake-quant forward, straight-through gradient), from the bf16 weights
    python train/train_target.py --out runs/qat --init runs/target/final.pt --qat floor --time-budget 60 --lr 5e-4 --warmup 10
    # more QAT, starting from an exported MXFP4 checkpoint (the experts start at their MXFP4 values)
    python train/train_target.py --out runs/qat2 --init-hf crates/default-model/assets/target --qat floor --time-budget 200 --lr 1e-3

Resume: re-running the same command continues from OUT/state.pt (saved every --save-every seconds and at the
end).  With --time-budget the number of steps is fixed after the first timed steps (recorded in the state and
the log: re-run with --steps N to reproduce a run step for step).  Data: random windows of the token stream
(batch i is a function of --seed and i).  Writes OUT/final.pt ({config, model}) and OUT/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import log  # noqa: E402
from gptoss import Config, GptOss, load_hf, param_report  # noqa: E402


def build_model(args, dev) -> GptOss:
    if args.init_hf:
        m = load_hf(Path(args.init_hf))  # e.g. the shipped MXFP4 checkpoint: experts start at their MXFP4 values
    elif args.init:
        ck = torch.load(args.init, map_location="cpu", weights_only=False)
        c = Config(**ck["config"])
        m = GptOss(c)
        m.load_state_dict(ck["model"])
    else:
        over = json.loads(args.config) if args.config else {}
        c = Config(**over)
        m = GptOss(c)
        m.init_weights(args.seed)
    m.qat = args.qat
    return m.to(dev)


def param_groups(m: GptOss, wd: float):
    decay, no = [], []
    for n, p in m.named_parameters():
        (decay if p.dim() >= 2 else no).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no, "weight_decay": 0.0}]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(common.HERE / "build/tokens/train.u16"))
    ap.add_argument("--heldout", default=str(common.HERE / "build/tokens/code_heldout.u16"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", help="JSON overrides of gptoss.Config (e.g. tiny CPU tests)")
    ap.add_argument("--init", help="final.pt of an earlier run (QAT starts from the bf16 weights)")
    ap.add_argument("--init-hf", help="an exported checkpoint dir to continue from (e.g. more QAT of the shipped model)")
    ap.add_argument("--qat", choices=["floor", "up"], help="fake-quantize the experts to MXFP4 with this scale rule")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--aux", type=float, default=0.01, help="load-balancing loss coefficient")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--time-budget", type=float, help="seconds of training; fixes --steps after 20 timed steps")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--save-every", type=float, default=60.0, help="seconds between resume checkpoints")
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args()
    if not args.steps and not args.time_budget:
        ap.error("give --steps or --time-budget")

    dev = common.device()
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    m = build_model(args, dev)
    log(f"device {dev}; config {json.dumps(m.c.__dict__)}")
    log("size", json.dumps(param_report(m.c)))
    opt = torch.optim.AdamW(param_groups(m, args.wd), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=dev.type == "cuda")
    step, total, train_time = 0, args.steps, 0.0
    state_path = out / "state.pt"
    if state_path.exists():
        st = torch.load(state_path, map_location=dev, weights_only=False)
        m.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, total, train_time = st["step"], st["total"], st["train_time"]
        log(f"resumed at step {step}/{total} ({train_time:.0f}s trained)")
    tokens = common.load_tokens(Path(args.data))
    log(f"{tokens.size:,} training tokens; batch {args.batch} x {args.seq} = {args.batch * args.seq:,} tokens/step")
    batches = common.Batches(tokens, args.seq, args.batch, args.seed, dev)

    def save(final: bool):
        common.save_atomic({"model": m.state_dict(), "opt": opt.state_dict(), "step": step, "total": total,
                            "train_time": train_time, "args": vars(args)}, state_path)
        if final:
            common.save_atomic({"config": m.c.__dict__, "model": m.state_dict(), "qat": args.qat}, out / "final.pt")

    m.train()
    last_save = time.time()
    t_mark = None
    loss_ema = None
    while total is None or step < total:
        if total is None and step == 5:
            torch.cuda.synchronize() if dev.type == "cuda" else None
            t_mark = time.time()
        if total is None and step == 25:
            torch.cuda.synchronize() if dev.type == "cuda" else None
            per = (time.time() - t_mark) / 20
            total = max(step + 1, int(args.time_budget / per))
            log(f"{per * 1e3:.1f} ms/step -> {total} steps for {args.time_budget:.0f}s (reproduce with --steps {total})")
        t0 = time.time()
        lr = common.lr_at(step, total or 10**9, args.lr, args.warmup, args.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batches.get(step)
        with common.autocast(dev):
            o = m(x)
            ce = F.cross_entropy(o["logits"].float().view(-1, m.c.vocab_size), y.reshape(-1))
            loss = ce + args.aux * o["aux"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.log_every == 0 or step == 1 or step == total:
            cev = float(ce.detach())
            loss_ema = cev if loss_ema is None else 0.9 * loss_ema + 0.1 * cev
            log(f"step {step}/{total} loss {cev:.4f} (ema {loss_ema:.4f}) aux {float(o['aux']):.3f} "
                f"gnorm {float(gn):.2f} lr {lr:.2e}")
        train_time += time.time() - t0
        if time.time() - last_save > args.save_every:
            save(False)
            last_save = time.time()
    save(True)
    metrics = {"steps": step, "train_time_s": train_time, "tokens_seen": step * args.batch * args.seq,
               "qat": args.qat, "final_train_loss_ema": loss_ema}
    if Path(args.heldout).exists() or Path(args.heldout + ".xz").exists():
        metrics["code_heldout"] = common.perplexity(m, common.load_tokens(Path(args.heldout)), args.seq, dev)
        log("held-out code", json.dumps(metrics["code_heldout"]))
    common.write_json(out / "metrics.json", metrics)
    log("done", json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())

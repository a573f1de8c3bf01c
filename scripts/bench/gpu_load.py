#!/usr/bin/env python3
"""Load time and peak host memory of `ultra generate --device cuda` on a checkpoint, next to the time
to read its files once (issue #15's bar: peak RSS ≤ 2 GB + the largest tensor). Standard library only.

    python3 scripts/bench/gpu_load.py ULTRA CHECKPOINT_DIR [--runs 2]

For each state of the page cache — `cold` (the checkpoint's pages dropped with
posix_fadvise(DONTNEED) first, no root needed) and `warm` (right after a full read) — it times one
sequential read of every file (`read`) and one `ultra generate --device cuda --max-tokens 8` run:
wall time, the child's peak RSS (getrusage), and the load line `ultra` prints. Prints a markdown table.
"""

import argparse
import glob
import json
import os
import re
import subprocess
import tempfile
import time


def drop_cache(files):
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(files):
    t0 = time.perf_counter()
    n = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while True:
                b = fh.read(64 << 20)
                if not b:
                    break
                n += len(b)
    return time.perf_counter() - t0, n


def run_ultra(ultra, ck):
    """One run: wall seconds, the child's own peak RSS (KiB, from wait4), its load line."""
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(
            [ultra, "generate", "--device", "cuda", "--model", ck, "--max-tokens", "8", "hello"],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        err.seek(0)
        text = err.read()
    if status != 0:
        raise SystemExit(f"ultra failed (status {status}):\n{text[-3000:]}")
    m = re.findall(r"(loaded[^\n]*|uploaded[^\n]*)", text)
    return wall, usage.ru_maxrss, (m[-1] if m else text.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ultra")
    ap.add_argument("checkpoint")
    ap.add_argument("--runs", type=int, default=2)
    a = ap.parse_args()
    files = sorted(glob.glob(os.path.join(a.checkpoint, "*.safetensors")))
    total = sum(os.path.getsize(f) for f in files)
    idx = os.path.join(a.checkpoint, "model.safetensors.index.json")
    largest = 0
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h = json.loads(fh.read(n))
        for k, v in h.items():
            if k != "__metadata__":
                largest = max(largest, v["data_offsets"][1] - v["data_offsets"][0])
    print(f"checkpoint {a.checkpoint}: {len(files)} files, {total / 1e9:.3f} GB, largest tensor "
          f"{largest / 1e9:.3f} GB, index {'yes' if os.path.exists(idx) else 'no'}")
    print(f"bar: peak RSS <= 2 GB + largest tensor = {(2e9 + largest) / 2**20:,.0f} MiB")
    print("| cache | run | read files once s (GB/s) | ultra wall s | peak RSS MiB | ultra's load line |")
    print("|---|---:|---:|---:|---:|---|")
    for r in range(a.runs):
        for state in ("cold", "warm"):
            if state == "cold":
                drop_cache(files)
                rt, n = read_all(files)
                drop_cache(files)
            else:
                read_all(files)
                rt, n = read_all(files)
            wall, rss, line = run_ultra(a.ultra, a.checkpoint)
            print(f"| {state} | {r + 1} | {rt:.2f} ({n / rt / 1e9:.2f}) | {wall:.2f} | "
                  f"{rss / 1024:,.0f} | {line} |", flush=True)


if __name__ == "__main__":
    main()

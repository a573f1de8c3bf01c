#!/usr/bin/env python3
"""Offline data for the embedded default model: corpus, eval sets, tokenizer, token files, device bundle.

    python train/prepare.py corpus      # scan local Python sources + docs -> build/corpus/*.jsonl + manifest
    python train/prepare.py evalsets    # committed eval sets train/eval/{code,math,prose}.jsonl
    python train/prepare.py tokenizer   # byte-level BPE (HF `tokenizers`) -> train/tokenizer/tokenizer.json
    python train/prepare.py tokenize    # build/tokens/{train,code_heldout,prose_heldout}.u16, the training
                                        # stream by domain {code,prose,math}_train.u16 (+ stats.json)
    python train/prepare.py bundle DIR  # what a GPU run needs: scripts, tokenizer, eval sets, tokens (xz);
                                        # --tokens code_train,prose_train,math_train for the drafter's --mix
    python train/prepare.py all         # the first four in order

Everything is deterministic: file lists are sorted, the train / held-out split is by a hash of the file's
path relative to its source root (so the same module of two Python versions falls on the same side), the
corpus is deduplicated by content hash (sha256), and the math problems come from fixed seeds (train and eval
use different seeds and the eval texts are checked to be absent from the training set).

Sources (defaults; the manifest records what was found):
* code: `.py` files under the stdlib directory of the running interpreter (with its site-packages) and under
  its purelib (a virtualenv's site-packages); files of 200 B .. 256 KB, UTF-8, no line over 1000 characters,
  at most --package-cap bytes per top-level package, at most --code-bytes in all;
* prose: `.md` / `.rst` / `.txt` documentation under /usr/share/doc, /usr/share/vim, ~/.cargo/registry/src
  and the interpreter's lib directory (license / copying / notice files excluded), mostly-text files only;
* math: generated multi-step arithmetic and word problems (`math_problem`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
EVAL = HERE / "eval"
TOKDIR = HERE / "tokenizer"

EOS = "<|endoftext|>"
MASK = "<|mask|>"
SPECIAL = [EOS, MASK]
VOCAB = 8192
SPLIT_REGEX = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

HELDOUT_PER_MILLE = 15  # code files on the held-out side
PROSE_HELDOUT_PER_MILLE = 40
MATH_TRAIN_SEED = 20261121
MATH_EVAL_SEED = 7
CODE_EVAL_SEED = 11
PROSE_EVAL_SEED = 13


def log(*a):
    print(*a, flush=True)


def path_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def is_heldout(key: str, per_mille: int) -> bool:
    return path_hash("split:" + key) % 1000 < per_mille


# --------------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------------


def code_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"]).resolve()]
    pure = Path(paths["purelib"]).resolve()
    if not str(pure).startswith(str(roots[0])):
        roots.append(pure)
    return roots


PROSE_ROOTS = [Path("/usr/share/doc"), Path("/usr/share/vim"), Path.home() / ".cargo/registry/src"]


def read_text(p: Path) -> str | None:
    try:
        b = p.read_bytes()
        return b.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def good_code(text: str) -> bool:
    if not (200 <= len(text) <= 256_000):
        return False
    lines = text.split("\n")
    if max(len(x) for x in lines) > 1000:
        return False
    return len(text) / max(1, len(lines)) < 90


def good_prose(name: str, text: str) -> bool:
    low = name.lower()
    if any(w in low for w in ("license", "licence", "copying", "notice", "authors", "copyright", "third_party", "thanks")):
        return False
    if not (1000 <= len(text) <= 200_000):
        return False
    letters = sum(c.isalpha() or c == " " for c in text)
    if letters / len(text) < 0.72:
        return False
    lines = text.split("\n")
    return max(len(x) for x in lines) <= 2000


def package_of(rel: str, depth: int) -> str:
    parts = rel.split("/")
    if parts[0] == "site-packages" or parts[0] == "dist-packages":
        return "/".join(parts[: depth + 1])
    return "/".join(parts[:depth]) if len(parts) > depth else parts[0]


def collect(roots: list[Path], exts: tuple[str, ...], accept, package_depth: int, package_cap: int,
            total_cap: int, exclude_parts=()) -> tuple[list[dict], dict]:
    """[{key, path, text, sha}] deduplicated by content, capped per package and in total."""
    seen: set[str] = set()
    by_pkg: dict[str, list[dict]] = {}
    stats = {"scanned": 0, "rejected": 0, "duplicates": 0}
    for root in roots:
        if not root.is_dir():
            continue
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__",) and d not in exclude_parts)
            for f in sorted(filenames):
                if f.endswith(exts):
                    files.append(Path(dirpath) / f)
        for p in files:
            stats["scanned"] += 1
            if p.is_symlink():
                continue
            text = read_text(p)
            if text is None or not accept(p.name, text):
                stats["rejected"] += 1
                continue
            sha = hashlib.sha256(text.encode()).hexdigest()
            if sha in seen:
                stats["duplicates"] += 1
                continue
            seen.add(sha)
            rel = p.relative_to(root).as_posix()
            key = f"{root.name}/{rel}" if root.name in ("doc", "vim", "src") else rel
            pkg = package_of(rel, package_depth)
            by_pkg.setdefault(root.name + ":" + pkg, []).append({"key": key, "path": str(p), "text": text, "sha": sha})
    out = []
    capped = 0
    for pkg in sorted(by_pkg):
        items = sorted(by_pkg[pkg], key=lambda d: path_hash("order:" + d["key"]))
        used = 0
        for d in items:
            n = len(d["text"].encode())
            if used + n > package_cap:
                capped += 1
                continue
            used += n
            out.append(d)
    out.sort(key=lambda d: path_hash("order:" + d["key"]))
    total = 0
    kept = []
    for d in out:
        n = len(d["text"].encode())
        if total + n > total_cap:
            capped += 1
            continue
        total += n
        kept.append(d)
    stats["capped"] = capped
    stats["kept"] = len(kept)
    stats["bytes"] = total
    return kept, stats


# --------------------------------------------------------------------------------------------
# math problems
# --------------------------------------------------------------------------------------------

NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena", "Max", "Nora",
         "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wes", "Xena", "Yuri", "Zoe"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cookies", "cards", "shells", "stamps",
         "boxes", "eggs", "balloons", "candles", "buttons"]


def _arith(rng: random.Random) -> str:
    """A multi-step arithmetic expression, evaluated step by step (innermost first, left to right)."""
    n_ops = rng.randint(2, 4)
    vals = [rng.randint(2, 60) for _ in range(n_ops + 1)]
    ops = [rng.choice("+-*") for _ in range(n_ops)]
    # group the first two operands if that changes the order of evaluation
    expr_vals = list(vals)
    lines = []
    paren = rng.random() < 0.5 and ops[0] in "+-" and ops[1] == "*"
    if paren:
        expr = f"({vals[0]} {ops[0]} {vals[1]})" + "".join(f" {o} {v}" for o, v in zip(ops[1:], vals[2:]))
        first = vals[0] + vals[1] if ops[0] == "+" else vals[0] - vals[1]
        lines.append(f"{vals[0]} {ops[0]} {vals[1]} = {first}")
        expr_vals = [first] + vals[2:]
        ops = ops[1:]
    else:
        expr = str(vals[0]) + "".join(f" {o} {v}" for o, v in zip(ops, vals[1:]))
    # multiplications first
    while "*" in ops:
        i = ops.index("*")
        r = expr_vals[i] * expr_vals[i + 1]
        lines.append(f"{expr_vals[i]} * {expr_vals[i + 1]} = {r}")
        expr_vals[i: i + 2] = [r]
        ops.pop(i)
    while ops:
        o = ops.pop(0)
        a, b = expr_vals[0], expr_vals[1]
        r = a + b if o == "+" else a - b
        lines.append(f"{a} {o} {b} = {r}")
        expr_vals[0:2] = [r]
    return f"Q: Compute {expr}.\nA: " + "\n".join(lines) + f"\nThe answer is {expr_vals[0]}.\n"


def _word(rng: random.Random) -> str:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a = rng.randint(3, 40)
    kind = rng.randint(0, 3)
    if kind == 0:
        b, c = rng.randint(2, 9), rng.randint(2, 12)
        r1 = b * c
        r2 = a + r1
        q = (f"{name} has {a} {item}. {name} buys {b} packs with {c} {item} in each pack. "
             f"How many {item} does {name} have now?")
        s = f"{b} * {c} = {r1}\n{a} + {r1} = {r2}\nThe answer is {r2}."
    elif kind == 1:
        b = rng.randint(1, a - 1) if a > 2 else 1
        c = rng.randint(2, 6)
        r1 = a - b
        r2 = r1 * c
        q = (f"{name} had {a} {item} and gave {b} to {other}. Then {name} collected {c} times as many "
             f"{item} as were left. How many {item} did {name} collect?")
        s = f"{a} - {b} = {r1}\n{r1} * {c} = {r2}\nThe answer is {r2}."
    elif kind == 2:
        c = rng.randint(2, 9)
        per = rng.randint(2, 15)
        tot = c * per
        extra = rng.randint(1, 20)
        q = (f"{name} shares {tot} {item} equally among {c} friends and then finds {extra} more {item}. "
             f"How many {item} does one friend get, and how many {item} does {name} have after that?")
        s = f"{tot} / {c} = {per}\nEach friend gets {per} {item} and {name} has {extra} {item}.\nThe answer is {per} and {extra}."
    else:
        b, c = rng.randint(2, 30), rng.randint(2, 30)
        d = rng.randint(2, 5)
        r1 = a + b
        r2 = r1 + c
        r3 = r2 * d
        q = (f"On Monday {name} counts {a} {item}, on Tuesday {b} more and on Wednesday {c} more. "
             f"{other} has {d} times as many {item} as {name}. How many {item} does {other} have?")
        s = f"{a} + {b} = {r1}\n{r1} + {c} = {r2}\n{r2} * {d} = {r3}\nThe answer is {r3}."
    return f"Q: {q}\nA: {s}\n"


def math_problem(rng: random.Random) -> str:
    return _arith(rng) if rng.random() < 0.5 else _word(rng)


def split_qa(text: str) -> tuple[str, str]:
    i = text.index("\nA: ") + len("\nA:")
    return text[:i], text[i:]


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


def cmd_corpus(args) -> None:
    t0 = time.time()
    out = BUILD / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    roots = [Path(r) for r in args.code_root] if args.code_root else code_roots()
    code, cstats = collect(roots, (".py",), lambda n, t: good_code(t), 1, args.package_cap, args.code_bytes)
    prose_roots = PROSE_ROOTS + [Path(sysconfig.get_paths()["stdlib"]).resolve()]
    prose, pstats = collect(prose_roots, (".md", ".rst", ".txt"), good_prose, 2, args.prose_package_cap,
                            args.prose_bytes, exclude_parts=("test", "tests"))
    manifest = {"code_roots": [str(r) for r in roots], "prose_roots": [str(r) for r in prose_roots],
                "code_scan": cstats, "prose_scan": pstats, "splits": {}}
    for name, docs, pm in (("code", code, HELDOUT_PER_MILLE), ("prose", prose, PROSE_HELDOUT_PER_MILLE)):
        for split in ("train", "heldout"):
            sel = [d for d in docs if is_heldout(d["key"], pm) == (split == "heldout")]
            h = hashlib.sha256()
            with open(out / f"{name}_{split}.jsonl", "w") as f:
                for d in sel:
                    f.write(json.dumps({"key": d["key"], "text": d["text"]}) + "\n")
                    h.update(d["sha"].encode())
            manifest["splits"][f"{name}_{split}"] = {
                "files": len(sel), "bytes": sum(len(d["text"].encode()) for d in sel), "sha256_of_file_hashes": h.hexdigest()}
    # math: training problems from a fixed seed, minus anything equal to an eval problem
    eval_math = {math_problem(random.Random(MATH_EVAL_SEED * 1000 + i)) for i in range(args.math_eval_pool)}
    rng = random.Random(MATH_TRAIN_SEED)
    n = 0
    skipped = 0
    h = hashlib.sha256()
    with open(out / "math_train.jsonl", "w") as f:
        while n < args.math_docs:
            probs = []
            while len(probs) < 16:
                p = math_problem(rng)
                if p in eval_math:
                    skipped += 1
                    continue
                probs.append(p)
            text = "\n".join(probs)
            f.write(json.dumps({"key": f"math/{n}", "text": text}) + "\n")
            h.update(text.encode())
            n += 1
    manifest["splits"]["math_train"] = {"files": n, "problems": n * 16, "skipped_equal_to_eval": skipped,
                                        "bytes": (out / "math_train.jsonl").stat().st_size, "sha256": h.hexdigest()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log(json.dumps(manifest["splits"], indent=1))
    log(f"corpus done in {time.time() - t0:.0f}s")


def read_jsonl(p: Path) -> list[dict]:
    with open(p) as f:
        return [json.loads(x) for x in f]


def cmd_evalsets(args) -> None:
    """Small committed eval sets: prompts (for acceptance / generation) + reference texts (perplexity)."""
    EVAL.mkdir(parents=True, exist_ok=True)
    corpus = BUILD / "corpus"
    # code: held-out files, a prompt ending at a `def` line (with the lines before it), the next lines as reference
    rng = random.Random(CODE_EVAL_SEED)
    items = []
    for d in sorted(read_jsonl(corpus / "code_heldout.jsonl"), key=lambda d: path_hash("eval:" + d["key"])):
        lines = d["text"].split("\n")
        defs = [i for i, x in enumerate(lines) if x.lstrip().startswith("def ") and x.rstrip().endswith(":") and i >= 3
                and i + 12 < len(lines)]
        if not defs:
            continue
        i = rng.choice(defs)
        prompt = "\n".join(lines[max(0, i - 25): i + 1]) + "\n"
        ref = "\n".join(lines[i + 1: i + 25]) + "\n"
        if len(prompt) > 1500:
            prompt = prompt[-1500:]
            prompt = prompt[prompt.index("\n") + 1:]
        if len(prompt) < 80:
            continue
        items.append({"id": f"code-{len(items)}", "source": d["key"], "prompt": prompt, "reference": ref})
        if len(items) == args.n:
            break
    write_jsonl(EVAL / "code.jsonl", items)
    # prose: held-out documentation, a prompt of whole lines (~500 chars), the next ~600 chars as reference
    rng = random.Random(PROSE_EVAL_SEED)
    items = []
    for d in sorted(read_jsonl(corpus / "prose_heldout.jsonl"), key=lambda d: path_hash("eval:" + d["key"])):
        text = d["text"]
        starts = [i + 2 for i in range(len(text) - 2) if text[i: i + 2] == "\n\n" and text[i + 2: i + 3].isalpha()]
        starts = [s for s in starts if s + 1200 < len(text)]
        if not starts:
            continue
        s = rng.choice(starts)
        cut = text.rfind("\n", s, s + 600)
        if cut < s + 200:
            continue
        prompt = text[s: cut + 1]
        end = text.rfind("\n", cut + 1, cut + 700)
        ref = text[cut + 1: end + 1] if end > cut else text[cut + 1: cut + 600]
        items.append({"id": f"prose-{len(items)}", "source": d["key"], "prompt": prompt, "reference": ref})
        if len(items) == args.n:
            break
    write_jsonl(EVAL / "prose.jsonl", items)
    items = []
    for i in range(args.n):
        p = math_problem(random.Random(MATH_EVAL_SEED * 1000 + i))
        q, a = split_qa(p)
        items.append({"id": f"math-{i}", "source": f"generated seed {MATH_EVAL_SEED * 1000 + i}", "prompt": q, "reference": a})
    write_jsonl(EVAL / "math.jsonl", items)
    for n in ("code", "math", "prose"):
        log(n, len(read_jsonl(EVAL / f"{n}.jsonl")), "items", (EVAL / f"{n}.jsonl").stat().st_size, "bytes")


def write_jsonl(p: Path, items: list[dict]) -> None:
    with open(p, "w") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")


def cmd_tokenizer(args) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    t0 = time.time()
    corpus = BUILD / "corpus"

    def texts():
        rng = random.Random(5)
        for name in ("code_train", "prose_train", "math_train"):
            for d in read_jsonl(corpus / f"{name}.jsonl"):
                if name != "code_train" or rng.random() < args.code_fraction:
                    yield d["text"]

    tok = Tokenizer(models.BPE())
    # GPT-2's split regex, except that numbers split into single digits (each may keep one leading space):
    # arithmetic sees one token per digit, code keeps " 1" / "0" style tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B",
                                                       special_tokens=[(EOS, 0)])
    assert tok.token_to_id(EOS) == 0 and tok.token_to_id(MASK) == 1 and tok.get_vocab_size() == VOCAB
    TOKDIR.mkdir(parents=True, exist_ok=True)
    tok.save(str(TOKDIR / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "bos_token": EOS, "eos_token": EOS, "pad_token": EOS, "mask_token": MASK,
        # A base (non-chat) model: a conversation is rendered as its messages' text, the model continues it.
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% if not loop.last %}\n\n{% endif %}{% endfor %}",
    }
    (TOKDIR / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    enc = tok.encode("def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n")
    log(enc.tokens)
    log(f"tokenizer done in {time.time() - t0:.0f}s, vocab {tok.get_vocab_size()}")


def encode_docs(tok, docs: list[str], eos: int, concat: bool = True):
    """Each document as [eos] + its ids (uint16): one array, or the list of per-document arrays."""
    import numpy as np

    out = []
    B = 256
    for i in range(0, len(docs), B):
        for e in tok.encode_batch(docs[i: i + B], add_special_tokens=False):
            out.append(np.asarray([eos] + e.ids, dtype=np.uint16))
    if not concat:
        return out
    return np.concatenate(out) if out else np.zeros(0, np.uint16)


def cmd_tokenize(args) -> None:
    import numpy as np
    from tokenizers import Tokenizer

    t0 = time.time()
    tok = Tokenizer.from_file(str(TOKDIR / "tokenizer.json"))
    corpus = BUILD / "corpus"
    out = BUILD / "tokens"
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    rng = random.Random(17)
    train_docs = []
    for name in ("code_train", "prose_train", "math_train"):
        docs = [d["text"] for d in read_jsonl(corpus / f"{name}.jsonl")]
        stats[name] = {"docs": len(docs), "bytes": sum(len(t.encode()) for t in docs)}
        train_docs += [(name, t) for t in docs]
    rng.shuffle(train_docs)  # one stream, documents in a seeded random order
    parts = encode_docs(tok, [t for _, t in train_docs], 0, concat=False)
    arr = np.concatenate(parts)
    arr.tofile(out / "train.u16")
    stats["train_tokens"] = int(arr.size)
    stats["train_sha256"] = hashlib.sha256(arr.tobytes()).hexdigest()
    # the same documents, one stream per domain (the drafter's self-distillation prompts by domain)
    for name in ("code_train", "prose_train", "math_train"):
        a = np.concatenate([x for (n, _), x in zip(train_docs, parts) if n == name])
        a.tofile(out / f"{name}.u16")
        stats[name]["tokens"] = int(a.size)
    for name in ("code_heldout", "prose_heldout"):
        docs = [d["text"] for d in read_jsonl(corpus / f"{name}.jsonl")]
        a = encode_docs(tok, docs, 0)
        a.tofile(out / f"{name}.u16")
        stats[name] = {"docs": len(docs), "bytes": sum(len(t.encode()) for t in docs), "tokens": int(a.size)}
    total_bytes = sum(stats[n]["bytes"] for n in ("code_train", "prose_train", "math_train"))
    stats["train_bytes_per_token"] = total_bytes / max(1, stats["train_tokens"])
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    log(json.dumps(stats, indent=1))
    log(f"tokenize done in {time.time() - t0:.0f}s")


def cmd_bundle(args) -> None:
    """Copy what the GPU pipeline needs into DIR (scripts, tokenizer, eval sets, xz-compressed tokens)."""
    dst = Path(args.dir)
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "train").mkdir(parents=True)
    for p in HERE.iterdir():
        if p.suffix in (".py", ".sh"):
            shutil.copy2(p, dst / "train" / p.name)
    shutil.copytree(TOKDIR, dst / "train" / "tokenizer")
    shutil.copytree(EVAL, dst / "train" / "eval")
    tok_out = dst / "train" / "build" / "tokens"
    tok_out.mkdir(parents=True)
    src = BUILD / "tokens"
    shutil.copy2(src / "stats.json", tok_out / "stats.json")
    for name in args.tokens.split(","):
        raw = (src / f"{name}.u16").read_bytes()
        if args.fraction < 1.0:  # evenly spread chunks of 256k tokens, so every part of the stream is sampled
            chunk = 2 * 262144
            n = -(-len(raw) // chunk)
            raw = b"".join(raw[i * chunk:(i + 1) * chunk] for i in range(n)
                           if int((i + 1) * args.fraction) > int(i * args.fraction))
        (tok_out / f"{name}.u16.xz").write_bytes(lzma.compress(raw, preset=6))
    total = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    log(f"bundle {dst}: {total / 1e6:.1f} MB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("--code-root", action="append", help="source root (repeatable; default: stdlib + purelib)")
    c.add_argument("--package-cap", type=int, default=8_000_000)
    c.add_argument("--code-bytes", type=int, default=170_000_000)
    c.add_argument("--prose-package-cap", type=int, default=1_500_000)
    c.add_argument("--prose-bytes", type=int, default=12_000_000)
    c.add_argument("--math-docs", type=int, default=3000)
    c.add_argument("--math-eval-pool", type=int, default=1000)
    e = sub.add_parser("evalsets")
    e.add_argument("--n", type=int, default=40)
    t = sub.add_parser("tokenizer")
    t.add_argument("--code-fraction", type=float, default=0.5, help="share of code files the BPE trainer reads")
    sub.add_parser("tokenize")
    b = sub.add_parser("bundle")
    b.add_argument("dir")
    b.add_argument("--tokens", default="train,code_heldout,prose_heldout",
                   help="token files to pack (the drafter's --mix needs code_train,prose_train,math_train)")
    b.add_argument("--fraction", type=float, default=1.0,
                   help="keep this share of each token file (evenly spread 256k-token chunks; carry-size limits)")
    a = sub.add_parser("all")
    for p in (a,):
        p.add_argument("--code-root", action="append")
        p.add_argument("--package-cap", type=int, default=8_000_000)
        p.add_argument("--code-bytes", type=int, default=170_000_000)
        p.add_argument("--prose-package-cap", type=int, default=1_500_000)
        p.add_argument("--prose-bytes", type=int, default=12_000_000)
        p.add_argument("--math-docs", type=int, default=3000)
        p.add_argument("--math-eval-pool", type=int, default=1000)
        p.add_argument("--n", type=int, default=40)
        p.add_argument("--code-fraction", type=float, default=0.5)
    args = ap.parse_args()
    if args.cmd == "all":
        for f in (cmd_corpus, cmd_evalsets, cmd_tokenizer, cmd_tokenize):
            f(args)
    else:
        {"corpus": cmd_corpus, "evalsets": cmd_evalsets, "tokenizer": cmd_tokenizer, "tokenize": cmd_tokenize,
         "bundle": cmd_bundle}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`labkit build-model`: rebuild the embedded model in one command.

corpus (`corpus`, seeded) -> byte-level BPE tokenizer (`tokenizer`) -> training and the Hugging
Face export (`trainer`) -> MODEL_CARD.md with sample outputs from the exported model, reloaded
the way labkit loads it (`card`).

May import: labkit.engine (loading and generating with the model it has just built).
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path

MAX_DIR_BYTES = 10_000_000
SAMPLE_PROMPTS = [  # (prompt, temperature); the seed's two prompts first
    ("Suggest a skincare routine", 0.0),
    ("Suggest a skincare routine for dry skin", 0.0),
    ("What should I use for acne-prone skin in the evening?", 0.7),
]


@dataclass
class CorpusStats:
    generated: int
    distinct: int
    train_examples: int
    heldout_examples: int
    train_tokens: int
    heldout_tokens: int


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="model", help="output directory (default: model)")
    parser.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cuda or cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed for corpus, init and batches")
    parser.add_argument("--examples", type=int, default=300_000,
                        help="question/answer pairs to generate (default 300000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--shape", default="default", choices=["default", "tiny"],
                        help="model size; 'tiny' is for tests")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="shorten training (schedule included) to fit this wall time")


def run_cli(args) -> int:
    from labkit.engine.model import resolve_device

    if args.steps < 1 or args.examples < 100 or args.batch_size < 1:
        print("error: --steps and --batch-size must be at least 1, --examples at least 100")
        return 2
    try:
        device = resolve_device(args.device)
    except RuntimeError as err:
        print(f"error: {err}")
        return 2
    build(Path(args.out), steps=args.steps, device=device, seed=args.seed,
          examples=args.examples, batch_size=args.batch_size, lr=args.lr, shape=args.shape,
          time_budget_s=args.time_budget)
    return 0


def build(out: Path, steps: int = 3000, device=None, seed: int = 0, examples: int = 300_000,
          batch_size: int = 128, lr: float = 2e-3, shape: str = "default",
          eval_every: int | None = None, samples: bool = True,
          time_budget_s: float | None = None) -> dict:
    """Run the whole pipeline; returns the figures written to the model card."""
    import torch

    from labkit.train import card, trainer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    tok, train_seqs, heldout_seqs, stats = _corpus_and_tokenizer(examples, seed)

    print(f"[3/4] training on {trainer.describe_device(device)}", flush=True)
    torch.manual_seed(seed)
    model = trainer.build_model(trainer.SHAPES[shape], tok)
    settings = trainer.TrainSettings(steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                     warmup_steps=min(200, max(1, steps // 10)),
                                     eval_every=eval_every or max(1, min(500, steps // 8)),
                                     time_budget_s=time_budget_s)
    report = trainer.train(model, train_seqs, heldout_seqs, settings, device,
                           pad_id=tok.pad_token_id)

    print(f"[4/4] export to {out}", flush=True)
    trainer.export(model, tok, out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.suffix != ".md")
    figures = {
        "corpus": stats, "report": report, "settings": settings, "shape": shape,
        "config": model.config, "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_trained": len(tok), "dir_bytes": size, "seed": seed, "requested_steps": steps,
        "torch": torch.__version__, "build_seconds": round(time.perf_counter() - started, 1),
        "samples": card.sample_outputs(out, SAMPLE_PROMPTS) if samples else [],
    }
    (out / "MODEL_CARD.md").write_text(card.render(figures))
    print(card.summary(figures), flush=True)
    if size > MAX_DIR_BYTES:
        print(f"WARNING: {out} holds {size / 1e6:.2f} MB, over the {MAX_DIR_BYTES / 1e6:.0f} MB "
              "budget for the committed model")
    return figures


def _corpus_and_tokenizer(examples: int, seed: int):
    """Steps 1 and 2: the corpus without exact repeats, shuffled and split into training and
    held-out pairs; a tokenizer trained on the training pairs; both splits encoded."""
    from labkit.train import corpus, tokenizer, trainer

    print(f"[1/4] corpus: {examples} examples, seed {seed}", flush=True)
    pairs = list(dict.fromkeys(corpus.generate_corpus(examples, seed=seed)))  # drop exact repeats
    random.Random(seed).shuffle(pairs)
    n_heldout = max(50, len(pairs) // 50)  # 2 %: texts never seen in training
    heldout, train = pairs[:n_heldout], pairs[n_heldout:]

    print(f"[2/4] tokenizer: byte-level BPE, target vocab {tokenizer.VOCAB_SIZE}", flush=True)
    tok = tokenizer.train_tokenizer(
        tokenizer.format_prompt(e.prompt) + " " + e.answer + tokenizer.EOS for e in train)
    train_seqs, heldout_seqs = trainer.encode(tok, train), trainer.encode(tok, heldout)
    stats = CorpusStats(
        generated=examples, distinct=len(pairs), train_examples=len(train_seqs),
        heldout_examples=len(heldout_seqs), train_tokens=sum(len(s) for s, _ in train_seqs),
        heldout_tokens=sum(len(s) for s, _ in heldout_seqs))
    return tok, train_seqs, heldout_seqs, stats

"""`labkit loadtest` on the command line: its flags, and the run that prints the seed's report
(and writes --json / --csv)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from labkit.measure.auth import API_KEY_ENVS
from labkit.measure.loadstats import DEFINITIONS
from labkit.measure.loadtest import (
    APIS,
    DEFAULT_PROMPT,
    ServerNotReady,
    parse_max_tokens,
    run,
)


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", action="append", default=None,
                        help="the /generate URL (or the server's base URL; with --api openai: "
                             "its /v1/completions, /v1 or base URL); repeat it or separate with "
                             "commas to spread requests round-robin")
    parser.add_argument("--api", choices=APIS, default="generate",
                        help="generate: the seed's POST /generate (default); openai: any "
                             "OpenAI-compatible server's POST /v1/completions, streamed and "
                             f"timed on the client (API key from ${API_KEY_ENVS[0]} or "
                             f"${API_KEY_ENVS[1]}, if set)")
    parser.add_argument("--model", default=None,
                        help="--api openai: the model to ask for (default: the one model the "
                             "server lists at GET /v1/models)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="--api openai: send vLLM's ignore_eos, so every request generates "
                             "exactly --max-tokens tokens")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="closed loop: concurrent workers (default 5); with --rate: the "
                             "most requests in flight (default: no cap)")
    parser.add_argument("--requests", type=int, default=50, help="requests to measure (50)")
    parser.add_argument("--workers", type=int, default=1,
                        help="send the load from this many processes (default 1): for loads "
                             "that one process cannot read fast enough (the report's event-loop "
                             "lag says when)")
    parser.add_argument("--max-tokens", type=_max_tokens_arg, default=150, metavar="N|MIX",
                        help="tokens per request (150); or a mix of lengths with their shares, "
                             "e.g. 16:0.8,256:0.2 (80 %% of the requests ask for 16 tokens, "
                             "20 %% for 256, in an order shuffled with --seed)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", default=None, help=f"prompt text (default {DEFAULT_PROMPT!r})")
    source.add_argument("--prompts-file", type=Path, default=None,
                        help="a text file with one prompt per line, used in turn")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds per request before it counts as a timeout (300)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="requests sent first and not counted (default 0)")
    parser.add_argument("--rate", type=float, default=None,
                        help="open loop: Poisson arrivals at this many requests/s")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the Poisson arrivals and of the order of a --max-tokens mix")
    parser.add_argument("--json", type=Path, default=None, help="write summary + records here")
    parser.add_argument("--csv", type=Path, default=None, help="write one row per request here")
    parser.add_argument("--explain", action="store_true",
                        help="print the metric definitions (alone, or after the report)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args) -> int:
    """Exit status: 0 when every request succeeded, 1 when some failed, 2 on bad arguments or
    an unreachable server."""
    if args.url is None:
        if args.explain:
            print(DEFINITIONS)
            return 0
        example = ("http://localhost:8000/v1" if args.api == "openai"
                   else "http://localhost:8000/generate")
        print(f"error: --url is required, e.g. --url {example}", file=sys.stderr)
        return 2
    try:
        prompts = _read_prompts(args)
        result = run(args.url, args.concurrency, args.requests, max_tokens=args.max_tokens,
                     prompt=prompts, temperature=args.temperature, timeout=args.timeout,
                     warmup=args.warmup, rate=args.rate, seed=args.seed,
                     progress=not args.no_progress, api=args.api, model=args.model,
                     ignore_eos=args.ignore_eos, workers=args.workers)
    except (ValueError, OSError, ServerNotReady) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.report(explain=args.explain))
    if args.json:
        document = {"summary": result.summary(),
                    "records": [r.as_dict() for r in result.records]}
        args.json.write_text(json.dumps(finite(document), indent=2))
        print(f"wrote {args.json}")
    if args.csv:
        result.to_dataframe().to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    return 0 if result.summary()["failed"] == 0 else 1


def _max_tokens_arg(text: str) -> int | dict[int, float]:
    try:
        mix = parse_max_tokens(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return mix if len(mix) > 1 else next(iter(mix))


def _read_prompts(args) -> list[str]:
    if args.prompts_file is None:
        return [args.prompt or DEFAULT_PROMPT]
    lines = [line.strip() for line in args.prompts_file.read_text().splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise ValueError(f"{args.prompts_file} has no prompts (one per line)")
    return prompts


def finite(value):
    """NaN/inf -> None, so the JSON file is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value



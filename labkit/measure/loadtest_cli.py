"""`labkit loadtest` on the command line: its flags, and the run that prints the seed's report
(and writes --json / --csv); with `--sweep` or `--sweep-rates`, one load test per level
(`labkit.measure.sweep`), one JSON with every point and the frontier PNG
(`labkit.measure.frontier_plot`), other servers' sweeps overlaid with `--compare`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from labkit.measure.auth import API_KEY_ENVS
from labkit.measure.load_client import shared_prefix
from labkit.measure.loadstats import DEFINITIONS, finite
from labkit.measure.loadtest import (
    APIS,
    DEFAULT_PROMPT,
    Interrupted,
    ServerNotReady,
    parse_max_tokens,
    run,
)

MAX_SHARED_PREFIX = 1_000_000  # tokens of --shared-prefix


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """`labkit loadtest`'s flags, in `--help`'s order: the server, the load, the output, the
    sweep."""
    _configure_target(parser)
    _configure_load(parser)
    _configure_output(parser)
    _configure_sweep(parser)


def _configure_target(parser: argparse.ArgumentParser) -> None:
    """The server: its URLs, its API, the model to ask for."""
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


def _configure_load(parser: argparse.ArgumentParser) -> None:
    """The load: how many requests, how they arrive, what each one asks for."""
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
    parser.add_argument("--shared-prefix", type=_prefix_tokens, default=None, metavar="TOKENS",
                        help="send a common system prompt of about TOKENS tokens (the same "
                             "text every run) before each request's own prompt, as a chat "
                             "application does: what a server's prefix cache shares")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds per request before it counts as a timeout (300)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="requests sent first and not counted (default 0)")
    parser.add_argument("--rate", type=float, default=None,
                        help="open loop: Poisson arrivals at this many requests/s")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the Poisson arrivals and of the order of a --max-tokens mix")


def _configure_output(parser: argparse.ArgumentParser) -> None:
    """What is written and printed besides the report."""
    parser.add_argument("--json", type=Path, default=None, help="write summary + records here")
    parser.add_argument("--csv", type=Path, default=None, help="write one row per request here")
    parser.add_argument("--explain", action="store_true",
                        help="print the metric definitions (alone, or after the report)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _configure_sweep(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "sweep", "one load test per level, one JSON with every point (--json, default "
        "sweep.json) and the frontier PNG beside it (--png): output tok/s per GPU against tok/s "
        "per user. Each level sends max(--requests, 2 x the level) requests, after one "
        "unmeasured round of 8-token requests")
    levels = group.add_mutually_exclusive_group()
    levels.add_argument("--sweep", type=_levels(int), default=None, metavar="C1,C2,...",
                        help="closed loop at each of these concurrencies, e.g. 1,2,4,8,16")
    levels.add_argument("--sweep-rates", type=_levels(float), default=None, metavar="R1,R2,...",
                        help="open loop at each of these Poisson arrival rates (requests/s)")
    group.add_argument("--slo-ttft-ms", type=float, default=None,
                       help="SLO: p95 TTFT at most this (a request: its own TTFT)")
    per_user = group.add_mutually_exclusive_group()
    per_user.add_argument("--slo-tpot-ms", type=float, default=None,
                          help="SLO: median TPOT at most this (a request: its own TPOT)")
    per_user.add_argument("--slo-tokens-per-user", type=float, default=None,
                          help="SLO: at least this many tok/s per user (= 1000 / TPOT ms)")
    group.add_argument("--compare", type=Path, action="append", default=[], metavar="JSON",
                       help="another sweep's JSON (another server's, vLLM's) drawn on the same "
                            "plot; repeat for more")
    group.add_argument("--label", default=None,
                       help="this server's name on the plot (default: its model and device)")
    group.add_argument("--png", type=Path, default=None,
                       help="the frontier plot (default: the JSON's path with .png)")
    group.add_argument("--gpus", type=int, default=1,
                       help="GPUs the server runs on: throughput is plotted per GPU (1)")


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
    if args.sweep or args.sweep_rates:
        return _run_sweep(args)
    unwritable = _unwritable([args.json, args.csv])
    if unwritable:
        print(f"error: {unwritable}", file=sys.stderr)
        return 2
    try:
        prompts = _read_prompts(args)
        result = run(args.url, args.concurrency, args.requests, max_tokens=args.max_tokens,
                     prompt=prompts, temperature=args.temperature, timeout=args.timeout,
                     warmup=args.warmup, rate=args.rate, seed=args.seed,
                     progress=not args.no_progress, api=args.api, model=args.model,
                     ignore_eos=args.ignore_eos, workers=args.workers)
    except Interrupted as stop:  # Ctrl-C: the report of what ended, marked so
        result = stop.result
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
    if result.config.get("interrupted"):
        return 130  # as a shell reports Ctrl-C
    return 0 if result.summary()["failed"] == 0 else 1


def _run_sweep(args) -> int:
    """The sweep: its table, its JSON and the frontier PNG. Exit status as for one load test
    (1 when a request failed at any level), 2 on bad arguments or an unreachable server."""
    from labkit.measure import frontier_plot, sweep

    kind, levels = ("concurrency", args.sweep) if args.sweep else ("rate", args.sweep_rates)
    json_path = args.json or Path("sweep.json")
    if args.concurrency is not None or args.rate is not None:
        print("error: a sweep sets the load of each level: drop --concurrency and --rate",
              file=sys.stderr)
        return 2
    png_path = args.png or json_path.with_suffix(".png")
    unwritable = _unwritable([json_path, png_path])
    if unwritable:
        print(f"error: {unwritable}", file=sys.stderr)
        return 2
    try:
        slo = sweep.SLO(args.slo_ttft_ms, args.slo_tokens_per_user)
        if args.slo_tpot_ms is not None:
            slo = sweep.SLO.from_tpot(args.slo_ttft_ms, args.slo_tpot_ms)
        others = [sweep.load(path) for path in args.compare]
        doc = sweep.run(args.url, levels, kind=kind, slo=slo, gpus=args.gpus, label=args.label,
                        min_requests=args.requests, workers=args.workers,
                        max_tokens=args.max_tokens, prompt=_read_prompts(args),
                        temperature=args.temperature, timeout=args.timeout, warmup=args.warmup,
                        seed=args.seed, progress=not args.no_progress, api=args.api,
                        model=args.model, ignore_eos=args.ignore_eos)
    except (ValueError, OSError, ServerNotReady) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(sweep.table(doc))
    print(f"wrote {sweep.save(doc, json_path)}")
    png = frontier_plot.save_png([doc, *others], png_path, slo)
    print(f"wrote {png}")
    if doc.get("stopped"):
        print(f"error: the sweep stopped at {kind} {doc['stopped']['level']:g}: "
              f"{doc['stopped']['error']}; the points before it are kept", file=sys.stderr)
        return 2
    return 0 if all(p["successful"] == p["requests"] for p in doc["points"]) else 1


def _unwritable(paths: list[Path | None]) -> str | None:
    """Why one of the output files could not be written, found before the run (not after an
    hour of it); None when each can be."""
    for path in filter(None, paths):
        folder = path.parent  # Path("x.json").parent is Path(".")
        if path.is_dir():
            return f"cannot write {path}: it is a folder"
        if not folder.is_dir():
            return f"cannot write {path}: no folder {folder} (create it, or write elsewhere)"
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            return f"cannot write {path}: permission denied"
    return None


def _levels(cast):
    def parse(text: str) -> list:
        from labkit.measure.sweep import check_levels

        try:
            return check_levels([cast(x) for x in text.split(",") if x.strip()],
                                "concurrency" if cast is int else "rate")
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def _max_tokens_arg(text: str) -> int | dict[int, float]:
    try:
        mix = parse_max_tokens(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return mix if len(mix) > 1 else next(iter(mix))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _prefix_tokens(text: str) -> int:
    """--shared-prefix: 1 to MAX_SHARED_PREFIX (beyond any model's context; a larger one took
    minutes to build before the first request, then could only be refused)."""
    value = _positive_int(text)
    if value > MAX_SHARED_PREFIX:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_SHARED_PREFIX:,} tokens (longer than any model's context), "
            f"got {value:,}")
    return value


def _read_prompts(args) -> list[str]:
    """The prompts, each after the --shared-prefix system prompt if one is asked for."""
    if args.prompts_file is None:
        prompts = [args.prompt or DEFAULT_PROMPT]
    else:
        lines = [line.strip() for line in args.prompts_file.read_text().splitlines()]
        prompts = [line for line in lines if line]
        if not prompts:
            raise ValueError(f"{args.prompts_file} has no prompts (one per line)")
    if getattr(args, "shared_prefix", None):
        prefix = shared_prefix(args.shared_prefix)
        prompts = [f"{prefix}\n\n{prompt}" for prompt in prompts]
    return prompts




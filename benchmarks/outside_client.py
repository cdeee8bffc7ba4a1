"""An outside benchmark client against `labkit serve` (issue 12): GuideLLM and
`labkit loadtest --api openai` on the same server in the same run, same load shape. Do their
request and token counts match the server's own /metrics counters, and do their TTFT and ITL
agree (target: within 10 %)?

    pip install -e '.[bench]'    # guidellm, pinned; not in `dev` (install cost: pyproject.toml)
    python benchmarks/outside_client.py [--mode sequential] [--concurrency 1 4] [--requests 40]
        [--rounds 4] [--prompt-tokens 32] [--output-tokens 64] [--no-together]
        [--json benchmarks/outside_client_cpu.json] [--guidellm PATH]

One server (the embedded model on the CPU by default, sequential mode), and per concurrency:
8 warm-up requests, then `--rounds` turns of GuideLLM (`guidellm run`, a subprocess:
concurrent profile with `--concurrency` streams, synthetic prompts of `--prompt-tokens` tokens
by the embedded model's tokenizer, exactly `--output-tokens` tokens out via ignore_eos,
streamed POST /v1/completions) followed by `labkit loadtest --api openai` (the library call the
CLI makes) with the same concurrency, request count, max_tokens + ignore_eos and GuideLLM's
own prompts, so the server does the same work for both. Taking turns several times spreads a
machine that speeds up or slows down over both clients. /metrics and /stats are read before
and after each client, for its counts and for the server's own TTFT and TPOT over its requests.
Then (`--together`, default) both clients at once, each at that concurrency: the same server
at the same moments, whatever else the machine runs. The 10 % verdict is taken on that run
when there is one. In turns, each client meets the server at other moments: on a shared 2-core
VM the server's own TPOT moved by more than 10 % between turns (its /metrics show it beside each
client's figures), so the turns compare the moments as much as the clients.

Sequential mode by default because it gives stable numbers: one generation at a time, FIFO,
so a few ms of difference in when a client sends changes nobody's wait much. In batched mode
(static batches, 5 ms to fill) a request that misses a batch by a millisecond waits for the
whole next one: on the 2-core VM, TTFT there differed up to 10-fold between the clients and
between runs, and the server's own TTFT with it (a different load, not a different clock).

Nothing is downloaded: HF_HUB_OFFLINE=1, GuideLLM's tokenizer is the local model/ directory.

Definitions (both clients time on the client side, from the request's headers leaving):
- TTFT: to the first streamed chunk carrying text. The same in both.
- ITL mean: GuideLLM's per request (last token - first token) / (output tokens - 1), averaged
  weighted by output tokens - 1; labkit's, every gap between text chunks, pooled (vLLM's ITL).
  With one token per chunk (labkit serve streams per token) these are the same number.
- ITL p50: GuideLLM's is the median of the per-request averages, i.e. vLLM's TPOT, so it is
  compared with labkit's TPOT p50 ((latency - TTFT) / (tokens - 1) per request). labkit's own
  ITL p50 is the median of the single gaps: another statistic, printed but not compared.
- GuideLLM's "TPOT" is (last token - request start) / output tokens, TTFT included: not vLLM's
  TPOT, so not compared.
Means and medians are taken here over every request of every round, the same arithmetic for
both clients, on each client's own per-request values; GuideLLM's own report of round 1 is
printed alongside.

GuideLLM asks every streamed /v1/completions for vLLM's stream_options.continuous_usage_stats
(usage so far in every chunk); labkit serve sends it, as vLLM does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from labkit.measure import loadtest, loadtest_cli
from labkit.serve.launcher import launch

TOLERANCE = 0.10
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "outside_client_cpu.json"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


# --- the outside client -------------------------------------------------------------------------

def find_guidellm(explicit: str | None = None) -> str | None:
    """The `guidellm` executable: the one given, $GUIDELLM, the one next to this Python
    (installed with `.[bench]`), or one on PATH; None when there is none."""
    for candidate in (explicit, os.environ.get("GUIDELLM"),
                      str(Path(sys.executable).parent / "guidellm"), shutil.which("guidellm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def guidellm_version(exe: str) -> str:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **OFFLINE})
    return (out.stdout.strip().split() or ["?"])[-1]


def guidellm_command(exe: str, url: str, *, concurrency: int, requests: int,
                     prompt_tokens: int, output_tokens: int, tokenizer: str, out: Path,
                     seed: int = 42) -> list[str]:
    return [
        exe, "run",
        # no model=: GuideLLM asks GET /v1/models for the one served
        "--backend", f"kind=openai_http,target={url},request_format=/v1/completions",
        "--profile", f"kind=concurrent,streams={concurrency}",
        "--constraint", f"kind=max_requests,count={requests}",
        "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},"
                  f"output_tokens={output_tokens}",
        "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
        "--seed", f"kind=static,value={seed}",
        "--output", f"kind=json,path={out}",
        "--disable-console",
    ]


def run_guidellm(exe: str, url: str, *, workers: int = 1, timeout: float = 900,
                 server_pid: int | None = None, seed: int = 42,
                 tokenizer: str = str(ROOT / "model"), **shape) -> dict:
    """Run `guidellm run` and return its benchmark record (the JSON report's one benchmark),
    with "cpu_share" added when `server_pid` is given: the CPU that GuideLLM's processes and
    the server used while GuideLLM measured (CPU seconds / wall seconds, sampled from /proc).
    `workers`: GuideLLM's worker processes (GUIDELLM__MAX_WORKER_PROCESSES; its default is one
    per stream, up to 10, each a spawned Python: 1 keeps it to one process plus its main
    process, like labkit loadtest's one, on a 2-core machine)."""
    with tempfile.TemporaryDirectory(prefix="guidellm-") as tmp:
        out = Path(tmp) / "guidellm.json"
        env = {**os.environ, **OFFLINE, "GUIDELLM__MAX_WORKER_PROCESSES": str(workers),
               "GUIDELLM__LOGGING__LOG_FILE": str(Path(tmp) / "guidellm.log")}
        command = guidellm_command(exe, url, out=out, tokenizer=tokenizer, seed=seed, **shape)
        with open(Path(tmp) / "output.txt", "w+") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
                                    env=env)
            sampler = CpuSampler(proc.pid, server_pid) if server_pid else None
            try:
                proc.wait(timeout)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if sampler:
                    sampler.stop()
            log.seek(0)
            if proc.returncode != 0 or not out.exists():
                raise RuntimeError(f"guidellm exited with {proc.returncode}:\n"
                                   f"{log.read()[-3000:]}")
        report = json.loads(out.read_text())
    (benchmark,) = report["benchmarks"]
    if sampler:
        benchmark["cpu_share"] = sampler.share(benchmark["start_time"], benchmark["end_time"])
    return benchmark


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process, all its threads (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> list[int]:
    """`root` and its living descendants."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


class CpuSampler:
    """Every `interval` s, on a thread: the CPU seconds a client's process tree and the
    server have used so far, to take their CPU share over a window afterwards. Per process the
    largest reading is kept, so a worker that exits keeps what it used."""

    def __init__(self, client_pid: int, server_pid: int, interval: float = 0.5, *,
                 tree: bool = True):
        self.client_pid, self.server_pid, self.interval = client_pid, server_pid, interval
        self.tree = tree  # the client's children too (not for this process: the server is one)
        self.samples: list[tuple[float, float, float]] = []  # (time.time(), client, server)
        self._seen: dict[int, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        pids = process_tree(self.client_pid)  # scanned either way: the same cost to both
        for pid in pids if self.tree else [self.client_pid]:
            self._seen[pid] = max(self._seen.get(pid, 0.0), process_cpu_s(pid))
        self.samples.append((time.time(), sum(self._seen.values()),
                             process_cpu_s(self.server_pid)))

    def _run(self) -> None:
        while not self._done.is_set():
            self._sample()
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self._sample()  # the window's end is covered

    def share(self, start: float, end: float) -> dict:
        samples = np.array(self.samples)
        times = samples[:, 0]

        def used(column: int) -> float:
            values = samples[:, column]
            return float(np.interp(end, times, values) - np.interp(start, times, values))

        return {"client": used(1) / (end - start), "server": used(2) / (end - start)}


def guidellm_round(benchmark: dict) -> dict:
    """One `guidellm run`: its counts, its per-request TTFT and ITL (its measurements), and
    the statistics it reported itself."""
    requests = benchmark["requests"]
    ok = requests["successful"]

    def reported(name: str) -> dict:
        s = benchmark["metrics"][name]["successful"]
        return {"mean": s["mean"], "p50": s["median"]}

    made = benchmark["scheduler_metrics"]["requests_made"]
    return {
        "successful": len(ok),
        "failed": len(requests["errored"]) + len(requests["incomplete"]),
        # what GuideLLM's scheduler says it sent, whether or not its report lists them
        "made": made["total"], "made_successful": made["successful"],
        "output_tokens": sum(r["output_tokens"] or 0 for r in ok),
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in ok),
        "stream_chunks": sum(r["info"]["timings"]["token_iterations"] for r in ok),
        "ttft_ms": [r["time_to_first_token_ms"] for r in ok],
        "itl_ms": [r["inter_token_latency_ms"] for r in ok],
        "itl_weights": [max((r["output_tokens"] or 0) - 1, 0) for r in ok],
        "reported": {"ttft_ms": reported("time_to_first_token_ms"),
                     "itl_ms": reported("inter_token_latency_ms")},
        "duration_s": benchmark["duration"],
        "cpu_share": benchmark.get("cpu_share"),
        "errors": sorted({str(r["info"].get("error"))[:200]
                          for r in requests["errored"] + requests["incomplete"]}),
    }


def guidellm_prompts(benchmark: dict) -> list[str]:
    """The prompts GuideLLM sent, in its order (from each request's recorded body)."""
    ok = sorted(benchmark["requests"]["successful"],
                key=lambda r: r["info"]["timings"]["request_start"] or 0)
    return [json.loads(r["request_args"])["body"]["prompt"] for r in ok]


def run_labkit(url: str, prompts: list[str], *, concurrency: int, requests: int,
               output_tokens: int, server_pid: int | None = None, **_):
    """`labkit loadtest --api openai` (the library call the CLI makes) in this process; with
    `server_pid`, also the CPU share this process and the server had meanwhile (sampled as
    for GuideLLM, so the sampling costs both clients the same)."""
    sampler = CpuSampler(os.getpid(), server_pid, tree=False) if server_pid else None
    started = time.time()
    try:
        result = loadtest.run(url, api="openai", concurrency=concurrency, requests=requests,
                              max_tokens=output_tokens, ignore_eos=True, prompt=prompts,
                              temperature=1.0, progress=False)  # 1.0: what GuideLLM gets
    finally:
        ended = time.time()
        if sampler:
            sampler.stop()
    if sampler:
        result.cpu_share = sampler.share(started, ended)
    return result


def labkit_round(result) -> dict:
    """One `labkit loadtest` run, in the same shape as `guidellm_round`."""
    ok = result.ok_records
    s = result.summary()
    return {
        "successful": s["successful"], "failed": s["failed"],
        "output_tokens": s["output_tokens"],
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
        "stream_chunks": s["stream_chunks"],
        "ttft_ms": [r.ttft_ms for r in ok],
        "tpot_ms": [r.tpot_ms for r in ok],
        "gaps_ms": [gap for r in ok for gap in r.itl_ms or []],
        "per_request_itl_ms": [float(np.mean(r.itl_ms)) for r in ok if r.itl_ms],
        "reported": {name: {"mean": s[name]["mean"], "p50": s[name]["p50"]}
                     for name in ("ttft_ms", "itl_ms", "tpot_ms")},
        "duration_s": s["total_time_s"],
        "cpu_share": getattr(result, "cpu_share", None),
        "errors": s["errors_by_type"],
    }


def pool(rounds: list[dict]) -> dict:
    """Several rounds of one client as one: counts added, per-request values joined, CPU
    shares averaged over the measuring time."""
    pooled: dict = {"rounds": len(rounds)}
    for key, value in rounds[0].items():
        values = [r[key] for r in rounds]
        if isinstance(value, (int, float)):
            pooled[key] = sum(values)
        elif isinstance(value, list):
            pooled[key] = [v for vs in values for v in vs]
    pooled["reported_per_round"] = [r["reported"] for r in rounds]
    pooled["errors"] = [r["errors"] for r in rounds if r["errors"]]
    shares = [(r["cpu_share"], r["duration_s"]) for r in rounds if r["cpu_share"]]
    pooled["cpu_share"] = {k: sum(s[k] * d for s, d in shares) / sum(d for _, d in shares)
                           for k in ("client", "server")} if shares else None
    return pooled


def figures(client: dict, outside: bool) -> dict:
    """TTFT and ITL, mean and p50, over every request of every round, by the same arithmetic
    for both clients, each on its own definitions (module docstring)."""
    ttft = client["ttft_ms"]
    if outside:  # GuideLLM: per-request ITL, weighted by output tokens - 1, as GuideLLM does
        itl_mean = float(np.average(client["itl_ms"], weights=client["itl_weights"]))
        itl_p50 = float(np.median(client["itl_ms"]))
    else:  # labkit: pooled gaps (vLLM's ITL); per-request TPOT for the p50
        itl_mean = float(np.mean(client["gaps_ms"]))
        itl_p50 = float(np.median(client["tpot_ms"]))
    return {"ttft_ms": {"mean": float(np.mean(ttft)), "p50": float(np.median(ttft))},
            "itl_ms": {"mean": itl_mean, "p50": itl_p50}}


# --- the server's own counters ------------------------------------------------------------------

SERVER_HISTOGRAMS = {"ttft": "labkit_time_to_first_token_seconds",
                     "tpot": "labkit_time_per_output_token_seconds",
                     "queue": "labkit_request_queue_time_seconds"}


def server_counters(url: str) -> dict[str, float]:
    """labkit serve's own counters: from /metrics, requests by outcome, prompt and generation
    tokens, and the sums and counts of its TTFT, TPOT and queue-time histograms; from /stats,
    the generations started (batches)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            values[match[1] + (match[2] or "")] = float(match[3])
    counters = {outcome: values[f'labkit_requests_total{{outcome="{outcome}"}}']
                for outcome in ("served", "failed", "rejected", "cancelled")}
    counters["prompt_tokens"] = values["labkit_prompt_tokens_total"]
    counters["generation_tokens"] = values["labkit_generation_tokens_total"]
    for name, series in SERVER_HISTOGRAMS.items():
        counters[f"{name}_sum"] = values[f"{series}_sum"]
        counters[f"{name}_count"] = values[f"{series}_count"]
    with urllib.request.urlopen(url + "/stats", timeout=10) as response:
        counters["batches"] = json.load(response)["server"]["batches"]
    return counters


def counted(url: str, run):
    """Run `run()`; return its result and how much each server counter grew meanwhile."""
    before = server_counters(url)
    result = run()
    after = server_counters(url)
    return result, {k: after[k] - before[k] for k in before}


def server_view(deltas: list[dict]) -> dict:
    """Counter growth over several runs, added up: counts, and the server's own mean TTFT,
    TPOT and queue time (ms) and mean batch size over those requests."""
    total = {k: sum(d[k] for d in deltas) for k in deltas[0]}
    view = {k: int(round(total[k])) for k in ("served", "failed", "rejected", "cancelled",
                                              "prompt_tokens", "generation_tokens", "batches")}
    for name in SERVER_HISTOGRAMS:
        count = total[f"{name}_count"]
        view[f"{name}_ms_mean"] = 1000 * total[f"{name}_sum"] / count if count else None
    view["mean_batch_size"] = view["served"] / view["batches"] if view["batches"] else None
    return view


# --- the comparison -----------------------------------------------------------------------------

def compare(outside: dict, ours: dict, tolerance: float = TOLERANCE) -> list[dict]:
    rows = []
    for label, metric, stat in (("TTFT mean", "ttft_ms", "mean"), ("TTFT p50", "ttft_ms", "p50"),
                                ("ITL mean", "itl_ms", "mean"),
                                ("ITL p50 (per request)", "itl_ms", "p50")):
        g, lab = outside[metric][stat], ours[metric][stat]
        ratio = g / lab if lab else math.nan
        rows.append({"metric": label, "guidellm_ms": g, "labkit_ms": lab, "ratio": ratio,
                     "ok": abs(ratio - 1) <= tolerance})
    return rows


def count_checks(shape: dict, outside: dict, server_g: dict, ours: dict,
                 server_l: dict) -> list[dict]:
    """Each client's counts against the server's counters over that client's requests."""
    expected = shape["requests"] * shape["output_tokens"]
    rows = []
    for client, c, srv in (("guidellm", outside, server_g), ("labkit", ours, server_l)):
        for label, mine, theirs in (
                ("requests", c["successful"], srv["served"]),
                ("output tokens", c["output_tokens"], srv["generation_tokens"]),
                ("prompt tokens", c["prompt_tokens"], srv["prompt_tokens"])):
            rows.append({"client": client, "what": label, "client_count": mine,
                         "server_count": theirs, "ok": mine == theirs})
        rows.append({"client": client, "what": "output tokens = requests x output_tokens",
                     "client_count": c["output_tokens"], "server_count": expected,
                     "ok": c["output_tokens"] == expected})
        rows.append({"client": client, "what": "failed (client) / refused+failed (server)",
                     "client_count": c["failed"], "server_count": srv["rejected"] + srv["failed"],
                     "ok": c["failed"] == srv["rejected"] + srv["failed"] == 0})
        # Not a check: a sampled token that ends inside a UTF-8 character streams no text of
        # its own (its bytes go out with the next token's), so chunks can be fewer than tokens.
        rows.append({"client": client, "what": "(streamed chunks with text)",
                     "client_count": c["stream_chunks"], "server_count": srv["generation_tokens"],
                     "ok": None})
    return rows


def measure(srv, exe: str, shape: dict, *, rounds: int = 4, warmup: int = 8,
            together: bool = True, **guidellm_options) -> dict:
    """Both clients on the running server `srv` at one shape: `rounds` times GuideLLM then
    labkit loadtest (same prompts), `shape["requests"] / rounds` requests each time, so a
    machine that speeds up or slows down meanwhile weighs on both alike. `guidellm_options`
    go to `run_guidellm` (workers, tokenizer)."""
    per_round = {**shape, "requests": shape["requests"] // rounds}
    if warmup:
        loadtest.run(srv.url, api="openai", concurrency=shape["concurrency"], requests=warmup,
                     max_tokens=shape["output_tokens"], ignore_eos=True, progress=False)
    g_rounds, l_rounds, g_deltas, l_deltas, walls, first_prompts = [], [], [], [], [], None
    for i in range(rounds):
        started = time.perf_counter()
        benchmark, delta = counted(srv.url, lambda i=i: run_guidellm(
            exe, srv.url, server_pid=srv.pid, seed=42 + i, **guidellm_options, **per_round))
        walls.append(time.perf_counter() - started)
        g_rounds.append(guidellm_round(benchmark))
        g_deltas.append(delta)
        prompts = guidellm_prompts(benchmark)
        first_prompts = first_prompts or prompts
        result, delta = counted(srv.url, lambda p=prompts: run_labkit(
            srv.url, p, server_pid=srv.pid, **per_round))
        l_rounds.append(labkit_round(result))
        l_deltas.append(delta)
    outside, ours = pool(g_rounds), pool(l_rounds)
    server_g, server_l = server_view(g_deltas), server_view(l_deltas)
    shape = {**shape, "requests": per_round["requests"] * rounds, "rounds": rounds}
    counts = count_checks(shape, outside, server_g, ours, server_l)
    g_fig, l_fig = figures(outside, True), figures(ours, False)
    latency = compare(g_fig, l_fig)
    l_fig["itl_gap_p50_ms"] = float(np.median(ours["gaps_ms"]))
    l_fig["per_request_itl_p50_ms"] = float(np.median(ours["per_request_itl_ms"]))
    for client in (outside, ours):  # per-request values stay out of the JSON file
        for key in ("ttft_ms", "itl_ms", "itl_weights", "tpot_ms", "gaps_ms",
                    "per_request_itl_ms"):
            client.pop(key, None)
    row = {"shape": shape, "guidellm": {**outside, "figures": g_fig,
                                        "wall_s_per_round": walls},
           "labkit": {**ours, "figures": l_fig}, "server_during_guidellm": server_g,
           "server_during_labkit": server_l, "counts": counts, "latency": latency,
           "counts_ok": all(r["ok"] for r in counts if r["ok"] is not None),
           "latency_ok": all(r["ok"] for r in latency)}
    if together:
        row["together"] = measure_together(
            srv, exe, {k: v for k, v in shape.items() if k != "rounds"}, first_prompts,
            **guidellm_options)
    return row


def measure_together(srv, exe: str, shape: dict, prompts: list[str],
                     **guidellm_options) -> dict:
    """Both clients on the server at the same time, each at `shape`'s concurrency: GuideLLM
    starts, and labkit loadtest (GuideLLM's prompts of its first round, the same ones) starts
    as soon as GuideLLM's first request reaches the server. Both then see the same server at
    the same moments, whatever else the machine runs; the server's counters hold both clients'
    requests, so counts are checked on the sum."""
    box: dict = {}

    def outside() -> None:
        try:
            box["benchmark"] = run_guidellm(exe, srv.url, server_pid=srv.pid, seed=42,
                                            **guidellm_options, **shape)
        except BaseException as err:  # re-raised below, on this thread
            box["error"] = err

    before = server_counters(srv.url)
    thread = threading.Thread(target=outside, daemon=True)
    thread.start()
    while thread.is_alive():
        with urllib.request.urlopen(srv.url + "/stats", timeout=10) as response:
            busy = json.load(response)["server"]
        if busy["in_flight"] or busy["queue_depth"]:
            break
        time.sleep(0.02)
    started = time.time()
    result = run_labkit(srv.url, prompts, server_pid=srv.pid, **shape)
    ended = time.time()
    thread.join()
    if "error" in box:
        raise box["error"]
    after = server_counters(srv.url)
    server = server_view([{k: after[k] - before[k] for k in before}])
    benchmark = box["benchmark"]
    outside_round, ours = guidellm_round(benchmark), labkit_round(result)
    g_fig, l_fig = figures(outside_round, True), figures(ours, False)
    both = {k: outside_round[k] + ours[k] for k in ("successful", "output_tokens",
                                                     "prompt_tokens")}
    if outside_round["made"] != outside_round["successful"] + outside_round["failed"]:
        print(f"note: guidellm's scheduler made {outside_round['made']} requests "
              f"({outside_round['made_successful']} successful) but its report lists "
              f"{outside_round['successful']} successful, {outside_round['failed']} failed",
              file=sys.stderr)
    counts = [{"client": "both", "what": what, "client_count": both[key],
               "server_count": server[srv_key], "ok": both[key] == server[srv_key]}
              for what, key, srv_key in (("requests", "successful", "served"),
                                         ("output tokens", "output_tokens", "generation_tokens"),
                                         ("prompt tokens", "prompt_tokens", "prompt_tokens"))]
    g_start, g_end = benchmark["start_time"], benchmark["end_time"]
    overlap = (min(g_end, ended) - max(g_start, started)) / (max(g_end, ended)
                                                             - min(g_start, started))
    latency = compare(g_fig, l_fig)
    return {"shape": shape, "guidellm": {"figures": g_fig, "duration_s": benchmark["duration"],
                                         "successful": outside_round["successful"],
                                         "made": outside_round["made"],
                                         "failed": outside_round["failed"],
                                         "cpu_share": outside_round["cpu_share"]},
            "labkit": {"figures": l_fig, "duration_s": ended - started,
                       "failed": ours["failed"], "cpu_share": ours["cpu_share"]},
            "server": server, "overlap": overlap, "counts": counts, "latency": latency,
            "counts_ok": all(r["ok"] for r in counts) and not (outside_round["failed"]
                                                               or ours["failed"]),
            "latency_ok": all(r["ok"] for r in latency)}


# --- output -------------------------------------------------------------------------------------

def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_row(row: dict) -> None:
    shape, outside, ours = row["shape"], row["guidellm"], row["labkit"]
    print(f"--- concurrency {shape['concurrency']}: {shape['requests']} requests per client in "
          f"{shape['rounds']} rounds; measuring {outside['duration_s']:.1f} s (guidellm, "
          f"{sum(outside['wall_s_per_round']):.1f} s with its start-up), "
          f"{ours['duration_s']:.1f} s (labkit)")
    print(f"{'client':<9} {'what':<42} {'client':>8} {'server':>8}")
    for r in row["counts"]:
        verdict = {True: "ok", False: "MISMATCH", None: ""}[r["ok"]]
        print(f"{r['client']:<9} {r['what']:<42} {r['client_count']:>8} {r['server_count']:>8}"
              f"  {verdict}")
    print(f"\n{'metric (ms)':<24} {'guidellm':>9} {'labkit':>9} {'ratio':>6}")
    for r in row["latency"]:
        print(f"{r['metric']:<24} {r['guidellm_ms']:>9.2f} {r['labkit_ms']:>9.2f} "
              f"{r['ratio']:>6.3f}  {'PASS' if r['ok'] else 'FAIL'}")
    reported = outside["reported_per_round"][0]
    print(f"(guidellm's own report, round 1: TTFT mean {reported['ttft_ms']['mean']:.2f}, p50 "
          f"{reported['ttft_ms']['p50']:.2f}; ITL mean {reported['itl_ms']['mean']:.2f}, p50 "
          f"{reported['itl_ms']['p50']:.2f}. labkit: ITL p50 of single gaps "
          f"{ours['figures']['itl_gap_p50_ms']:.2f}, per-request mean ITL p50 "
          f"{ours['figures']['per_request_itl_p50_ms']:.2f})")
    print("\nthe server's own view of each client's requests (/metrics, /stats) and CPU "
          "shares while measuring (CPU s / wall s):")
    print(f"{'during':<9} {'TTFT mean':>10} {'TPOT mean':>10} {'queue mean':>11} "
          f"{'batch':>6} {'client CPU':>11} {'server CPU':>11}")
    for name, client, srv in (("guidellm", outside, row["server_during_guidellm"]),
                              ("labkit", ours, row["server_during_labkit"])):
        cpu = client["cpu_share"] or {"client": math.nan, "server": math.nan}
        print(f"{name:<9} {_ms(srv['ttft_ms_mean']):>10} {_ms(srv['tpot_ms_mean']):>10} "
              f"{_ms(srv['queue_ms_mean']):>11} {srv['mean_batch_size'] or math.nan:>6.2f} "
              f"{cpu['client']:>10.0%} {cpu['server']:>10.0%}")
    print(f"counts: {'all match' if row['counts_ok'] else 'MISMATCH'}; latency: "
          f"{'PASS' if row['latency_ok'] else 'FAIL'} (within {TOLERANCE:.0%})\n")
    if "together" in row:
        print_together(row["together"])


def print_together(t: dict) -> None:
    g, lab, srv = t["guidellm"], t["labkit"], t["server"]
    print(f"both clients at once, concurrency {t['shape']['concurrency']} each, "
          f"{t['shape']['requests']} requests each: guidellm {g['duration_s']:.1f} s, labkit "
          f"{lab['duration_s']:.1f} s, overlapping {t['overlap']:.0%} of the time; the "
          f"server: TTFT mean {_ms(srv['ttft_ms_mean'])}, TPOT mean {_ms(srv['tpot_ms_mean'])}")
    for r in t["counts"]:
        print(f"  {r['what']:<15} both clients {r['client_count']:>6}, server "
              f"{r['server_count']:>6}  {'ok' if r['ok'] else 'MISMATCH'}")
    for r in t["latency"]:
        print(f"  {r['metric']:<24} {r['guidellm_ms']:>9.2f} {r['labkit_ms']:>9.2f} "
              f"{r['ratio']:>6.3f}  {'PASS' if r['ok'] else 'FAIL'}")
    print(f"  counts: {'all match' if t['counts_ok'] else 'MISMATCH'}; latency: "
          f"{'PASS' if t['latency_ok'] else 'FAIL'} (within {TOLERANCE:.0%})\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", choices=("sequential", "batched", "continuous"),
                        default="sequential")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4],
                        help="one or more; a row each (default 1 4)")
    parser.add_argument("--requests", type=int, default=40, help="per client and row")
    parser.add_argument("--rounds", type=int, default=4,
                        help="alternate the clients this many times per row (default 4)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=8,
                        help="requests before both clients, per row")
    parser.add_argument("--guidellm", default=None,
                        help="the guidellm executable (default: $GUIDELLM, next to this "
                             "Python, or on PATH)")
    parser.add_argument("--tokenizer", default=str(ROOT / "model"),
                        help="GuideLLM's tokenizer for its synthetic prompts: a local model "
                             "directory (default: the embedded model's)")
    parser.add_argument("--guidellm-workers", type=int, default=1,
                        help="GuideLLM worker processes (default 1, see run_guidellm)")
    parser.add_argument("--together", action=argparse.BooleanOptionalAction, default=True,
                        help="after the turns, also run both clients at once (default on)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    if args.requests % args.rounds:
        parser.error("--requests must be a multiple of --rounds")
    exe = find_guidellm(args.guidellm)
    if exe is None:
        print("guidellm is not installed: pip install -e '.[bench]' (or --guidellm PATH)",
              file=sys.stderr)
        return 2
    version = guidellm_version(exe)
    env = {**OFFLINE, "OMP_WAIT_POLICY": "PASSIVE"}
    load_before = os.getloadavg()[0]
    with launch(model=args.model, device=args.device, mode=args.mode, env=env) as srv:
        rows = [measure(srv, exe, {"concurrency": c, "requests": args.requests,
                                   "prompt_tokens": args.prompt_tokens,
                                   "output_tokens": args.output_tokens},
                        rounds=args.rounds, warmup=args.warmup, together=args.together,
                        workers=args.guidellm_workers, tokenizer=args.tokenizer)
                for c in args.concurrency]
        health = json.load(urllib.request.urlopen(srv.url + "/health", timeout=10))
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
               f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"labkit serve --model {args.model} --device {args.device} --mode {args.mode} "
          f"({health['device']}; {machine})")
    print(f"guidellm {version} ({args.guidellm_workers} worker process) vs labkit loadtest "
          f"--api openai, in turns on that server: {args.prompt_tokens}-token prompts "
          f"(GuideLLM's synthetic ones by the tokenizer in {args.tokenizer}; labkit sends the "
          f"same), "
          f"{args.output_tokens} output tokens (ignore_eos), streamed /v1/completions, "
          f"{args.warmup} warm-up requests before each row\n")
    for row in rows:
        print_row(row)
    document = {"machine": machine, "server": {"model": args.model, "mode": args.mode,
                                               "device": health["device"]},
                "client": {"name": "guidellm", "version": version,
                           "workers": args.guidellm_workers},
                "warmup": args.warmup, "tolerance": TOLERANCE, "rows": rows,
                "counts_ok": all(r["counts_ok"] for r in rows),
                "latency_ok": all(r.get("together", r)["latency_ok"] for r in rows),
                "latency_ok_in_turns": all(r["latency_ok"] for r in rows)}
    print(f"counts: {'all match' if document['counts_ok'] else 'MISMATCH'}; TTFT and ITL within "
          f"{TOLERANCE:.0%}: {'PASS' if document['latency_ok'] else 'FAIL'} with both clients at "
          f"once, {'PASS' if document['latency_ok_in_turns'] else 'FAIL'} in turns")
    if args.json:
        args.json.write_text(json.dumps(loadtest_cli.finite(document), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if document["counts_ok"] and document["latency_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

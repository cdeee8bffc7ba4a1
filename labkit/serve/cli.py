"""`labkit serve`: its flags, checked, and the server they start (`labkit.serve.http`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING

from labkit.serve import access
from labkit.serve.access import API_KEY_ENV
from labkit.serve.http import create_app
from labkit.serve.lifecycle import serve
from labkit.serve.schedulers import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_RUNNING,
    DEFAULT_MAX_WAIT_MS,
    DEFAULT_STEP_TIMEOUT_S,
    SCHEDULERS,
    check_max_batch_size,
    check_max_wait_ms,
)

if TYPE_CHECKING:
    from labkit.serve.backend import Backend

log = logging.getLogger(__name__)

# `labkit.engine.quant.METHODS` and `labkit.engine.kv_cache.KV_CACHE_DTYPES`, named here so
# that `labkit serve --help` needs no torch (tests/test_quant.py and tests/test_kv_fp8.py check
# that they agree).
QUANTIZATIONS = ("none", "fp8")
KV_CACHE_DTYPES = ("auto", "fp8")
MAX_API_SERVERS = 64
AUTO_API_SERVERS, CORES_PER_API_SERVER = 4, 4  # --api-servers left out, on a GPU
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """`labkit serve`'s flags, in `--help`'s order: model and address, serving mode, the
    continuous engine, running, failure handling, access and limits, then --watch-parent."""
    _add_model_flags(parser)
    _add_mode_flags(parser)
    _add_engine_flags(parser)
    _add_running_flags(parser)
    _add_failure_flags(parser)
    _add_access_flags(parser)
    parser.add_argument("--watch-parent", action="store_true",
                        help="stop when the launching process exits or closes our stdin "
                             "(used by labkit.serve.launcher.launch)")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The model, the address to listen on, the request limit, the device and dtype."""
    parser.add_argument("--model", default="model",
                        help="model source: model (default, the embedded model), a local "
                             "directory, a cached Hub id, or synthetic:<shape>")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default loopback; 0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--max-tokens-limit", type=int, default=1024,
                        help="largest max_tokens a request may ask for (default 1024)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    parser.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32")


def _add_mode_flags(parser: argparse.ArgumentParser) -> None:
    """The serving mode and the batch it forms."""
    parser.add_argument("--mode", default="sequential", choices=sorted(SCHEDULERS),
                        help="serving mode: sequential = one generation at a time (the seed); "
                             "batched = requests waiting for the model are generated together; "
                             "continuous = requests join and leave the batch at every step")
    parser.add_argument("--max-batch-size", type=int, default=None, metavar="N",
                        help="batched mode: most requests in one batch (default "
                             f"{DEFAULT_MAX_BATCH_SIZE}); continuous mode: most requests "
                             f"decoding at once (default {DEFAULT_MAX_RUNNING})")
    parser.add_argument("--max-wait-ms", type=float, default=None, metavar="MS",
                        help="batched mode: how long a batch waits to fill after its first "
                             f"request arrives (default {DEFAULT_MAX_WAIT_MS:g})")


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Continuous mode's engine: KV cache, prefill, quantization, prefix cache, its process;
    and CUDA graphs."""
    parser.add_argument("--kv-cache-gb", type=float, default=None, metavar="GB",
                        help="continuous mode: GPU memory for the paged KV cache (default a "
                             "tenth of the card; 0.25 on the CPU); bounds how many tokens "
                             "all running requests hold together")
    parser.add_argument("--prefill-chunk", type=int, default=None, metavar="TOKENS",
                        help="continuous mode: most prompt tokens prefilled per step (default "
                             "2048); a longer prompt is prefilled over several steps")
    parser.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                        help="continuous mode: fp8 = the linear layers' weights in FP8 e4m3 "
                             "with per-channel scales, quantized at load (needs FP8 tensor "
                             "cores, compute capability 8.9+; on the CPU an eager dequantize "
                             "path, for tests); none = the model's dtype (default)")
    parser.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPES,
                        help="continuous mode: fp8 = the KV cache in FP8 e4m3, twice the tokens "
                             "in the same memory and half the bytes each decode step reads "
                             "(needs compute capability 8.9+ on a GPU); auto = the model's "
                             "dtype (default)")
    parser.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=None,
                        help="continuous mode: share the KV cache pages of prompts that start "
                             "with the same tokens, and keep them after their requests end until "
                             "the memory is needed (default on, as in vLLM); --no-prefix-cache "
                             "computes every prompt whole")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="continuous mode: run the engine in a process of its own (default "
                             "on); --no-engine-process runs it on a thread of the server, "
                             "sharing the event loop's GIL")
    parser.add_argument("--api-servers", type=int, default=None, metavar="N",
                        help="continuous mode: N API-server processes on the same port in "
                             "front of the one engine, each with its own event loop (default: "
                             f"on a GPU one per {CORES_PER_API_SERVER} CPU cores, up to "
                             f"{AUTO_API_SERVERS}; 1 on the CPU or with --no-engine-process); "
                             "streaming many requests, one process's sockets and text work "
                             "hold the engine back")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="batched mode on a GPU: replay each decode step from a CUDA graph "
                             "(default on; --no-cuda-graphs decodes eagerly, the GPU waiting "
                             "on Python between kernels)")


def _add_running_flags(parser: argparse.ArgumentParser) -> None:
    """CPU threads, warmup before serving, draining on SIGTERM."""
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for generation (default on the CPU: one less than "
                             "the cores, leaving one to the server and clients)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="throwaway generations after loading, before serving (default 1)")
    parser.add_argument("--drain-timeout", type=float, default=600.0,
                        help="on SIGTERM, seconds to wait for accepted requests (default 600)")


def _add_failure_flags(parser: argparse.ArgumentParser) -> None:
    """A wedged or dead engine: when it counts as one, and when the server then exits."""
    parser.add_argument("--engine-step-timeout", type=float, default=None, metavar="S",
                        help="continuous mode: an engine step running longer than this is a "
                             "wedged engine: its requests fail, / and /health answer 503 "
                             f"(default {DEFAULT_STEP_TIMEOUT_S:g})")
    parser.add_argument("--failure-exit-delay", type=float, default=10.0, metavar="S",
                        help="after the engine died or wedged, exit with status 3 this many "
                             "seconds later, for a supervisor to restart the server (default "
                             "10; -1: stay up, answering 503)")


def _add_access_flags(parser: argparse.ArgumentParser) -> None:
    """The 'access and limits' group: API key, Host names, timeouts, connections."""
    security = parser.add_argument_group("access and limits")
    security.add_argument("--api-key", default=None, metavar="KEY",
                          help="require 'Authorization: Bearer KEY' on every endpoint but / "
                               f"and /health (default: ${API_KEY_ENV}, which, unlike this "
                               "flag, ps and the shell's history do not show)")
    security.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                          help="a Host name the server answers (repeatable); bound to loopback "
                               "it answers only loopback names unless given more, against DNS "
                               "rebinding")
    security.add_argument("--idle-timeout", type=float, default=access.DEFAULT_IDLE_TIMEOUT_S,
                          metavar="S", help="seconds a client may take to send a request's "
                          "headers, or stay idle between requests (default "
                          f"{access.DEFAULT_IDLE_TIMEOUT_S:g})")
    security.add_argument("--body-timeout", type=float, default=access.DEFAULT_BODY_TIMEOUT_S,
                          metavar="S", help="seconds a client may take to send a body (default "
                          f"{access.DEFAULT_BODY_TIMEOUT_S:g}; then 408)")
    security.add_argument("--max-connections", type=int,
                          default=access.default_max_connections(), metavar="N",
                          help="most open connections (each API server's, where there "
                               "are several: --api-servers); more get 503 (default "
                               f"{access.DEFAULT_MAX_CONNECTIONS}, or fewer where `ulimit -n` "
                               "allows fewer open files)")


def run_cli(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s",
                        stream=sys.stderr, force=True)
    try:
        scheduler_options = _scheduler_options(args)
        engine_options = _engine_options(args)
        _check_limits(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    app_options = dict(max_tokens_limit=args.max_tokens_limit, mode=args.mode,
                       api_key=_api_key(args), body_timeout_s=args.body_timeout,
                       allowed_hosts=access.allowed_hosts(args.host, args.allowed_host),
                       **scheduler_options)
    serve_options = dict(drain_timeout_s=args.drain_timeout, idle_timeout_s=args.idle_timeout,
                         max_connections=args.max_connections,
                         failure_exit_s=args.failure_exit_delay)
    try:
        servers = _api_servers(args, app_options, serve_options)
    except OSError as err:
        return _could_not_listen(args, err)

    def load() -> Backend:
        options = dict(device=args.device, dtype=args.dtype, warmup_runs=args.warmup,
                       threads=args.threads,
                       max_batch_size=scheduler_options.get("max_batch_size"),
                       cuda_graphs=args.cuda_graphs is not False, continuous=engine_options)
        if engine_options is not None and args.engine_process is not False:
            from labkit.serve.engine_process import EngineProcessBackend

            backend = EngineProcessBackend.start(args.model, api_servers=args.api_servers or 1,
                                                 **options)
            if servers is not None:
                servers.start(backend)
            return backend
        from labkit.serve.backend import load_model_backend  # torch: on the loading thread

        return load_model_backend(args.model, **options)

    async def main() -> int:
        app = create_app(load, **app_options)
        return await serve(app, args.host, args.port, watch_parent=args.watch_parent,
                           socks=servers and servers.socks, on_ready=servers and servers.go,
                           on_stop=servers and servers.stop,
                           **serve_options)

    try:
        return asyncio.run(main())
    except OSError as err:  # address in use, permission denied
        return _could_not_listen(args, err)


def _api_key(args) -> str | None:
    """--api-key, else $LABKIT_API_KEY; said in the log, or warned about when it is missing on
    a public address."""
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if api_key:
        log.info("API key required on every endpoint but / and /health")
    elif not access.is_loopback(args.host):
        log.warning("Listening on %s with no API key: anyone who reaches this address can use "
                    "the model (set $%s)", args.host, API_KEY_ENV)
    return api_key


def _could_not_listen(args, err: OSError) -> int:
    log.error("Could not listen on %s:%s: %s. Pick another --port (0 = any free one).",
              args.host, args.port, err)
    return 1


def _api_servers(args, app_options: dict, serve_options: dict):
    """`--api-servers N` above 1: the first's sockets, bound now, and the others to start once
    the engine is ready (`labkit.serve.api_servers`); else None."""
    if (args.api_servers or 1) == 1:
        return None
    from labkit.serve import api_servers

    socks = api_servers.listen_sockets(args.host, args.port)
    return api_servers.ApiServers(args.api_servers, args.host, socks, app_options,
                                  serve_options)


# Which flags each mode takes; the others are an error in that mode.
MODE_FLAGS = {
    "sequential": (),
    "batched": ("--max-batch-size", "--max-wait-ms", "--cuda-graphs"),
    "continuous": ("--max-batch-size", "--kv-cache-gb", "--prefill-chunk", "--cuda-graphs",
                   "--engine-process", "--engine-step-timeout", "--quantization",
                   "--kv-cache-dtype", "--prefix-cache", "--api-servers"),
}


def _scheduler_options(args) -> dict:
    """The scheduler's options of the chosen mode (batched: --max-batch-size, --max-wait-ms;
    continuous: --max-batch-size); an error for a flag the mode does not take."""
    given = {"--max-batch-size": args.max_batch_size, "--max-wait-ms": args.max_wait_ms,
             "--kv-cache-gb": getattr(args, "kv_cache_gb", None),
             "--prefill-chunk": getattr(args, "prefill_chunk", None),
             "--cuda-graphs": args.cuda_graphs,
             "--engine-process": getattr(args, "engine_process", None),
             "--engine-step-timeout": getattr(args, "engine_step_timeout", None),
             "--quantization": _chosen(args, "quantization", "none"),
             "--kv-cache-dtype": _chosen(args, "kv_cache_dtype", "auto"),
             "--prefix-cache": getattr(args, "prefix_cache", None),
             "--api-servers": getattr(args, "api_servers", None)}
    wrong = [flag for flag, value in given.items()
             if value is not None and flag not in MODE_FLAGS[args.mode]]
    if wrong:
        negated = {"--cuda-graphs": args.cuda_graphs is False,
                   "--engine-process": getattr(args, "engine_process", None) is False,
                   "--prefix-cache": getattr(args, "prefix_cache", None) is False}
        names = [f.replace("--", "--no-", 1) if negated.get(f) else f for f in wrong]
        modes = [mode for mode, flags in MODE_FLAGS.items() if set(wrong) <= set(flags)]
        verb, pronoun = ("apply", "them") if len(wrong) > 1 else ("applies", "it")
        where = " or ".join(f"--mode {mode}" for mode in modes) or "another mode"
        raise ValueError(f"{' and '.join(names)} {verb} only to {where}; add "
                         f"{'it' if len(modes) == 1 else 'one'} or drop {pronoun}")
    if args.mode == "sequential":
        return {}
    default_batch = DEFAULT_MAX_BATCH_SIZE if args.mode == "batched" else DEFAULT_MAX_RUNNING
    checks = {"--max-batch-size": (default_batch, check_max_batch_size)}
    if args.mode == "batched":
        checks["--max-wait-ms"] = (DEFAULT_MAX_WAIT_MS, check_max_wait_ms)
    options = {}
    for flag, (default, check) in checks.items():
        value = default if given[flag] is None else given[flag]
        try:
            check(value)
        except ValueError as err:
            raise ValueError(f"{flag}: {err}") from None
        options[flag.removeprefix("--").replace("-", "_")] = value
    if args.mode == "continuous" and args.engine_step_timeout is not None:
        if not args.engine_step_timeout > 0:
            raise ValueError(f"--engine-step-timeout must be a positive number of seconds, got "
                             f"{args.engine_step_timeout:g}")
        options["step_timeout_s"] = args.engine_step_timeout
    return options


def _check_limits(args) -> None:
    for flag, value in (("--max-tokens-limit", args.max_tokens_limit),
                        ("--threads", 1 if args.threads is None else args.threads),
                        ("--max-connections", args.max_connections)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    for flag, value in (("--idle-timeout", args.idle_timeout),
                        ("--body-timeout", args.body_timeout),
                        ("--drain-timeout", args.drain_timeout)):
        if not value > 0:
            raise ValueError(f"{flag} must be a positive number of seconds, got {value:g}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0 to 65535 (0 picks a free one), got {args.port}")


def _engine_options(args) -> dict | None:
    """Continuous mode's engine options (KV cache memory, prefill chunk, quantization, prefix
    cache), checked; else None."""
    if args.mode != "continuous":
        return None
    options = {}
    if args.kv_cache_gb is not None:
        if not 0 < args.kv_cache_gb <= 10_000:
            raise ValueError(f"--kv-cache-gb must be a positive number of gigabytes, got "
                             f"{args.kv_cache_gb:g}")
        options["kv_cache_gb"] = args.kv_cache_gb
    if args.prefill_chunk is not None:
        if args.prefill_chunk < 1:
            raise ValueError(f"--prefill-chunk must be at least 1 token, got "
                             f"{args.prefill_chunk}")
        options["prefill_chunk"] = args.prefill_chunk
    if _chosen(args, "quantization", "none") is not None:
        from labkit.engine import quant  # torch, only when asked for

        quant.check_supported(args.device)  # a GPU without FP8 tensor cores: refused now
        options["quantization"] = args.quantization
    if _chosen(args, "kv_cache_dtype", "auto") is not None:
        from labkit.engine import quant

        quant.check_supported(args.device, "--kv-cache-dtype fp8", "--kv-cache-dtype auto")
        options["kv_cache_dtype"] = args.kv_cache_dtype
    if args.prefix_cache is not None:
        options["prefix_cache"] = args.prefix_cache
    _check_api_servers(args)
    return options


def _check_api_servers(args) -> None:
    """--api-servers checked, or chosen when left out (`_auto_api_servers`)."""
    if args.api_servers is None:
        args.api_servers = _auto_api_servers(args)
        if args.api_servers > 1:
            log.info("%d API servers in front of the engine (one per %d CPU cores, up to %d, "
                     "on a GPU); --api-servers 1 for one", args.api_servers,
                     CORES_PER_API_SERVER, AUTO_API_SERVERS)
        return
    if not 1 <= args.api_servers <= MAX_API_SERVERS:
        raise ValueError(f"--api-servers must be 1 to {MAX_API_SERVERS}, got {args.api_servers}")
    if args.api_servers > 1 and args.engine_process is False:
        raise ValueError("--api-servers above 1 needs the engine in its own process, which "
                         "they share: drop --no-engine-process")


def _auto_api_servers(args) -> int:
    """On a GPU, one API server per CORES_PER_API_SERVER cores, up to AUTO_API_SERVERS: an H100
    streaming 256 requests ran at 0.75-0.81x the engine in process behind one server and
    0.90-0.98x behind four (benchmarks/RESULTS.md, "Several API-server processes"). One on
    the CPU (the engine is the bottleneck there) or with the engine on the server's thread.
    The GPU is asked of NVML, not torch: this process should not start CUDA."""
    if args.engine_process is False or str(args.device).startswith("cpu") \
            or os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return 1
    from labkit.measure import gpu

    lib = gpu.nvml()
    try:
        if lib is None or lib.nvmlDeviceGetCount() == 0:
            return 1
    except Exception:  # noqa: BLE001 - any NVML error: no GPU we can count on
        return 1
    import torch  # the engine runs on the CPU with a CPU build of torch, GPU or not

    if torch.version.cuda is None:
        return 1
    return max(1, min(AUTO_API_SERVERS, usable_cores() // CORES_PER_API_SERVER))


def usable_cores() -> int:
    """The CPU cores this process may use: its affinity, within a cgroup's CPU quota (a
    container limited to 4 CPUs on a 128-core host has 4)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:  # cgroup v2: "<quota> <period>", or "max <period>"
        quota, period = open(CGROUP_CPU_MAX).read().split()[:2]
        if quota != "max":
            cores = min(cores or 1, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores or 1


def _chosen(args, option: str, default: str) -> str | None:
    """An option's value, None when it keeps the model's own dtype (`default`: --quantization
    none, --kv-cache-dtype auto)."""
    value = getattr(args, option, None)
    return None if value in (None, default) else value

"""`labkit` command line. Each command lives in its own module, which provides
`configure_cli(parser)` and `run_cli(args) -> int`; this file only routes."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("labkit.course.info",
             "device, driver, CUDA, torch, GPU memory, NVML, and the default model"),
    "generate": ("labkit.engine.generate_cli", "generate one completion and print its timings"),
    "download": ("labkit.engine.download", "download a Hugging Face model (needs internet)"),
    "serve": ("labkit.serve.cli", "run the HTTP inference server (the seed's API)"),
    "loadtest": ("labkit.measure.loadtest_cli",
                 "load-test a running server and print the seed's report"),
    "monitor": ("labkit.measure.monitor",
                "sample GPU utilization like `nvidia-smi dmon`, at 10 Hz"),
    "exercises": ("labkit.course.exercises", "build learner copies of the exercise notebooks"),
    "build-model": ("labkit.train", "rebuild the embedded model: corpus, tokenizer, training"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only the chosen command's module is imported
            importlib.import_module(module_name).configure_cli(cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return module.run_cli(args) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Execute notebooks top to bottom with nbclient and store their outputs: `make gpu-outputs`
runs it on a GPU machine so the committed notebooks carry real GPU numbers, and the results
each one saves become the GPU reference a CPU run prints beside its own
(notebooks/reference/, see `labkit.course.notebook`).

    python -m labkit.course.nbrun notebooks/*.ipynb [--out DIR] [--timeout 900]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from labkit.course import notebook


def execute(path: Path, out_dir: Path | None, timeout: int) -> bool:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    started = time.perf_counter()
    ok = True
    try:
        client.execute()
    except CellExecutionError as err:
        print(f"{path.name}: FAILED\n{str(err)[-3000:]}", file=sys.stderr)
        ok = False
    target = (out_dir or path.parent) / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)
    print(f"{path.name}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - started:.0f} s "
          f"-> {target}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="write here (default: in place)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args(argv)
    os.environ[notebook.SAVE_REFERENCE_ENV] = "1"  # the kernels inherit it
    results = [execute(path, args.out, args.timeout) for path in args.notebooks]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())

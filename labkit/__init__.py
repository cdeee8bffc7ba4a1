"""labkit: measure how an LLM served the simple way uses a GPU.

Sub-packages, by role (ARCHITECTURE.md draws the layers and one request's path):

- `labkit.engine`: the model and everything that runs it (loading, generation, batching).
- `labkit.serve`: the HTTP server, its request parsing, schedulers, launcher and client.
- `labkit.measure`: instruments (GPU info, utilization sampler, monitor, load tester, plots).
- `labkit.course`: what the notebooks and exercises need (parameters, checkers, experiments).
- `labkit.train`: rebuilding the embedded model.

Imports go one way: course → serve → engine, with measure beside engine (serve and course may
use it); train uses engine. `tests/test_layers.py` fails on a cycle or an upward import.
"""

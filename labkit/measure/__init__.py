"""Instruments: what the lab measures with, on any server or process.

Owns device facts (`gpu`); the utilization sampler (`utilization`) over its readers, NVML/GPM
or a server's `/stats` (`readers`); `labkit monitor` (`monitor`); the load tester (`loadtest`:
one request sent and timed in `load_client`, the command line in `loadtest_cli`, several
processes in `load_workers`) and its statistics (`loadstats`); the API key clients send
(`auth`); sweeps of the load and what their points say, `labkit loadtest --sweep` (`sweep`),
and their frontier plot (`frontier_plot`); the memory-bandwidth floor (`roofline`), cost
arithmetic (`cost`) and plots (`plots`).

May import: nothing else from labkit. Instruments see a server only through HTTP and its JSON,
so they measure labkit and any other server the same way.
"""

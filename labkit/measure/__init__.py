"""Instruments: what the lab measures with, on any server or process.

Owns device facts (`gpu`), the NVML/GPM utilization sampler (`utilization`) and `labkit monitor`
(`monitor`), the load tester (`loadtest`; from several processes, `load_workers`) and its
statistics (`loadstats`), the API key clients send (`auth`), the memory-bandwidth floor
(`roofline`), cost arithmetic (`cost`) and plots (`plots`).

May import: nothing else from labkit. Instruments see a server only through HTTP and its JSON,
so they measure labkit and any other server the same way.
"""

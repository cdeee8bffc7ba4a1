"""Serving: the engine behind HTTP.

Owns the HTTP server and its routes (`http`), the seed's /generate JSON contract (`generate_api`),
the model as the server uses it (`backend`), the schedulers that decide which requests run
together (`schedulers`), and the tools to start a server and call it (`launcher`, `client`).

May import: labkit.engine, labkit.measure (device facts for /stats), aiohttp.
"""

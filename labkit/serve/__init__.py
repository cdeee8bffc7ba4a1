"""Serving: the engine behind HTTP.

Owns the HTTP server and its routes (`http`), its lifecycle (`lifecycle`) and its command line
(`cli`); refused requests and their two error shapes (`errors`); who may use the server and how
much, and a body's arrival (`access`); a request body from its bytes to checked fields, the one
check a request gets (`schemas`); the seed's /generate JSON contract (`generate_api`) and the
OpenAI-compatible API (`openai_api`), answered whole or streamed (`streaming`); Prometheus
metrics (`metrics`); the model as the server uses it (`backend`) and the continuous engine in a
process of its own (`engine_process`, its loop there `engine_loop`), with several API-server
processes in front of it (`api_servers`); the schedulers that decide which requests run together
(`schedulers`) and hand their results back to the event loop (`relay`); and the tools to start a
server and call it (`launcher`, `client`).

May import: labkit.engine, labkit.measure (device facts for /stats), aiohttp, pydantic.
"""

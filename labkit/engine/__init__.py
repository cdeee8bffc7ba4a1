"""The engine: a model and the code that runs it.

Owns model sources and loading (`model`, `synthetic`, `download`), memory accounting (`memory`),
the request and result types with their errors (`request`), the seed's baseline, Hugging Face
`generate` one request at a time (`hf_generate`), batched decoding (`batched`) with token
sampling (`sampling`) over static caches replayed from CUDA graphs (`static_decode`).

May import: torch, transformers, huggingface_hub. Nothing else from labkit: the engine knows
no HTTP, no scheduler and no instrument.
"""

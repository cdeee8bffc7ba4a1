"""The engine: a model and the code that runs it.

Owns model sources and loading (`model`, `synthetic`, `download`, `generate_cli`), memory
accounting (`memory`), the request and result types with their errors (`request`), the seed's
baseline, Hugging Face `generate` one request at a time (`hf_generate`), batched decoding
(`batched`) with token sampling (`sampling`, its CUDA kernel `sample_kernel`) over static caches
replayed from CUDA graphs (`static_decode`), and continuous batching (`continuous`): a compact
Llama (`llama`) with its Triton kernels (`fused`, `gemv`, `paged_attention`) over a paged KV
cache (`kv_cache`), run step by step by `runner`; host values to the device without a sync
(`device`).

May import: torch, transformers, huggingface_hub, pydantic (the request's field types). Nothing
else from labkit: the engine knows no HTTP, no scheduler and no instrument.
"""

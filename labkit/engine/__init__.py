"""The engine: a model and the code that runs it.

Owns model sources and loading (`model`, `synthetic`, `download`, `generate_cli`), memory
accounting (`memory`), the request and result types with their errors (`request`), prompts in
and results out for every way of generating (`text`), the seed's baseline, Hugging Face
`generate` one request at a time (`hf_generate`), batched decoding (`batched`) with token
sampling (`sampling`, its CUDA kernel `sample_kernel`) over static caches replayed from CUDA
graphs (`static_decode`), and continuous batching (`continuous`): requests as `sequence`s,
admitted and preempted by the `scheduler` over the block tables and prefix cache of the
`block_manager`, a compact Llama (`llama`, its weights in FP8 with `quant`) with its Triton
kernels (`fused`, `gemv`, `paged_attention`) over a paged KV cache (`kv_cache`), run step by
step by `runner`; host values to the device without a sync, and CPU threads (`device`).

May import: torch, transformers, tokenizers, huggingface_hub, pydantic (the request's field types).
Nothing else from labkit: the engine knows no HTTP, no server and no instrument.
"""

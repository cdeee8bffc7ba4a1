"""The paged KV cache: every layer's keys and values in fixed-size pages, one tensor.

Token t of a sequence lives in page `block_table[t // page_size]`, at offset `t % page_size`;
which pages a sequence holds is `labkit.engine.block_manager`'s business. A CUDA decode step
attends over the pages in place (`labkit.engine.paged_attention`), other steps gather them
(`read`); each new token's key and value go to its slot (`slot`, `write_kv`).

Page 0 belongs to nobody: padding tokens write there and padded block-table entries point there,
so padded rows need no special case (their results are discarded).

The cache holds the model's dtype, or FP8 (`kv_cache_dtype="fp8"`, vLLM's `--kv-cache-dtype
fp8`): e4m3 values, one byte each, so the same memory holds twice the tokens and a decode step
reads half the cache bytes. Keys and values are stored as they are (scale 1, as vLLM without
calibrated scales; the cast saturates at ±448) and widened back to the model's dtype where
attention reads them.
"""

from __future__ import annotations

import torch

from labkit.engine.memory import kv_cache_bytes_per_token as bytes_per_token

DEFAULT_PAGE_SIZE = 16  # tokens per page
KV_CACHE_DTYPES = ("auto", "fp8")  # `labkit serve --kv-cache-dtype`: auto is the model's dtype
FP8 = torch.float8_e4m3fn


def resolve_kv_dtype(kv_cache_dtype: str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's storage dtype for `kv_cache_dtype` (one of KV_CACHE_DTYPES; None is auto);
    anything else is an error that lists what is supported."""
    if kv_cache_dtype in (None, "auto"):
        return model_dtype
    if kv_cache_dtype == "fp8":
        return FP8
    raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported; use one of "
                     f"{', '.join(KV_CACHE_DTYPES)}")


class PagedKVCache:
    """Keys and values of every layer: one tensor (layers, 2, pages, page_size, kv_heads, dim)."""

    def __init__(self, config, num_pages: int, dtype: torch.dtype, device: torch.device,
                 page_size: int = DEFAULT_PAGE_SIZE):
        if num_pages < 2:
            raise ValueError(f"a KV cache needs at least 2 pages (one is the padding page); "
                             f"got {num_pages}: grant it more memory")
        self.page_size, self.num_pages = page_size, num_pages
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = (getattr(config, "head_dim", None)
                         or config.hidden_size // config.num_attention_heads)
        self.dtype = dtype  # what the cache stores: the model's dtype, or FP8
        self.kv = torch.zeros(config.num_hidden_layers, 2, num_pages, page_size, self.kv_heads,
                              self.head_dim, dtype=dtype, device=device)

    @classmethod
    def sized(cls, config, memory_gb: float, dtype: torch.dtype, device: torch.device,
              page_size: int = DEFAULT_PAGE_SIZE) -> PagedKVCache:
        """As many pages as fit in `memory_gb` gigabytes of `dtype` (twice as many in FP8)."""
        page_bytes = bytes_per_token(config, dtype) * page_size
        return cls(config, int(memory_gb * 1e9 // page_bytes), dtype, device, page_size)

    @property
    def tokens(self) -> int:
        """Tokens the cache holds when full (the padding page not counted)."""
        return (self.num_pages - 1) * self.page_size

    def slot(self, pages: list[int], position: int) -> int:
        """Flat index (page × page_size + offset) where the token at `position` is stored."""
        return pages[position // self.page_size] * self.page_size + position % self.page_size

    def read(self, layer: int, block_table: torch.Tensor, dtype: torch.dtype | None = None):
        """Keys and values of each row's pages, in order, in `dtype` (default: as stored): two
        (rows, kv_heads, pages × page_size, dim) tensors (a gather: each row's pages copied
        side by side)."""
        rows, pages = block_table.shape
        kv = self.kv[layer, :, block_table]  # (2, rows, pages, page_size, kv_heads, dim)
        k, v = (kv if dtype is None else kv.to(dtype)).unbind(0)
        shape = (rows, pages * self.page_size, self.kv_heads, self.head_dim)
        return k.reshape(shape).transpose(1, 2), v.reshape(shape).transpose(1, 2)


# A custom op that writes in place, so torch.compile neither traces nor copies the cache: traced,
# a write into one layer's slice of this one big tensor became a copy of the whole slice.
@torch.library.custom_op("labkit::write_kv", mutates_args=("kv",))
def write_kv(kv: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """kv: (layers, 2, pages, page_size, kv_heads, dim); k, v (rows, tokens, kv_heads, dim) go
    to the flat slots (rows, tokens) of `layer`."""
    kv_heads, dim = kv.shape[-2:]
    flat = kv[layer].view(2, -1, kv_heads, dim)
    index = slots.reshape(-1)
    k, v = k.reshape(-1, kv_heads, dim).to(kv.dtype), v.reshape(-1, kv_heads, dim).to(kv.dtype)
    if kv.dtype == FP8:  # no index_copy_ for float8 on the CPU: copy the bytes
        flat, k, v = flat.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    flat[0].index_copy_(0, index, k)
    flat[1].index_copy_(0, index, v)

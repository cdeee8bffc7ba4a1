"""Model sources and loading: the embedded `model/`, a local HF directory, a cached Hub id,
or `synthetic:<shape>`. `load_model` times the load and accounts for memory."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from labkit.engine import memory, synthetic
from labkit.engine.device import set_cpu_threads

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = REPO_ROOT / "model"
REQUIRED_FILES = ("config.json", "tokenizer.json")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")

VALID_SOURCES = (
    "'model' (the embedded default model), a local Hugging Face model directory, "
    "a Hub id already in the local Hugging Face cache (e.g. meta-llama/Llama-3.2-3B-Instruct, "
    "get it with `labkit download`), or synthetic:<shape> with shape one of "
    + ", ".join(synthetic.SHAPES)
)


class ModelSourceError(ValueError):
    """The model source cannot be resolved; the message says how to fix it."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str
    synthetic: bool
    device: torch.device
    dtype: torch.dtype
    num_parameters: int
    load_time_s: float
    context_length: int
    memory_after_load: memory.MeasuredMemory = field(repr=False)

    @property
    def config(self):
        return self.model.config

    def memory_report(self) -> memory.MemoryReport:
        return memory.MemoryReport(
            model=self.name,
            dtype=str(self.dtype).removeprefix("torch."),
            parameters=self.num_parameters,
            weight_bytes=memory.weight_bytes(self.model),
            kv_bytes_per_token=memory.kv_cache_bytes_per_token(self.config, self.dtype),
            measured=self.memory_after_load,
        )


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU. An explicit 'cuda' without a GPU is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={str(device)!r} was asked for, but torch sees no CUDA GPU "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). "
            "Check `nvidia-smi`, run the container with `--gpus all`, or use device='auto'/'cpu'."
        )
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on GPUs that support it (fp16 on older ones), float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if dtype not in names:
        raise ValueError(f"dtype={dtype!r}: use one of auto, {', '.join(names)}")
    return names[dtype]


def default_model_dir() -> Path:
    """$LABKIT_MODEL_DIR if set, else the repository's committed `model/`."""
    return Path(os.environ.get("LABKIT_MODEL_DIR", DEFAULT_MODEL_DIR))


def resolve_local_path(source: str) -> Path:
    """Map a non-synthetic source to a directory holding a Hugging Face model."""
    if source == "model":
        path = Path("model") if _looks_like_model(Path("model")) else default_model_dir()
    elif Path(source).expanduser().exists():
        path = Path(source).expanduser()
    elif _looks_like_hub_id(source):
        path = _cached_hub_snapshot(source)
    else:
        raise ModelSourceError(f"Unknown model source {source!r}. Valid sources: {VALID_SOURCES}.")
    _check_model_dir(path)
    return path


def load_model(source: str = "model", device: str | torch.device = "auto",
               dtype: str | torch.dtype = "auto", seed: int = 0) -> LoadedModel:
    """Load `source` onto `device`; the wall time of the whole load is measured. On a CPU,
    torch keeps one core free for the rest of the process and machine (`set_cpu_threads`), as
    the server does: with every core, its threads spin-wait against anything else running,
    and a notebook's timings came out 10-28x slow whenever another process was busy."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor progress bar is noise in logs and notebooks
    target = resolve_device(device)
    set_cpu_threads(target.type, None)
    torch_dtype = resolve_dtype(dtype, target)
    started = time.perf_counter()
    if synthetic.is_synthetic(source):
        shape = synthetic.shape_name(source)
        model = synthetic.build_synthetic(shape, target, torch_dtype, seed=seed)
        name = f"{source} (synthetic: random weights, meaningless text)"
    else:
        path = resolve_local_path(source)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(target).eval()
        name = _display_name(source, path)
    tokenizer = load_tokenizer(tokenizer_dir(source))
    if target.type == "cuda":
        torch.cuda.synchronize(target)
    load_time = time.perf_counter() - started
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=name, source=source,
        synthetic=synthetic.is_synthetic(source), device=target, dtype=torch_dtype,
        num_parameters=memory.parameter_count(model), load_time_s=load_time,
        context_length=getattr(model.config, "max_position_embeddings", 2048),
        memory_after_load=memory.measure_gpu_memory(target),
    )


def tokenizer_dir(source: str) -> Path:
    """Where `source`'s tokenizer lives: its own directory, or the embedded model's for a
    synthetic shape. Raises ModelSourceError for a source that does not resolve."""
    return default_model_dir() if synthetic.is_synthetic(source) else resolve_local_path(source)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def describe_default_model() -> str:
    """One line on what `model/` holds, for `labkit info`."""
    path = default_model_dir()
    try:
        _check_model_dir(path)
    except ModelSourceError as err:
        return str(err)
    import json

    config = json.loads((path / "config.json").read_text())
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return (f"{path}: {config.get('model_type', '?')} model, {config.get('num_hidden_layers')} "
            f"layers, hidden {config.get('hidden_size')}, vocab {config.get('vocab_size')}, "
            f"{size / 1e6:.1f} MB on disk")


def _display_name(source: str, path: Path) -> str:
    if source == "model":
        return "embedded (model/)"
    return source


def _looks_like_model(path: Path) -> bool:
    return (path / "config.json").is_file()


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def _cached_hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelSourceError(
            f"{repo_id!r} is not in the local Hugging Face cache, and labkit never downloads at "
            f"load time. Download it first: `labkit download {repo_id} --token YOUR_HF_TOKEN`, "
            f"then use the printed directory as the source. Valid sources: {VALID_SOURCES}."
        ) from None


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelSourceError(
            f"Model directory {path} does not exist. Valid sources: {VALID_SOURCES}."
        )
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        missing.append("model weights (*.safetensors)")
    if missing:
        raise ModelSourceError(
            f"Model directory {path} is missing: {', '.join(missing)}. A Hugging Face model "
            "directory needs config.json, tokenizer files and weights. Get one with "
            "`labkit download MODEL_ID --output DIR`, or rebuild the embedded model with "
            "`make model`."
        )


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a host clock read next measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""Plain PyTorch training of a small `LlamaForCausalLM` on the Q&A corpus, and its export.

Loss is taken on answer tokens (and the closing EOS) only: the model learns to answer, not to
write questions. Held-out loss is the mean cross-entropy per answer token on examples whose
exact text never appears in training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from labkit.train.corpus import Example
from labkit.train.tokenizer import EOS, format_prompt

IGNORE = -100


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


# "default" keeps 150 CPU tokens well under a second and bf16 weights under 10 MB;
# "tiny" exists so tests can run the whole pipeline in seconds.
SHAPES = {
    "default": ModelShape(hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
                          num_key_value_heads=2, intermediate_size=640),
    "tiny": ModelShape(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128),
}


@dataclass
class TrainSettings:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 500
    eval_examples: int = 2000
    seed: int = 0
    # Wall-clock cap: after a few steps the step time is measured and, if `steps` would not
    # fit, the run (and its cosine schedule) is shortened so it ends on time.
    time_budget_s: float | None = None


@dataclass
class TrainReport:
    steps: int
    train_loss: float
    heldout_loss: float
    train_seconds: float
    tokens_seen: int
    device: str
    history: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def build_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A Llama with tied embeddings; the vocabulary is padded to a multiple of 64."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = LlamaConfig(
        vocab_size=64 * math.ceil(len(tokenizer) / 64), max_position_embeddings=1024,
        tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=eos, eos_token_id=eos,
        pad_token_id=eos, head_dim=shape.hidden_size // shape.num_attention_heads,
        **asdict(shape),
    )
    return LlamaForCausalLM(config)


def encode(tokenizer: PreTrainedTokenizerFast, examples: list[Example],
           max_len: int = 320) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per example. Prompt and answer are tokenized
    apart so the loss mask is exact; byte-level pre-tokenization splits at that boundary
    anyway, so the ids equal those of the joined text."""
    prompts = tokenizer([format_prompt(e.prompt) for e in examples],
                        add_special_tokens=False).input_ids
    answers = tokenizer([" " + e.answer + EOS for e in examples],
                        add_special_tokens=False).input_ids
    return [(p + a, len(p)) for p, a in zip(prompts, answers, strict=True) if len(p + a) <= max_len]


def make_batch(seqs: list[tuple[list[int], int]], pad_id: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (prompt and padding ignored)."""
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(seqs):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
        mask[row, :len(ids)] = 1
    return input_ids.to(device), mask.to(device), labels.to(device)


def _loss_sum(model, input_ids, mask, labels) -> tuple[torch.Tensor, int]:
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def _autocast(device: torch.device):
    # bf16 autocast on CUDA only; CPU bf16 matmuls are slow on most CPUs.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model, seqs, pad_id: int, device: torch.device, batch_size: int = 128) -> float:
    """Mean cross-entropy per answer token over `seqs`."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        with _autocast(device):
            loss, n = _loss_sum(model, *make_batch(seqs[start:start + batch_size], pad_id, device))
        total, count = total + float(loss), count + n
    model.train()
    return total / max(count, 1)


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio × lr."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: LlamaForCausalLM, train_seqs, heldout_seqs, settings: TrainSettings,
          device: torch.device, pad_id: int,
          log: Callable[[str], None] = print) -> TrainReport:
    torch.manual_seed(settings.seed)
    model.to(device).train()
    optimizer = _optimizer(model, settings, device)
    sampler = torch.Generator().manual_seed(settings.seed)
    eval_seqs = heldout_seqs[:settings.eval_examples]
    history: list[dict] = []
    tokens_seen, running = 0, []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    step, probe_started = 0, started
    while step < settings.steps:  # `steps` may shrink once, under a time budget
        if step == PROBE_SKIP:
            probe_started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        picks = torch.randint(len(train_seqs), (settings.batch_size,), generator=sampler)
        batch = make_batch([train_seqs[i] for i in picks], pad_id, device)
        loss, tokens = _train_step(model, optimizer, batch, settings.grad_clip, device)
        tokens_seen += tokens
        running.append(loss)
        if settings.time_budget_s and step + 1 == PROBE_SKIP + PROBE_STEPS:
            step_s = (time.perf_counter() - probe_started) / PROBE_STEPS
            _fit_budget(settings, step + 1, time.perf_counter() - started, step_s, log)
        last = step + 1 == settings.steps
        if (step + 1) % settings.eval_every == 0 or last:
            train_loss = float(torch.stack(running).mean())
            running = []
            heldout = evaluate(model, eval_seqs, pad_id, device)
            elapsed = time.perf_counter() - started
            history.append({"step": step + 1, "train_loss": round(train_loss, 4),
                            "heldout_loss": round(heldout, 4), "seconds": round(elapsed, 1)})
            log(f"step {step + 1:>6}/{settings.steps}  train {train_loss:.4f}  "
                f"held-out {heldout:.4f}  lr {lr_at(step, settings):.2e}  {elapsed:.0f}s")
        step += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    final = evaluate(model, heldout_seqs, pad_id, device)  # the whole held-out split
    return TrainReport(steps=settings.steps, train_loss=history[-1]["train_loss"],
                       heldout_loss=round(final, 4), train_seconds=round(seconds, 1),
                       tokens_seen=tokens_seen, device=describe_device(device), history=history)


def _optimizer(model: LlamaForCausalLM, settings: TrainSettings,
               device: torch.device) -> torch.optim.AdamW:
    # No weight decay on norms (1-D weights), the usual choice for transformers.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95),
                             fused=device.type == "cuda")


def _train_step(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, batch,
                grad_clip: float, device: torch.device) -> tuple[torch.Tensor, int]:
    """One optimizer step on `batch` (make_batch's tensors); its mean loss (detached) and the
    number of tokens it held."""
    input_ids, mask, labels = batch
    with _autocast(device):
        loss_sum, n = _loss_sum(model, input_ids, mask, labels)
    loss = loss_sum / n
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach(), int(mask.sum())


PROBE_SKIP, PROBE_STEPS = 10, 40  # the first steps pay for CUDA start-up: time later ones


def _fit_budget(settings: TrainSettings, done: int, elapsed: float, step_s: float,
                log: Callable[[str], None]) -> None:
    # Evaluations and the final pass cost extra; keep 15 % of the budget for them.
    affordable = done + int((settings.time_budget_s * 0.85 - elapsed) / step_s)
    if affordable < settings.steps:
        new_steps = max(done, affordable)
        log(f"time budget {settings.time_budget_s:.0f}s: {step_s * 1000:.1f} ms/step, "
            f"shortening the run (and its schedule) from {settings.steps} to {new_steps} steps")
        settings.steps = new_steps
        settings.eval_every = min(settings.eval_every, max(1, new_steps // 8))


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    cpu = cpu_model() or platform.processor() or "unknown CPU"
    return f"CPU ({cpu}, {torch.get_num_threads()} threads)"


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def export(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Hugging Face directory: bf16 safetensors (labkit up-casts on the CPU), the tokenizer with
    its chat template inside tokenizer_config.json, and EOS/pad in generation_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    model = model.to("cpu", dtype=torch.bfloat16).eval()
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos,
                                               pad_token_id=eos)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out, save_jinja_files=False)

"""The embedded model's build pipeline: corpus, tokenizer, a tiny end-to-end training run."""

import json
import re
import time

import pytest
import torch

from labkit.train import build, corpus, tokenizer, trainer

SEED_PROMPTS = ["Suggest a skincare routine", "Suggest a skincare routine for dry skin"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models run fastest on one thread; two threads on a busy 2-core machine spin-wait.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def examples() -> list[corpus.Example]:
    return corpus.generate_corpus(3000, seed=0)


@pytest.fixture(scope="module")
def tok(examples):
    return tokenizer.train_tokenizer(
        tokenizer.format_prompt(e.prompt) + " " + e.answer + tokenizer.EOS for e in examples[:800])


def test_corpus_is_deterministic_for_a_seed():
    assert corpus.generate_corpus(300, seed=7) == corpus.generate_corpus(300, seed=7)
    assert corpus.generate_corpus(300, seed=7) != corpus.generate_corpus(300, seed=8)


def test_corpus_is_varied(examples):
    # Thresholds sit ~10-20 % below what seed 0 gives (2,901 / 6,914 / 733 / 776), so a change
    # that collapses variety fails.
    answers = {e.answer for e in examples}
    sentences = {s for e in examples for s in re.split(r"(?<=[.!?])\s+|\n", e.answer)}
    words = {w.lower() for e in examples for w in re.findall(r"[A-Za-z-]+", e.answer)}
    assert len(answers) >= 2600
    assert len(sentences) >= 5500
    assert len(words) >= 600
    assert len({e.prompt for e in examples}) >= 600


def test_corpus_covers_the_seed_prompts_and_stays_short(examples):
    prompts = {e.prompt for e in examples}
    assert set(SEED_PROMPTS) <= prompts
    lengths = [len(e.answer.split()) for e in examples]
    assert min(lengths) >= 15 and max(lengths) <= 115
    dry = [e.answer for e in examples if e.prompt == "Suggest a skincare routine for dry skin"]
    assert dry and all(re.search(r"\bdry|tight\b", a) for a in dry)


def test_tokenizer_round_trips_text(tok):
    for text in ["For dry skin, use a creamy cleanser.\n1. Cleanser: a gentle gel.",
                 "Crème légère – 50 % SPF ✓ 日焼け止め", "  spaces\tand tabs  "]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text  # byte-level: any text survives
    eos = tok(tokenizer.EOS, add_special_tokens=False).input_ids
    assert eos == [tok.eos_token_id] == [tok.pad_token_id]
    assert len(tok) <= tokenizer.VOCAB_SIZE


def test_chat_template_gives_the_training_prefix(tok):
    prompt = "What should I use for acne-prone skin in the evening?"
    rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == tokenizer.format_prompt(prompt) == f"User: {prompt}\nAssistant:"


def test_encode_masks_the_prompt(tok, examples):
    (ids, n_prompt), = trainer.encode(tok, examples[:1])
    joined = tok(tokenizer.format_prompt(examples[0].prompt) + " " + examples[0].answer
                 + tokenizer.EOS, add_special_tokens=False).input_ids
    assert ids == joined and ids[-1] == tok.eos_token_id
    _, _, labels = trainer.make_batch([(ids, n_prompt)], tok.pad_token_id, torch.device("cpu"))
    assert (labels[0, :n_prompt] == trainer.IGNORE).all()
    assert labels[0, n_prompt:].tolist() == ids[n_prompt:]


def test_time_budget_shortens_the_run_and_its_schedule(tok, examples):
    seqs = trainer.encode(tok, examples[:64])
    model = trainer.build_model(trainer.SHAPES["tiny"], tok)
    settings = trainer.TrainSettings(steps=10_000, batch_size=2, eval_every=1000,
                                     eval_examples=8, warmup_steps=5, time_budget_s=0.001)
    report = trainer.train(model, seqs, seqs[:8], settings, torch.device("cpu"),
                           pad_id=tok.pad_token_id, log=lambda _: None)
    done = trainer.PROBE_SKIP + trainer.PROBE_STEPS
    assert report.steps == done == report.history[-1]["step"]


def test_tiny_build_end_to_end_gives_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from labkit.engine import hf_generate
    from labkit.engine.model import load_model

    started = time.perf_counter()
    # A time budget far too small cuts the 60 requested steps to the probe's 50.
    figures = build(tmp_path, steps=60, device="cpu", examples=400, batch_size=4, shape="tiny",
                    samples=True, time_budget_s=0.001)
    assert time.perf_counter() - started < 40
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "MODEL_CARD.md"):
        assert (tmp_path / name).is_file(), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["max_position_embeddings"] == 1024 and config["tie_word_embeddings"]
    assert "chat_template" in json.loads((tmp_path / "tokenizer_config.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert model.generation_config.eos_token_id == hf_tok.eos_token_id
    lm = load_model(str(tmp_path), device="cpu")
    result = hf_generate.generate(lm, "Suggest a skincare routine", max_tokens=5, temperature=0)
    assert result.tokens_generated <= 5 and lm.dtype == torch.float32

    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert f"{figures['report'].heldout_loss:.4f}" in card
    assert f"{figures['parameters']:,}" in card
    assert card.count("temperature") >= 3 and "Limitations" in card
    assert "60 steps were asked for" in card and "schedule to 50." in card

"""Model sources: the embedded default, synthetic shapes, and every bad source."""

import pytest
import torch

from labkit.engine import model as lkmodel
from labkit.engine.model import ModelSourceError, load_model


def test_default_model_loads_on_cpu_with_timing():
    lm = load_model("model", device="cpu")
    assert lm.device.type == "cpu" and lm.dtype == torch.float32  # auto dtype on CPU
    assert not lm.synthetic and "synthetic" not in lm.name
    assert lm.num_parameters > 100_000
    assert 0 < lm.load_time_s < 60
    assert lm.tokenizer.eos_token_id is not None
    assert lm.memory_report().measured.torch_allocated is None  # no GPU: nothing measured


def test_a_model_on_the_cpu_leaves_one_core_free_and_keeps_a_lower_thread_count(monkeypatch):
    """torch's threads spin-wait: with every core they fight whatever else runs (benchmarks/
    RESULTS.md). Loading on the CPU lowers them to the cores less one, never raises them, and
    a second load changes nothing."""
    from labkit.engine import device

    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr(device, "_usable_cores", lambda: 8)
        torch.set_num_threads(8)
        load_model("synthetic:tiny", device="cpu")
        assert torch.get_num_threads() == 7
        load_model("synthetic:tiny", device="cpu")
        assert torch.get_num_threads() == 7
        torch.set_num_threads(2)  # the user's own, lower: kept
        load_model("synthetic:tiny", device="cpu")
        assert torch.get_num_threads() == 2
        device.set_cpu_threads("cpu", 5)  # an explicit count (labkit serve --threads) wins
        assert torch.get_num_threads() == 5
    finally:
        torch.set_num_threads(threads)


def test_auto_device_is_cpu_without_gpu():
    assert lkmodel.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_synthetic_tiny_on_cpu_is_seeded_and_labelled():
    a = load_model("synthetic:tiny", device="cpu", seed=1)
    b = load_model("synthetic:tiny", device="cpu", seed=1)
    c = load_model("synthetic:tiny", device="cpu", seed=2)
    assert a.synthetic and "synthetic" in a.name
    weight = a.model.get_input_embeddings().weight
    assert torch.equal(weight, b.model.get_input_embeddings().weight)
    assert not torch.equal(weight, c.model.get_input_embeddings().weight)
    assert a.model.config.num_hidden_layers == 2


def test_unknown_source_lists_valid_forms():
    with pytest.raises(ModelSourceError) as err:
        load_model("not a model at all", device="cpu")
    message = str(err.value)
    assert "synthetic:<shape>" in message and "llama-3.2-3b" in message
    assert "labkit download" in message


def test_unknown_synthetic_shape_lists_shapes():
    with pytest.raises(ValueError, match="synthetic:llama-3.2-1b"):
        load_model("synthetic:gpt-5", device="cpu")


def test_directory_without_model_files_says_which_are_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError) as err:
        load_model(str(tmp_path), device="cpu")
    assert "tokenizer.json" in str(err.value) and "weights" in str(err.value)
    assert "config.json" not in str(err.value).split("missing:")[1].split(".")[0]


def test_hub_id_not_in_cache_explains_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="labkit download meta-llama/Llama-3.2-3B"):
        load_model("meta-llama/Llama-3.2-3B-Instruct", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_asked_for_without_gpu_is_an_error():
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        load_model("synthetic:tiny", device="cuda")


def test_bad_dtype_names_valid_ones():
    with pytest.raises(ValueError, match="bf16"):
        load_model("synthetic:tiny", device="cpu", dtype="int3")

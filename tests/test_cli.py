"""The labkit command line, run as a user runs it."""

import subprocess
import sys

import pytest

from labkit import cli
from labkit.engine import download

TOKEN = "hf_SECRETsecretSECRET123"


def labkit(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "labkit", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_every_command():
    out = labkit("--help").stdout
    for name in ("info", "generate", "download", "serve", "loadtest", "monitor"):
        assert name in out


def test_info_reports_the_machine_honestly():
    run = labkit("info")
    assert run.returncode == 0, run.stderr
    assert "torch" in run.stdout and "model/" in run.stdout
    import torch

    if not torch.cuda.is_available():
        assert "No GPU detected" in run.stdout


def test_generate_prints_text_and_timings():
    run = labkit("generate", "Suggest a skincare routine", "--max-tokens", "20",
                 "--temperature", "0")
    assert run.returncode == 0, run.stderr
    for label in ("load time", "TTFT", "tokens/s", "weights", "KV cache per token"):
        assert label in run.stdout


# In-process from here on (the same `main` the `labkit` script calls): a subprocess per case
# would pay a torch import each, for nothing the tests above do not already cover.

def test_generate_synthetic_is_labelled(capsys):
    assert cli.main(["generate", "hi", "--model", "synthetic:tiny", "--max-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "synthetic" in out and "5 generated" in out


@pytest.mark.parametrize("args, expected", [
    (["--max-tokens", "0"], "max_tokens"),
    (["--temperature", "5"], "temperature"),
    (["--model", "nope/nope/nope"], "Valid sources"),
])
def test_generate_bad_input_is_a_clear_error(args, expected, capsys):
    assert cli.main(["generate", "hi", *args]) == 2
    assert expected in capsys.readouterr().out


def _fail_with(monkeypatch, err):
    import huggingface_hub

    def fake_snapshot_download(*args, **kwargs):
        raise err

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(download, "_check_disk_space", lambda *a: None)


def _hub_error(cls, message):
    import httpx

    response = httpx.Response(401, request=httpx.Request("GET", "https://hub/x"))
    return cls(message, response=response)


def test_download_gated_without_token(monkeypatch, capsys, tmp_path):
    from huggingface_hub.errors import GatedRepoError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    _fail_with(monkeypatch, _hub_error(GatedRepoError, "gated"))
    assert cli.main(["download", "meta-llama/Llama-3.2-3B", "--output", str(tmp_path / "m")]) == 1
    assert "HF_TOKEN=" in capsys.readouterr().out  # the environment, not a flag ps shows


def test_download_wrong_id(monkeypatch, capsys, tmp_path):
    from huggingface_hub.errors import RepositoryNotFoundError

    _fail_with(monkeypatch, _hub_error(RepositoryNotFoundError, "404"))
    assert cli.main(["download", "nobody/nothing", "--output", str(tmp_path / "m")]) == 1
    assert "No model 'nobody/nothing'" in capsys.readouterr().out


def test_download_without_network(monkeypatch, capsys, tmp_path):
    import httpx

    _fail_with(monkeypatch, httpx.ConnectError("Name or service not known"))
    assert cli.main(["download", "a/b", "--output", str(tmp_path / "m")]) == 1
    assert "Cannot reach the Hugging Face Hub" in capsys.readouterr().out


def test_download_disk_full(monkeypatch, capsys, tmp_path):
    _fail_with(monkeypatch, OSError(28, "No space left on device"))
    assert cli.main(["download", "a/b", "--output", str(tmp_path / "m")]) == 1
    assert "disk filled up" in capsys.readouterr().out


def test_download_never_prints_the_token(monkeypatch, capsys, caplog, tmp_path):
    _fail_with(monkeypatch, RuntimeError(f"401 for Authorization: Bearer {TOKEN}"))
    assert cli.main(["download", "a/b", "--token", TOKEN, "--output", str(tmp_path / "m")]) == 1
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err + caplog.text
    assert "***" in out.out


def test_download_refuses_the_committed_model_dir(capsys):
    assert cli.main(["download", "a/b", "--output", "model"]) == 1
    assert "never overwrites" in capsys.readouterr().out


def test_download_into_repo_is_git_ignored(monkeypatch, tmp_path):
    import huggingface_hub

    target = download.REPO_ROOT / "downloads" / "test--fake"

    def fake_snapshot_download(repo_id, local_dir, **kwargs):
        local_dir.mkdir(parents=True, exist_ok=True)
        (local_dir / "config.json").write_text("{}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(download, "_check_disk_space", lambda *a: None)
    try:
        assert download.download("test/fake") == target
        ignored = subprocess.run(["git", "check-ignore", "-q", str(target / "config.json")],
                                 cwd=download.REPO_ROOT)
        assert ignored.returncode == 0
    finally:
        import shutil

        shutil.rmtree(target, ignore_errors=True)


def test_api_servers_left_out_are_one_per_four_cores_up_to_four_on_a_gpu(monkeypatch, tmp_path):
    """NVML says whether there is a GPU (no CUDA started in the server's process); the CPU, no
    NVML or the engine on the server's thread get one."""
    from types import SimpleNamespace

    from labkit.measure import gpu
    from labkit.serve import cli as serve_cli

    class FakeNvml:
        count = 1

        @classmethod
        def nvmlDeviceGetCount(cls):
            return cls.count

    def servers(cores: int, device="auto", engine_process=None) -> int:
        monkeypatch.setattr(serve_cli.os, "sched_getaffinity", lambda pid: set(range(cores)))
        return serve_cli._auto_api_servers(SimpleNamespace(device=device,
                                                           engine_process=engine_process))

    monkeypatch.setattr(gpu, "nvml", lambda: FakeNvml)
    monkeypatch.setattr(serve_cli, "CGROUP_CPU_MAX", "/nonexistent")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("torch.version.cuda", "12.8")  # a CUDA build of torch
    assert [servers(n) for n in (2, 4, 8, 12, 16, 128)] == [1, 1, 2, 3, 4, 4]
    assert servers(16, device="cpu") == servers(16, engine_process=False) == 1
    assert servers(16, device="cuda:1") == 4
    quota = tmp_path / "cpu.max"  # a container limited to 6 CPUs on a big host
    quota.write_text("600000 100000\n")
    monkeypatch.setattr(serve_cli, "CGROUP_CPU_MAX", str(quota))
    assert servers(128) == 1
    quota.write_text("max 100000\n")
    assert servers(128) == 4
    for hidden in ("", "-1"):  # the GPUs hidden from torch: the engine runs on the CPU
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert servers(16) == 1
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr("torch.version.cuda", None)  # a CPU build of torch
    assert servers(16) == 1
    monkeypatch.setattr("torch.version.cuda", "12.8")
    FakeNvml.count = 0
    assert servers(16) == 1
    monkeypatch.setattr(gpu, "nvml", lambda: None)
    assert servers(16) == 1

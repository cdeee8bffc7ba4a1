"""`labkit download MODEL_ID`: fetch a real model from the Hugging Face Hub (needs internet).

Downloads go to `downloads/` (git-ignored) or a directory you name; never into the committed
`model/`. The token is passed straight to huggingface_hub and never printed or logged.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from labkit.engine.model import DEFAULT_MODEL_DIR, REPO_ROOT

DOWNLOADS_DIR = REPO_ROOT / "downloads"
WEIGHTS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.md"]


class DownloadError(RuntimeError):
    """A download that cannot proceed; the message says what to do."""


def default_output(model_id: str) -> Path:
    return DOWNLOADS_DIR / model_id.replace("/", "--")


def check_output_dir(output: Path) -> Path:
    output = output.expanduser().resolve()
    committed = DEFAULT_MODEL_DIR.resolve()
    if output == committed or committed in output.parents:
        raise DownloadError(
            f"{output} is the committed default model; labkit never overwrites it. "
            f"Leave out --output (downloads go to {DOWNLOADS_DIR}) or choose another directory."
        )
    return output


def download(model_id: str, output: Path | None = None, token: str | None = None) -> Path:
    """Download `model_id` into `output`; raise DownloadError with a fix for each failure."""
    from huggingface_hub import snapshot_download

    output = check_output_dir(output or default_output(model_id))
    token = token or os.environ.get("HF_TOKEN") or None
    _check_disk_space(model_id, output, token)
    try:
        snapshot_download(model_id, local_dir=output, token=token, allow_patterns=WEIGHTS)
    except Exception as err:  # translate the hub's many error types into one clear message
        raise DownloadError(explain(err, model_id, token)) from None
    if not (output / "config.json").is_file():  # offline, the hub may return an empty dir
        raise DownloadError(f"Nothing usable was downloaded for {model_id} into {output}: "
                            "check your internet connection and the model id, then retry.")
    _keep_out_of_git(output)
    return output


def explain(err: Exception, model_id: str, token: str | None) -> str:
    from huggingface_hub import errors

    has_token = token is not None

    if isinstance(err, errors.GatedRepoError):
        if not has_token:
            return (f"{model_id} is gated: accept its license on its Hugging Face page, create a "
                    "read token, then set it in the environment: HF_TOKEN=YOUR_TOKEN labkit "
                    "download ...")
        return (f"{model_id} is gated and this token has no access yet: accept the license on "
                "the model's page with the account that owns the token, then retry.")
    if isinstance(err, errors.RepositoryNotFoundError):
        return (f"No model {model_id!r} on the Hub (check the spelling, e.g. "
                "meta-llama/Llama-3.2-3B-Instruct); a private model also needs HF_TOKEN.")
    if isinstance(err, errors.LocalEntryNotFoundError) or _is_network_error(err):
        return ("Cannot reach the Hugging Face Hub: check your internet connection or proxy "
                "(HTTPS_PROXY). Without internet, use the embedded model or synthetic:<shape>.")
    if isinstance(err, OSError) and err.errno == 28:
        return "The disk filled up during the download: free space or choose --output elsewhere."
    return f"Download of {model_id} failed: {type(err).__name__}: {_scrub(str(err), token)}"


def _is_network_error(err: Exception) -> bool:
    import httpx

    return isinstance(err, (httpx.ConnectError, httpx.TimeoutException, ConnectionError))


def _scrub(text: str, token: str | None) -> str:
    """Hub errors can echo request headers: never let the token reach the terminal."""
    return text.replace(token, "***") if token else text


def _check_disk_space(model_id: str, output: Path, token: str | None) -> None:
    """Compare the repo's size with free space before starting (best effort: skip if unknown)."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(model_id, token=token, files_metadata=True)
    except Exception:
        return  # the download itself will report the real problem
    needed = sum(s.size or 0 for s in info.siblings or [] if _wanted(s.rfilename))
    anchor = next((p for p in [output, *output.parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(anchor).free
    if needed > free:
        raise DownloadError(f"{model_id} needs {needed / 1e9:.1f} GB but {anchor} has only "
                            f"{free / 1e9:.1f} GB free: free space or choose --output elsewhere.")


def _wanted(name: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(name, pattern) for pattern in WEIGHTS)


def _keep_out_of_git(output: Path) -> None:
    """Inside the repository, a `.gitignore` of `*` keeps downloaded weights out of commits."""
    if REPO_ROOT.resolve() in output.parents:
        (output / ".gitignore").write_text("*\n")


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_id", help="Hugging Face id, e.g. meta-llama/Llama-3.2-3B-Instruct")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"directory (default: {DOWNLOADS_DIR}/ORG--NAME)")
    parser.add_argument("--token", default=None,
                        help="Hugging Face token for gated models; prefer HF_TOKEN in the "
                             "environment, which ps and the shell's history do not show")


def run_cli(args) -> int:
    try:
        path = download(args.model_id, args.output, args.token)
    except DownloadError as err:
        print(f"error: {err}")
        return 1
    print(f"Downloaded {args.model_id} to {path}")
    print(f"Use it with: labkit serve --model {path}")
    return 0

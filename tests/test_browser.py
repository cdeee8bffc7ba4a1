"""Issue 5's acceptance, through a real browser: JupyterLab started as `make lab` starts it, opened
in headless Chromium (Debian's `chromium`, driven by Playwright; no browser download), notebook 00
run through the UI with its ✅/⚠️ lines visible, and notebook 05's timeline figure rendered as
an image. Screenshots go to artifacts/browser/.

Skips, with the reason, where Chromium or Playwright is missing (`.ci/run` installs Chromium when
it runs as root).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from lab_server import ROOT, notebook_bytes, running_lab

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts" / "browser"
RUN_TIMEOUT_MS = 240_000  # notebook 05 runs a load test in fast mode
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook tab in front

if not CHROMIUM.exists():
    pytest.skip(f"Debian's chromium is not installed at {CHROMIUM}: `apt-get install chromium` "
                "(.ci/run does it when run as root)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is a dev dependency: pip install -e '.[dev]'")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("make") is None,
                                                   reason="`make` is not installed")]


def _notebook(prefix: str) -> Path | None:
    found = sorted((ROOT / "notebooks").glob(f"{prefix}_*.ipynb"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    before = notebook_bytes()
    # The kernels inherit the server's environment: LABKIT_CI=1 puts notebooks in fast mode.
    with running_lab(tmp_path_factory.mktemp("lab"), extra_env={"LABKIT_CI": "1"}) as lab:
        yield lab
    changed = [path for path, data in before.items() if path.read_bytes() != data]
    for path in changed:  # put back what this test wrote, then fail: it must not write at all
        path.write_bytes(before[path])
    assert not changed, f"the browser test modified committed notebooks: {changed}"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage"],  # root in a container: no sandbox
        )
        yield browser
        browser.close()


def _open(browser, lab, notebook: Path):
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.set_default_timeout(60_000)
    # A workspace of its own: no tab restored from the other test competes for the commands.
    page.goto(lab.page(f"/lab/workspaces/{notebook.stem}/tree/{notebook.name}"))
    page.wait_for_selector(f"{PANEL} .jp-Notebook .jp-Cell")
    # The session starts the notebook's kernel a moment after the page shows: running cells
    # before that makes JupyterLab ask which kernel to use.
    page.wait_for_function(
        """panel => {
            const root = document.querySelector(panel);
            const name = root && root.querySelector('.jp-KernelName');
            const state = root && root.querySelector('.jp-Notebook-ExecutionIndicator');
            return name && !/No Kernel/.test(name.textContent)
                   && state && state.dataset.status === 'idle';
        }""", arg=PANEL)
    return page


def _menu(page, menu: str, item: str) -> None:
    page.click(f".lm-MenuBar-itemLabel:text-is('{menu}')")
    page.click(f".lm-Menu-itemLabel:text-is('{item}')")


def _run_all(page) -> None:
    """Clear stored outputs, then Run ▸ Run All Cells; should JupyterLab still ask for a kernel,
    take its choice and run again (the first run then only started the kernel)."""
    page.click(f"{PANEL} .jp-Cell .jp-InputPrompt >> nth=0")  # menu commands act on focus
    _menu(page, "Edit", "Clear Outputs of All Cells")
    _menu(page, "Run", "Run All Cells")
    try:
        page.wait_for_selector(".jp-Dialog", timeout=5_000)
    except sync_api.TimeoutError:
        return
    page.click(".jp-Dialog .jp-mod-accept")
    page.wait_for_selector(".jp-Dialog", state="detached")
    _menu(page, "Run", "Run All Cells")


def _run_to_the_end(page) -> None:
    """Wait for Run All to finish (kernel idle, no cell queued), then fail with the stderr and
    error outputs if it stopped before the last cell."""
    page.wait_for_function(
        """panel => {
            const root = document.querySelector(panel);
            const prompts = [...root.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
                .map(p => p.textContent);
            const state = root.querySelector('.jp-Notebook-ExecutionIndicator');
            return prompts.some(p => /\\[\\d+\\]/.test(p)) && !prompts.some(p => p.includes('*'))
                   && state && state.dataset.status === 'idle';
        }""", arg=PANEL, timeout=RUN_TIMEOUT_MS)
    prompts = page.locator(f"{PANEL} .jp-CodeCell .jp-InputPrompt").all_inner_texts()
    not_run = [i for i, p in enumerate(prompts, 1) if not any(c.isdigit() for c in p)]
    errors = page.locator(f"{PANEL} .jp-OutputArea-output"
                          "[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
    assert not not_run, (f"Run All stopped: code cells {not_run} did not run. Errors:\n"
                         + "\n---\n".join(e[-1500:] for e in errors))


def _screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_notebook_00_runs_in_the_browser_and_shows_its_checks(lab, browser):
    notebook = _notebook("00")
    if notebook is None:
        pytest.skip("notebooks/00_*.ipynb is not written yet")
    page = _open(browser, lab, notebook)
    try:
        _run_all(page)
        _run_to_the_end(page)
        check_lines = page.locator(f"{PANEL} .jp-OutputArea-output:has-text('✅'), "
                                   f"{PANEL} .jp-OutputArea-output:has-text('⚠️')")
        assert check_lines.first.is_visible(), "no ✅/⚠️ line in notebook 00's output"
        check_lines.first.scroll_into_view_if_needed()
    finally:
        _screenshot(page, "00_check_setup")  # kept on failure too: it shows what went wrong
        page.close()


def test_notebook_05_timeline_figure_renders_as_an_image(lab, browser):
    notebook = _notebook("05")
    if notebook is None:
        pytest.skip("notebooks/05_*.ipynb is not written yet")
    page = _open(browser, lab, notebook)
    try:
        if not _has_stored_image(notebook):  # not yet run on the GPU machine: run it here
            _run_all(page)
            _run_to_the_end(page)
        image = page.locator(f"{PANEL} .jp-OutputArea-output img").first
        image.wait_for(state="visible")
        width = image.evaluate("img => img.complete ? img.naturalWidth : 0")
        assert width > 300, "the timeline figure did not render as an image"
        image.scroll_into_view_if_needed()  # the screenshot shows the figure
    finally:
        _screenshot(page, "05_gpu_utilization_timeline")
        page.close()


def _has_stored_image(notebook: Path) -> bool:
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    return any("image/png" in out.get("data", {})
               for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)

"""The web UI in a real browser (Playwright driving headless chromium), end to end on the tiny model.

Upload photos (with a hostile file name and an unreadable image among them), pick the tiny model,
start a short run, watch progress and a validation grid appear, stop, resume, finish, render a
sample, compare runs; a job that crashes shows its error while the UI keeps running. A screenshot
is kept in test-artifacts/ (the README's picture comes from this run).

Needs playwright (the `test` extra) and a chromium: $CHROMIUM, else /usr/bin/chromium (Debian's
package; .ci/run installs it). Playwright's own browser download is not used.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dreambooth.tiny import write_photos

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no chromium at {CHROMIUM} (apt-get install chromium)")]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture
def ui(tmp_path, tiny_sd_dir, free_port):
    """A workspace with the tiny model in it, and `dreambooth ui` serving it on a free loopback port."""
    ws = tmp_path / "ws"
    shutil.copytree(tiny_sd_dir, ws / "models" / "tiny-sd")
    broken = ws / "models" / "broken"  # a model folder whose UNet weights are garbage: the job crashes
    shutil.copytree(tiny_sd_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    port = free_port
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = tmp_path / "ui.log"  # a file, not a pipe: a pipe nobody reads would block the server once full
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dreambooth.cli", "ui", "--root", str(ws), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = None
    deadline = time.time() + 60
    while time.time() < deadline and url is None and proc.poll() is None:
        match = re.search(r"dreambooth ui: (http://127\.0\.0\.1:\d+/)", log.read_text())
        url = match.group(1) if match else time.sleep(0.2)
    assert url, f"the UI did not print its URL:\n{log.read_text()}"
    yield ws, url, proc
    proc.terminate()
    proc.wait(timeout=20)
    print(log.read_text()[-3000:])


def text_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


T0 = time.time()


def wait_text(page, elem_id: str, pattern: str, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = text_of(page, elem_id)
        if re.search(pattern, value):
            print(f"{time.time() - T0:6.1f}s #{elem_id}: {pattern}")
            return value
        page.wait_for_timeout(250)
    raise AssertionError(f"#{elem_id} never matched {pattern!r}; it says {value!r}")


def fill(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(value)


def set_advanced(page, values: dict) -> None:
    """Open the advanced form and the sections named by `values`' keys, then fill them in."""
    page.locator("#advanced").get_by_text("Advanced settings").click()
    for section in sorted({key.split(".")[0] for key in values}):
        page.locator(f"#section-{section}").get_by_text(section, exact=True).first.click()
    for key, value in values.items():
        fill(page, "cfg-" + key.replace(".", "-").replace("_", "-"), value)


def choose(page, elem_id: str, option: str) -> None:
    """Pick `option` in a gradio dropdown (one that accepts only its own choices)."""
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()


def files_outside(tmp_path: Path) -> set:
    return {p for p in tmp_path.rglob("*") if "ws" not in p.relative_to(tmp_path).parts[:1]}


def test_train_stop_resume_sample_in_browser(ui, tmp_path):
    ws, url, server = ui
    photos = write_photos(tmp_path / "camera", 4)
    passwd = Path("/etc/passwd").read_bytes()
    outside_before = files_outside(tmp_path)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(url)
        page.locator("#start").wait_for()
        wait_text(page, "progress", r"no job yet")  # the page's load events are done: filling in is safe now

        # the tiny model and a short run's settings (advanced form, generated from the config)
        fill(page, "model", "models/tiny-sd")
        page.keyboard.press("Enter")
        fill(page, "run-dir", "runs/first")
        set_advanced(page, {"data.resolution": "32", "data.min_size": "16", "optim.lr": "1e-3",
                            "validation.prompts": "a photo of sks dog", "validation.every_n_steps": "25",
                            "validation.num_images": "2", "validation.num_inference_steps": "2",
                            "train.max_steps": "300"})

        # photos by drag and drop (the file input behind the drop zone), then hostile uploads
        page.locator("#upload input[type=file]").set_input_files([str(p) for p in photos])
        wait_text(page, "upload-message", r"added 4 photo")
        wait_text(page, "check-message", r"4 photo\(s\) ready")
        page.locator("#upload input[type=file]").set_input_files([
            {"name": "../../etc/passwd", "mimeType": "image/png", "buffer": b"root:x:0:0:root:/root:/bin/bash\n"},
            {"name": "broken.png", "mimeType": "image/png", "buffer": b"this is not a png"}])
        upload = wait_text(page, "upload-message", r"refused")
        assert "passwd" in upload and "not an image file" in upload
        check = wait_text(page, "check-message", r"broken\.png")
        assert "4 photo(s) ready" in check
        assert Path("/etc/passwd").read_bytes() == passwd and files_outside(tmp_path) == outside_before
        assert not list(ws.rglob("passwd"))  # refused, not renamed and kept

        page.locator("#start").click()  # refused: one photo is unreadable, and the message says which
        assert "broken.png" in wait_text(page, "message", r"not ready")
        (ws / "datasets" / "subject" / "broken.png").unlink()  # the user removes it
        page.locator("#check").click()
        wait_text(page, "check-message", r"^4 photo\(s\) ready[^✗]*$")

        page.locator("#start").click()
        wait_text(page, "message", r"started: 300 steps")
        wait_text(page, "progress", r"training \| step [1-9]\d*/300", timeout=90)
        page.locator("#latest-grid img").wait_for(timeout=60_000)
        wait_text(page, "progress", r"ETA")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui-train.png"))  # the README's picture (docs/ui.png)
        page.reload()  # a reloaded page reattaches to the running job
        wait_text(page, "progress", r"step [1-9]\d*/300")
        page.locator("#latest-grid img").wait_for(timeout=30_000)
        page.locator("#stop").click()
        stopped = wait_text(page, "progress", r"stopped", timeout=60)
        step = int(re.search(r"step (\d+)/300", stopped).group(1))
        assert 0 < step < 300 and (ws / "runs" / "first" / "checkpoints" / f"step-{step:06d}").is_dir()

        page.locator("#resume").click()
        wait_text(page, "progress", r"finished \| step 300/300", timeout=120)
        assert (ws / "runs" / "first" / "model_index.json").is_file()
        page.screenshot(path=str(ARTIFACTS / "ui-finished.png"))

        # Sample tab: render from the finished run
        page.get_by_role("tab", name="Sample").click()
        choose(page, "sample-run", "runs/first")
        fill(page, "steps", "2")
        fill(page, "count", "2")
        page.locator("#render").click()
        wait_text(page, "sample-message", r"2 image\(s\) rendered", timeout=60)
        assert page.locator("#samples img").count() == 2
        assert len(list((ws / "runs" / "first" / "generated").glob("ui-*.png"))) == 1

        # Runs tab: the run's grids, card and config
        page.get_by_role("tab", name="Runs").click()
        choose(page, "run-a", "runs/first")
        page.locator("#run-a-grid img").wait_for(timeout=30_000)
        # the card as the Hub shows it: its front matter a small table, not one large heading above the run,
        # and no path of this machine in it
        card = page.locator("#run-a-card")
        card.locator("h1", has_text="DreamBooth fine-tune of").wait_for(timeout=30_000)
        headings = card.locator("h1, h2, h3, h4, h5, h6").all_inner_texts()
        assert not [h for h in headings if "library_name" in h or "tags" in h], headings
        assert card.locator("td", has_text="library_name").count() == 1
        assert str(ws) not in card.inner_text()
        choose(page, "run-b", "runs/first")  # the second panel, beside the first: two runs' grids side by side
        page.locator("#run-b-grid img").wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "ui-runs.png"))

        # a crashing job: its message is shown and the UI keeps working
        page.get_by_role("tab", name="Train").click()
        fill(page, "model", "models/broken")
        page.keyboard.press("Enter")
        fill(page, "run-dir", "runs/crash")
        set_advanced(page, {"data.resolution": "32", "data.min_size": "16"})  # the reload reset the form
        page.locator("#start").click()
        wait_text(page, "message", r"started")
        wait_text(page, "progress", r"failed", timeout=90)
        assert "could not load the unet" in text_of(page, "message")  # the job's own error, shown in the page
        page.reload()
        wait_text(page, "progress", r"failed")
        browser.close()
    assert server.poll() is None  # the UI survived the crash
    assert files_outside(tmp_path) == outside_before

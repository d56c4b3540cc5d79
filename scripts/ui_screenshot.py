"""Take the README's screenshot of the web UI (docs/ui.png) during a real run.

    python scripts/ui_screenshot.py [--steps 200] [--out docs/ui.png]

Starts `dreambooth ui` on a fresh workspace, drops the miniature world's photos of a held-out
subject onto the page, picks the bundled miniature base model, starts a run with validation
grids, and takes the screenshot once the grid of step --steps is shown; then stops the run. CPU
only, a few minutes. Needs playwright and chromium ($CHROMIUM or /usr/bin/chromium).
"""

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

from dreambooth.miniworld import world

SUBJECT = "banded_heart"  # the demo's held-out subject


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "ui.png"))
    args = parser.parse_args()
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    ws = Path(tempfile.mkdtemp(prefix="dreambooth-ui-"))
    photos = world.write_instance_images(SUBJECT, Path(tempfile.mkdtemp()) / "photos")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = ws.parent / f"{ws.name}.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "dreambooth.cli", "ui", "--root", str(ws), "--port", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        while "dreambooth ui: http" not in log.read_text():
            if server.poll() is not None:
                sys.exit(log.read_text())
            time.sleep(0.2)
        shoot(f"http://127.0.0.1:{port}/", chromium, photos, args.steps, Path(args.out))
    finally:
        server.terminate()
        server.wait(timeout=30)


def shoot(url: str, chromium: str, photos: list[Path], steps: int, out: Path) -> None:
    def field(elem_id):
        return page.locator(f"#{elem_id} textarea, #{elem_id} input").first

    def wait(elem_id, pattern, timeout=600):
        deadline = time.time() + timeout
        while not re.search(pattern, field(elem_id).input_value()):
            if time.time() > deadline:
                raise SystemExit(f"#{elem_id} never matched {pattern!r}: {field(elem_id).input_value()!r}")
            page.wait_for_timeout(500)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1080})
        page.goto(url)
        wait("progress", "no job yet")
        field("model").click()
        page.get_by_role("option", name=re.compile("miniworld base")).click()
        field("instance-prompt").fill(world.instance_prompt())
        field("run-dir").fill(f"runs/{SUBJECT}")
        page.locator("#upload input[type=file]").set_input_files([str(p) for p in photos])
        wait("check-message", r"photo\(s\) ready")
        settings = {"data.resolution": "32", "optim.lr": "1e-4", "train.max_steps": str(2 * steps),
                    "validation.prompts": "\n".join([world.instance_prompt(), *world.recontext_prompts(SUBJECT).values()]),
                    "validation.every_n_steps": str(steps // 4), "validation.num_images": "6",
                    "validation.guidance_scale": "5.0"}
        page.locator("#advanced").get_by_text("Advanced settings").click()
        for section in sorted({key.split(".")[0] for key in settings}):
            page.locator(f"#section-{section}").get_by_text(section, exact=True).first.click()
        for key, value in settings.items():
            field("cfg-" + key.replace(".", "-").replace("_", "-")).fill(value)
        page.locator("#advanced").get_by_text("Advanced settings").click()  # closed again for the picture
        page.locator("#check").click()  # again, at the 32 px resolution set above
        wait("check-message", r"^5 photo\(s\) ready[^✗]*$")
        page.locator("#start").click()
        while int((re.search(r"step (\d+)/", field("progress").input_value()) or [0, 0])[1]) < steps:
            page.wait_for_timeout(500)
        page.wait_for_timeout(2500)  # the grid of step `steps` reaches the page
        shot = out.with_suffix(".full.png")
        page.screenshot(path=str(shot))
        page.locator("#stop").click()
        wait("progress", "stopped")
        browser.close()
    Image.open(shot).convert("RGB").quantize(colors=128).save(out, optimize=True)  # < 300 KB for the README
    shot.unlink()
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()

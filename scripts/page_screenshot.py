"""A screenshot of the web page answering a question, for the docs.

    .venv/bin/python scripts/page_screenshot.py [--checkpoint outputs/synthetic] [--out docs/page.png]

Starts ``python -m m2sa_jax.serve`` on a free loopback port, opens the page in headless Chromium
(Debian's ``chromium``, driven by Playwright), uploads the first val-split example image of the
model's run, asks its question, waits for the overlay and saves a full-page screenshot. The
server is stopped by its pid whatever happens.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, log: str, timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; its log:\n"
                             + open(log).read()[-3000:])
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise SystemExit(f"the server did not answer /api/health within {timeout:.0f} s; see {log}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="outputs/synthetic")
    ap.add_argument("--out", default="docs/page.png")
    ap.add_argument("--example", type=int, default=0, help="which val-split example to ask")
    args = ap.parse_args(argv)

    from m2sa_jax.inference.service import find_examples

    examples, _toy = find_examples(args.checkpoint)
    if not examples:
        raise SystemExit(f"{args.checkpoint}: no val-split examples found (a training workdir "
                         f"whose config.json names its data root is needed)")
    image, question = examples[args.example % len(examples)]
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        raise SystemExit("chromium is missing: bash scripts/setup.sh installs it")

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    tmp = tempfile.mkdtemp(prefix="m2sa-shot-")
    log = os.path.join(tmp, "server.log")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "m2sa_jax.serve", "--checkpoint",
                                 args.checkpoint, "--port", str(port)], stdout=f,
                                stderr=subprocess.STDOUT)
    try:
        _wait_ready(url, proc, log)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                os.path.join(tmp, "profile"), executable_path=chromium, headless=True,
                viewport={"width": 1280, "height": 900}, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#submit", timeout=120_000)
            page.set_input_files("#image-in input[type=file]", image)
            page.fill("#question textarea", question)
            page.wait_for_timeout(500)
            page.click("#submit")
            page.wait_for_selector("#overlay img", timeout=300_000)
            page.locator("#timing").get_by_text("Answered in").wait_for(timeout=300_000)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            answer = page.inner_text(".m2sa-answer")
            browser.close()
        print(f"asked {question!r} about {image}\nanswer: {answer}\nscreenshot: {args.out}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

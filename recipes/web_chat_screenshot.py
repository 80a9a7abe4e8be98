"""docs/web-chat.png: the chat page of `kaki serve` in use, as `make serve` runs it (the bundled
kaki-tiny grounded in the docs index from `make index`), taken in Debian's Chromium by Playwright.

    make index && .venv/bin/python recipes/web_chat_screenshot.py [--out docs/web-chat.png]

The replies are seeded, so a rerun on the same machine takes the same picture."""

from __future__ import annotations

import argparse
import socket
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INDEX = ROOT / "work" / "index" / "pydocs.kaki-index"  # the Makefile's $(INDEX)
# One question per conversation: kaki-tiny answers a follow-up poorly (its model card says why).
QUESTIONS = ["How do I open a file for reading?", "What does len() return?"]


def serve(index: Path):
    """`kaki serve --retrieval INDEX --retrieval-k 1` on a free loopback port, in this process."""
    import uvicorn

    import kaki
    from kaki.retrieval import Retriever
    from kaki.serve.app import create_app
    from kaki.serve.engine import Engine

    llm = kaki.load(ROOT / "models" / "kaki-tiny", dtype="float32", device="cpu")
    retriever = Retriever.open(index)
    retriever.warm()
    app = create_app(Engine(llm, model_name="kaki-tiny"), retriever=retriever, retrieval_k=1)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "web-chat.png"))
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    if not INDEX.exists():
        raise SystemExit(f"{INDEX} is missing: run `make index` first")
    from playwright.sync_api import expect, sync_playwright

    server, url = serve(INDEX)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium)
            page = browser.new_page(viewport={"width": 1100, "height": 760}, device_scale_factor=1)
            page.goto(url + "/")
            expect(page.locator("#model")).to_have_text("kaki-tiny")
            page.click("#toggle-settings")
            page.fill("#set-seed", "7")
            page.click("#toggle-settings")
            for i, q in enumerate(QUESTIONS):
                if i:
                    page.click("#new-chat")
                page.fill("#input", q)
                page.press("#input", "Enter")
                expect(page.locator("#messages .msg.assistant").last).to_have_class("msg assistant done",
                                                                                   timeout=60_000)
            page.locator("#messages .source-title").last.click()
            page.fill("#input", "What does sorted() return?")
            page.screenshot(path=args.out)
            browser.close()
    finally:
        server.should_exit = True
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

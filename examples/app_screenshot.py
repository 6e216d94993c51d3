"""The README's picture of `cait app`: the page with a checkpoint and an example image,
taken in headless Debian chromium with Playwright.

    make demo   # if runs/demo/model.safetensors is missing
    .venv/bin/python examples/app_screenshot.py runs/demo/model.safetensors docs/images/app.png
"""

from __future__ import annotations

import argparse
import shutil
import socket

from cait.app import DIGIT_EXAMPLES, build_app, load_app_models, serve

VIEW_LOADED = (
    "() => { const i = document.querySelector('#sa-view img'); "
    "return i?.complete && i.naturalWidth > 0; }"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("output")
    parser.add_argument("--image", default=str(DIGIT_EXAMPLES[2]))
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    app = build_app(load_app_models([args.checkpoint]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve(app, port=port, block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium"), headless=True, args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("#image input[type=file]", args.image)
            page.wait_for_function("document.querySelector('#status')?.innerText.includes('ms.')")
            page.wait_for_function(VIEW_LOADED)
            view = page.locator("#sa-view img")
            before = view.get_attribute("src")
            box = view.bounding_box()
            page.mouse.click(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
            page.wait_for_function(
                "src => document.querySelector('#sa-view img')?.getAttribute('src') !== src",
                arg=before,
            )
            page.wait_for_timeout(500)  # the new picture drawn
            page.screenshot(path=args.output, full_page=True)
            browser.close()
    finally:
        app.close()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

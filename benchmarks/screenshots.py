"""README pictures, made by the browser test's own helpers on the bundled demo model.

python benchmarks/screenshots.py      # after `make demo-model`; writes assets/app.png, assets/report.png
python benchmarks/screenshots.py web  # writes assets/web.png: the static page, after an upload
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_app import launch, screenshot_report, stop, upload_and_read_label  # noqa: E402


def web_page() -> None:
    import tempfile
    import threading

    from playwright.sync_api import sync_playwright

    from export.web import build_web, page_server
    from tests.test_web import launch_browser

    with tempfile.TemporaryDirectory() as tmp:
        site = build_web(ROOT / "assets" / "model.onnx", Path(tmp) / "page", title="ViT shapes classifier",
                         examples=12, examples_from=ROOT / "assets" / "examples", log=lambda *_: None)  # fmt: skip
        server = page_server(site, port=0, quiet=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with sync_playwright() as p:
            browser = launch_browser(p)
            page = browser.new_page(viewport={"width": 1180, "height": 1000})
            page.goto(f"http://127.0.0.1:{server.server_port}/")
            page.evaluate("async () => { await window.vitPage.ready; }")
            page.locator("#file").set_input_files(str(ROOT / "assets" / "examples" / "drawn_heart.png"))
            page.locator("#timing:has-text('drawn_heart.png')").wait_for()
            page.screenshot(path=str(ROOT / "assets" / "web.png"), full_page=False)
            print("page shows:", page.inner_text("#status"))
            browser.close()
        server.shutdown()
    print("wrote assets/web.png")


def main() -> None:
    if sys.argv[1:] == ["web"]:
        return web_page()
    proc, url, _ = launch([], cwd=ROOT)
    try:
        label = upload_and_read_label(url, ROOT / "assets" / "examples" / "drawn_star.png", ROOT / "assets" / "app.png")
        print("app shows:", label)
    finally:
        stop(proc)
    screenshot_report(ROOT / "runs" / "demo", ROOT / "assets" / "report.png")
    print("wrote assets/app.png and assets/report.png")


if __name__ == "__main__":
    main()

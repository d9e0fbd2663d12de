"""README pictures, made by the browser test's own helpers on the bundled demo model.

python benchmarks/screenshots.py      # after `make demo-model`; writes assets/app.png, assets/report.png
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_app import launch, screenshot_report, stop, upload_and_read_label  # noqa: E402


def main() -> None:
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

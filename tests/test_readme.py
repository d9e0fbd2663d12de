"""The README's "Your own images" commands, run as written on a tiny generated folder."""

import re
import shlex
import subprocess
import sys

from gradio_client import Client, handle_file

from tests.conftest import ROOT, TINY_MODEL
from tests.test_app import launch, stop


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own images", 1)[1].split("##", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line.split("#", 1)[0]) for line in block.strip().splitlines()]


def test_readme_your_own_images_commands_work(shapes_dir, tmp_path):
    train_cmd, export_cmd, app_cmd = readme_commands()
    assert train_cmd[:2] == ["python", "train.py"] and export_cmd[:3] == ["python", "-m", "export"]
    assert app_cmd[:2] == ["python", "app.py"]
    paths = {"my_images": str(shapes_dir), "runs/mine": str(tmp_path / "run"), "mine.onnx": str(tmp_path / "m.onnx")}

    def real(cmd):
        return [sys.executable] + [paths.get(a, a) for a in cmd[1:]]

    fast = ["--epochs", "1", "--workers", "0", *TINY_MODEL]  # only the size of the run changes
    for cmd in (real(train_cmd) + fast, real(export_cmd)):
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "m.onnx").is_file()
    proc, url, _ = launch(real(app_cmd)[2:], cwd=ROOT)
    try:
        image = next((shapes_dir / "triangle").iterdir())
        label, _, _ = Client(url, verbose=False).predict(handle_file(str(image)), api_name="/predict")
        assert label["label"] in ("circle", "cross", "square", "triangle")
    finally:
        stop(proc)

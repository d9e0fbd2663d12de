"""python -m export RUN_DIR --out model.onnx [--int8] [--no-attention]
python -m export web RUN_DIR_or_model.onnx --out DIR      (a static page: the model in the browser)
python -m export serve DIR                                 (look at that page on 127.0.0.1)
python -m export space RUN_DIR_or_model.onnx --out DIR    (a Gradio Space folder)
python -m export web-runtime                               (fetch onnxruntime-web once, for offline use)"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "space":
        from export.space import main as space_main

        return space_main(argv[1:])
    if argv and argv[0] in ("web", "serve", "web-runtime"):
        from export import web

        return {"web": web.main, "serve": web.serve_main, "web-runtime": web.runtime_main}[argv[0]](argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m export",
        allow_abbrev=False,
        description=(
            "Export a training run to one ONNX file with labels and preprocessing inside, verified against PyTorch. "
            "`python -m export web SRC --out DIR` builds a static web page that runs it in the browser, "
            "`python -m export space SRC --out DIR` a Gradio Space folder."
        ),
    )
    p.add_argument("run_dir", type=Path, help="a run folder made by train.py")
    p.add_argument("--out", type=Path, default=None, help="output .onnx path (default RUN_DIR/model.onnx)")
    p.add_argument("--int8", action="store_true", help="also write an int8 copy, if it passes the accuracy gate")
    p.add_argument("--no-attention", action="store_true", help="no attention-map output")
    p.add_argument("--no-ood", action="store_true", help="no out-of-distribution score (export.ood)")
    p.add_argument("--canvas", action="store_true", help="mark the model as one for drawings: the app offers a canvas")
    p.add_argument(
        "--data", type=Path, default=None, help="the run's image folder, if it is no longer where the run was trained"
    )
    a = p.parse_args(argv)
    from export.onnx_export import ExportError, export_run
    from vit.run import RunError

    try:
        export_run(
            a.run_dir,
            a.out or a.run_dir / "model.onnx",
            attention=not a.no_attention,
            int8=a.int8,
            extra_metadata={"canvas": "true"} if a.canvas else None,
            data=a.data,
            ood=not a.no_ood,
        )
    except (ExportError, RunError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

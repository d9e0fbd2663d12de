"""What an ensemble costs at inference: the exported file of a run with several models against
the file of its first model alone, batch 1, on onnxruntime with the app's settings.

    python benchmarks/ensemble_latency.py RUN_DIR [--out benchmarks/ensemble_latency_cpu.json]

Both files are made here the way ``python -m export`` makes them (logits, attention map and
the out-of-distribution score: ``to_onnx`` with the run's fitted score), from the run's kept
weights; only their latency is measured. The two take turns in blocks of ``--calls`` calls,
``--rounds`` times, so drift in the machine hits both alike; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/ensemble_latency.py", description=__doc__, allow_abbrev=False)
    p.add_argument("run", type=Path, help="a run folder whose model is an ensemble (train.py's second model)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "ensemble_latency_cpu.json")
    a = p.parse_args(argv)

    from export.onnx_export import fit_ood, ort_session, split_inputs, to_onnx
    from vit.bench import command_line, machine
    from vit.model import members_of
    from vit.run import RunDir

    run = RunDir(a.run)
    model = run.load_model()
    members = members_of(model)
    if len(members) < 2:
        raise SystemExit(f"{a.run} holds one model: nothing to compare")
    x_val, _ = split_inputs(a.run, "val")
    score = fit_ood(model, a.run, None, x_val, log=lambda *_: None)  # the first model's, as the export's
    files = {
        f"{len(members)} models (the run's file)": to_onnx(model, True, score),
        "the first model alone": to_onnx(members[0], True, score),
    }
    sessions = {k: ort_session(v) for k, v in files.items()}
    x = x_val[:1]
    times = {k: [] for k in sessions}
    for _ in range(a.rounds):
        for name, sess in sessions.items():
            sess.run(None, {"pixel_values": x})
            t0 = time.perf_counter()
            for _ in range(a.calls):
                sess.run(None, {"pixel_values": x})
            times[name].append((time.perf_counter() - t0) / a.calls * 1000)
    ms = {k: round(statistics.median(v), 3) for k, v in times.items()}
    first, whole = ms["the first model alone"], ms[next(iter(ms))]
    doc = dict(
        command=command_line("python benchmarks/ensemble_latency.py", ["RUN", *(argv or sys.argv[1:])[1:]]),
        machine=machine(),
        image_size=list(model.config.image_size),
        batch_1_ms=ms,
        ratio=round(whole / first, 2),
    )
    print(json.dumps(doc, indent=1))
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

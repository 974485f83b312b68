"""Build the example bundle on real USDJPY history and print the benchmark tables as Markdown.

    .venv/bin/python scripts/benchmark.py [--csv ../shared/data/fx/USDJPY_H1.csv]

Runs `fxbundle build --pair USDJPY --test-data CSV` with the default settings (all candidates,
1000 timed calls each, 5000 held-out windows, the A/B test) into a temporary folder. Then it
times the FP32 model once more with fixed and with adaptive warm-up, side by side in one run.
The numbers depend on the machine and its load; record them with the machine's description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fxbundle.latency import cpu_model, measure_latency
from fxbundle.resources import default_fx_data_dir

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=default_fx_data_dir() / "USDJPY_H1.csv")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fxbundle-bench-") as scratch:
        command = [sys.executable, "-m", "fxbundle.cli", "build", "--pair", "USDJPY", "--test-data", str(args.csv), "--out", scratch, "--json"]
        started = time.perf_counter()
        completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if completed.returncode != 0:
            sys.exit(f"build failed with exit code {completed.returncode}:\n{completed.stderr[-3000:]}")
        summary = json.loads(completed.stdout)
        bundle = Path(summary["bundle"])
        metadata = json.loads((bundle / "onnx_metadata.json").read_text(encoding="utf-8"))
        fp32 = next((bundle / "MQL5").rglob("usdjpy_fp32.onnx"))
        modes = {mode: measure_latency(fp32, (1, 5, 360, 52), warmup_mode=mode, samples=1000) for mode in ("fixed", "adaptive")}

    print(f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
          f"onnxruntime {metadata['conversion']['versions']['onnxruntime']}, torch {metadata['conversion']['versions']['torch']}.")
    print(f"Command: `{' '.join(['fxbundle', *command[3:-3]])}`; build wall time {wall:.1f} s; shipped {summary['precision']}.\n")

    print("| candidate | size MB | p50 ms | p95 ms | degradation % | verdict |")
    print("|---|---|---|---|---|---|")
    for name, row in metadata["conversion"]["candidates"].items():
        verdict = "shipped" if name == summary["precision"] else (row["excluded"] or "not chosen (slower)")
        print(f"| {name} | {row['size_bytes'] / 1e6:.2f} | {row['p50_ms']} | {row['p95_ms']} | {row['degradation_pct']:.4f} | {verdict} |")
    pytorch = metadata["performance"]["pytorch"]
    if pytorch:
        print(f"| PyTorch (eager, own process) | - | {pytorch['p50_ms']} | {pytorch['p95_ms']} | - | reference |")

    print("\n| FP32 warm-up | excluded | first call ms | mean ms | p50 ms | p95 ms | p99 ms | CV | share < 5 % | CV < 0.15 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, result in modes.items():
        print(f"| {mode} | {result.warmup_calls} | {result.first_call_ms:.2f} | {result.mean_ms:.2f} | {result.p50_ms:.2f} | {result.p95_ms:.2f} | {result.p99_ms:.2f} | {result.cv:.3f} | {result.warmup_share_ok} | {result.cv_ok} |")

    print("\n| precision | RMSE PyTorch | RMSE ONNX | MAE ONNX | degradation % | max abs diff | direction agreement |")
    print("|---|---|---|---|---|---|---|")
    for name, row in metadata["accuracy"]["by_precision"].items():
        print(f"| {name} | {row['rmse_pytorch']:.6f} | {row['rmse_onnx']:.6f} | {row['mae_onnx']:.6f} | {row['degradation_pct']:.5f} | {row['max_abs_diff']:.3g} | {100 * row['direction_agreement']:.2f} % |")

    ab = metadata["conversion"]["ab_test"]
    if ab:
        print(f"\nA/B {ab['candidate']} vs {ab['baseline']} ({ab['rule']}):\n")
        print("| round | MAE degradation % | p95 candidate ms | p95 fp16 ms | p95 improvement % | verdict |")
        print("|---|---|---|---|---|---|")
        for number, row in enumerate(ab["rounds"], start=1):
            print(f"| {number} | {row['mae_degradation_pct']} | {row['p95_candidate_ms']} | {row['p95_baseline_ms']} | {row['p95_improvement_pct']} | {row['verdict']} |")
        print(f"\nVerdict: {ab['verdict']} (consistent: {ab['consistent']}).")
    checks = metadata["validation"]["checks"]
    print("\nChecks: " + ", ".join(f"{check['name']} {check['status']}" for check in checks))


if __name__ == "__main__":
    main()

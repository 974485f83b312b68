"""Train the reference model on real USDJPY H1 bars and write the example checkpoint.

    python -m fxbundle.example train [--minutes 4] [--out models/usdjpy_example_training.pt]

The split is chronological: train, validation and a held-out test period, with the 36 base
bars before each boundary dropped so that no training target reaches into a later period.
Normalization statistics are fitted on the training period only. The report puts test RMSE
next to a zero-change baseline (forecast 0 for every horizon): a few CPU minutes of training
does not beat that baseline reliably, and the card states it when it does not.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fxbundle import __version__, resources
from fxbundle.architectures import MultiTFLSTMModel
from fxbundle.checkpoint import load_checkpoint, make_checkpoint_payload
from fxbundle.config import load_pair
from fxbundle.data import EXAMPLE_TIMEFRAMES, WindowSource, load_bars_csv
from fxbundle.features import FEATURE_NAMES, FEATURE_SET_NAME

PAIR = "USDJPY"
SEQ_LEN = 360
HORIZON = 36
VALIDATION_START = np.datetime64("2020-01-01T00:00:00")
TEST_START = np.datetime64("2021-01-01T00:00:00")
HYPERPARAMETERS = {
    "n_timeframes": len(EXAMPLE_TIMEFRAMES),
    "n_features": len(FEATURE_NAMES),
    "hidden_size": 128,
    "num_layers": 2,
    "head_hidden": 128,
    "horizon": HORIZON,
    "dropout": 0.1,
}


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def chronological_split(source: WindowSource) -> Split:
    """Split window end indices by date and drop the last HORIZON bars before each boundary."""
    indices = source.end_indices()
    times = source.base.time[indices]
    train = indices[times < VALIDATION_START]
    validation = indices[(times >= VALIDATION_START) & (times < TEST_START)]
    test = indices[times >= TEST_START]
    # Embargo: a window whose targets cross the boundary would leak the next period's prices.
    train = train[train + HORIZON < validation[0]]
    validation = validation[validation + HORIZON < test[0]]
    return Split(train=train, validation=validation, test=test)


def evenly_spaced(indices: np.ndarray, count: int) -> np.ndarray:
    if len(indices) <= count:
        return indices
    return indices[np.linspace(0, len(indices) - 1, count).round().astype(int)]


def predict(model: nn.Module, source: WindowSource, indices: np.ndarray, stats, batch_size: int = 128) -> np.ndarray:
    model.eval()
    outputs = []
    with torch.no_grad():
        for windows, _ in source.windows(indices, stats, batch_size):
            outputs.append(model(torch.from_numpy(windows)).numpy())
    return np.concatenate(outputs)


def rmse(error: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(error, dtype=np.float64))))


def train(data_file: Path, out: Path, minutes: float, batch_size: int, eval_windows: int, seed: int) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pair = load_pair(PAIR)

    bars = load_bars_csv(data_file, pair.digits)
    source = WindowSource(bars, EXAMPLE_TIMEFRAMES, SEQ_LEN, HORIZON)
    split = chronological_split(source)
    stats = source.fit_normalization(split.train)

    # The network learns targets divided by their training-period RMS; the scale is folded
    # into the last Linear layer afterwards, so the exported graph outputs price units with no
    # extra scale node. Targets are not centred: the training period's mean drift would
    # otherwise be baked into every forecast as a bias.
    train_targets = source.targets(split.train)
    target_scale = np.sqrt(np.mean(np.square(train_targets, dtype=np.float64), axis=0)).astype(np.float32)

    model = MultiTFLSTMModel(**HYPERPARAMETERS)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.MSELoss()
    scale_t = torch.from_numpy(target_scale)

    started = time.monotonic()
    steps = 0
    losses = []
    model.train()
    while time.monotonic() - started < minutes * 60:
        batch = rng.choice(split.train, size=batch_size, replace=False)
        windows = torch.from_numpy(np.stack([source.window(int(i), stats) for i in batch]))
        targets = torch.from_numpy(source.targets(batch)) / scale_t
        loss = loss_fn(model(windows), targets)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        steps += 1
        losses.append(loss.item())
        if steps % 10 == 0:
            print(f"step {steps}: loss {np.mean(losses[-10:]):.4f} (MSE of RMS-scaled targets), {time.monotonic() - started:.0f} s", flush=True)
    training_seconds = time.monotonic() - started

    last_linear = model.head[-1]
    with torch.no_grad():
        last_linear.weight.mul_(scale_t[:, None])
        last_linear.bias.mul_(scale_t)
    model.eval()

    metrics = {}
    for name, indices in (("validation", split.validation), ("test", split.test)):
        chosen = evenly_spaced(indices, eval_windows)
        targets = source.targets(chosen)
        forecast = predict(model, source, chosen, stats)
        metrics[name] = {
            "windows": int(len(chosen)),
            "rmse_model": rmse(forecast - targets),
            "rmse_zero_change": rmse(targets),
            "rmse_model_h1": rmse(forecast[:, 0] - targets[:, 0]),
            "rmse_zero_change_h1": rmse(targets[:, 0]),
            "rmse_model_h36": rmse(forecast[:, -1] - targets[:, -1]),
            "rmse_zero_change_h36": rmse(targets[:, -1]),
        }

    def period(indices: np.ndarray) -> dict:
        return {"first_window_end": str(bars.time[indices[0]]), "last_window_end": str(bars.time[indices[-1]]), "windows": int(len(indices))}

    training = {
        "data_file": data_file.name,
        "data_first_bar": str(bars.time[0]),
        "data_last_bar": str(bars.time[-1]),
        "split": {"train": period(split.train), "validation": period(split.validation), "test": period(split.test)},
        "validation_start": str(VALIDATION_START),
        "test_start": str(TEST_START),
        "steps": steps,
        "batch_size": batch_size,
        "seconds": round(training_seconds, 1),
        "seed": seed,
        "optimizer": "Adam lr=1e-3, grad-norm clip 1.0",
        "final_loss_scaled": float(np.mean(losses[-10:])),
        "metrics": metrics,
        "fxbundle_version": __version__,
        "torch_version": str(torch.__version__),
    }
    payload = make_checkpoint_payload(
        model,
        "MultiTFLSTMModel",
        HYPERPARAMETERS,
        pair=PAIR,
        timeframes=list(EXAMPLE_TIMEFRAMES),
        base_timeframe="H1",
        seq_len=SEQ_LEN,
        n_features=len(FEATURE_NAMES),
        horizon=HORIZON,
        feature_set=FEATURE_SET_NAME,
        feature_names=list(FEATURE_NAMES),
        output_units="price",
        normalization=stats.to_dict(),
        digits=pair.digits,
        training=training,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, out)
    # The build loads checkpoints with weights_only=True: prove this one passes that check.
    load_checkpoint(out)
    return training


def write_model_card(training: dict, checkpoint: Path, command: str) -> Path:
    card = checkpoint.with_suffix(".md")
    test = training["metrics"]["test"]
    validation = training["metrics"]["validation"]
    margin_pct = 100.0 * (test["rmse_zero_change"] - test["rmse_model"]) / test["rmse_zero_change"]
    if margin_pct > 0:
        verdict = (
            f"On the test windows the model's RMSE is {margin_pct:.2f} % below the zero-change baseline's. "
            "A margin this small is within what a few minutes of training on noisy FX data can produce by chance."
        )
    else:
        verdict = (
            f"On the test windows the model's RMSE is {-margin_pct:.2f} % above the zero-change baseline's: "
            "it does not beat that baseline. It is an example for the pipeline, not a trading model."
        )
    split = training["split"]
    lines = [
        "# Example model card: usdjpy_example_training.pt",
        "",
        "The reference `MultiTFLSTMModel` (5 timeframes x 360 bars x 52 features -> 36 horizons,",
        "1,213,092 parameters) trained for a few CPU minutes on real USDJPY H1 bars. It exists so",
        "that `fxbundle build --pair USDJPY` runs on a real checkpoint; it is not meant to trade.",
        "",
        f"- Data: `{training['data_file']}` from the shared FX history, {training['data_first_bar']} to {training['data_last_bar']} (broker server time).",
        "- Timeframes: H1, H2, H4, H8, D1 (derived from H1); feature set `fxbundle-example-v1`.",
        "- Targets: close[t+h] - close[t] in price units (JPY), h = 1..36 H1 bars.",
        f"- Train windows: {split['train']['first_window_end']} .. {split['train']['last_window_end']} ({split['train']['windows']} windows).",
        f"- Validation windows: {split['validation']['first_window_end']} .. {split['validation']['last_window_end']} ({split['validation']['windows']}).",
        f"- Held-out test windows: {split['test']['first_window_end']} .. {split['test']['last_window_end']} ({split['test']['windows']}).",
        "- The 36 bars before each boundary are dropped; normalization statistics come from the training period only.",
        f"- Training: {training['steps']} steps of batch {training['batch_size']}, {training['seconds']} s on CPU, {training['optimizer']}, seed {training['seed']}.",
        "",
        "| period | windows | RMSE model (JPY) | RMSE zero-change (JPY) | h=1 model / zero | h=36 model / zero |",
        "|---|---|---|---|---|---|",
    ]
    for name, metrics in (("validation", validation), ("test", test)):
        lines.append(
            f"| {name} | {metrics['windows']} | {metrics['rmse_model']:.5f} | {metrics['rmse_zero_change']:.5f} | "
            f"{metrics['rmse_model_h1']:.5f} / {metrics['rmse_zero_change_h1']:.5f} | {metrics['rmse_model_h36']:.5f} / {metrics['rmse_zero_change_h36']:.5f} |"
        )
    lines += [
        "",
        verdict,
        "",
        "Reproduce:",
        "",
        "```",
        command,
        "```",
        "",
        "Training stops after a wall-clock budget, so the number of steps, and with it the weights,",
        "depends on how fast and how busy the CPU is: the same seed gives a similar checkpoint on",
        "another machine, not a bit-identical one.",
        "",
    ]
    card.write_text("\n".join(lines), encoding="utf-8")
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fxbundle.example", description="Train the example USDJPY model.")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train the reference model on USDJPY H1 bars and write the checkpoint and its card")
    train_parser.add_argument("--data", type=Path, default=resources.default_fx_data_dir() / "USDJPY_H1.csv", help="H1 bars CSV (default: %(default)s)")
    train_parser.add_argument("--out", type=Path, default=Path("models/usdjpy_example_training.pt"), help="checkpoint path (default: %(default)s)")
    train_parser.add_argument("--minutes", type=float, default=4.0, help="training time budget in minutes (default: %(default)s)")
    train_parser.add_argument("--batch-size", type=int, default=32, help="windows per training step (default: %(default)s)")
    train_parser.add_argument("--eval-windows", type=int, default=2000, help="evenly spaced windows per evaluation period (default: %(default)s)")
    train_parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    command = (
        f"python -m fxbundle.example train --minutes {args.minutes:g} --batch-size {args.batch_size} "
        f"--eval-windows {args.eval_windows} --seed {args.seed}"
    )
    training = train(args.data, args.out, args.minutes, args.batch_size, args.eval_windows, args.seed)
    card = write_model_card(training, args.out, command)
    print(json.dumps(training["metrics"], indent=2))
    print(f"wrote {args.out} and {card}")

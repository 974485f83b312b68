"""Run a bundle as a trading host would: verify it, predict, scale once, fall back from FP16 to FP32.

Example::

    runner = BundleRunner.open("dist/fxbundle-USDJPY-1.0.0")
    pips = runner.predict_pips(windows)
    runner.statistics  # FP16 results, fallbacks, recoveries, ...

Opening checks every file against manifest.json before any model is loaded. When the
bundle ships FP16 (or INT8) with its FP32 fallback, every call goes through the FP16
stability monitor (:mod:`fxbundle.monitor`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from fxbundle.bundle import verify_bundle
from fxbundle.errors import FxBundleError
from fxbundle.monitor import FP16StabilityMonitor, MonitorStatistics
from fxbundle.runtime import ScaledModel, load_bundle_model


class BundleRunner(ScaledModel):
    """A :class:`ScaledModel` on the shipped precision, guarded by checksums and the FP16 monitor."""

    monitor: FP16StabilityMonitor | None = None

    @classmethod
    def open(
        cls,
        bundle_dir: Path | str,
        clock: Callable[[], float] = time.monotonic,
        verify_checksums: bool = True,
        provider: str = "CPUExecutionProvider",
    ) -> "BundleRunner":
        bundle_dir = Path(bundle_dir)
        if verify_checksums:
            if not (bundle_dir / "manifest.json").is_file():
                raise FxBundleError("bundle.no_manifest", path=str(bundle_dir))
            problems = verify_bundle(bundle_dir)
            if problems:
                raise FxBundleError("runtime.checksum_mismatch", bundle=str(bundle_dir), problems="; ".join(problems))

        runner = cls(load_bundle_model(bundle_dir), provider=provider)
        if runner.bundle.precision != "fp32":
            fallback = ScaledModel(load_bundle_model(bundle_dir, "fp32"), provider=provider)
            runner.monitor = FP16StabilityMonitor(runner._run_primary, fallback._run, clock=clock)
        return runner

    @property
    def active_precision(self) -> str:
        if self.monitor is None or self.monitor.active_precision == "fp16":
            return self.bundle.precision
        return "fp32"

    @property
    def statistics(self) -> MonitorStatistics | None:
        return self.monitor.statistics if self.monitor else None

    def _run_primary(self, batch: np.ndarray) -> np.ndarray:
        return super()._run(batch)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self.monitor is None:
            return self._run_primary(batch)
        return self.monitor.predict(batch)

"""The converted encoder: a version's TFLite model run by LiteRT (ai-edge-litert), without TensorFlow.

Importing this module, loading a model and answering with it never imports TensorFlow: a web
worker that serves only converted versions boots in a fraction of a second and holds a fraction
of TensorFlow's memory (docs/BENCHMARKS.md). LiteRT runs the model with XNNPACK; one image per
invoke, because on this CPU batch 1 is its fastest rate per image (measured: bench/perf.py), so
a batch is a loop, and the interpreter keeps one fixed input shape (no re-allocation per call).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from service.core.errors import EncoderUnavailableError
from service.encoders import batching
from service.encoders.batching import Batcher

log = logging.getLogger(__name__)

MODEL_FILE = "encoder.tflite"  # the name it has in a version's folder
RUNTIME = "litert"

_threads = 0  # interpreter threads per model; 0: all cores


def configure_threads(threads: int) -> None:
    """Threads per model for interpreters created from now on (TF_INTRA_OP_THREADS, like TensorFlow)."""
    global _threads
    _threads = max(0, threads)


def version() -> str:
    """The installed LiteRT's version, or raise EncoderUnavailableError when it is not installed."""
    try:
        from importlib.metadata import version as installed

        import ai_edge_litert.interpreter  # noqa: F401 (the check is that it imports)

        return installed("ai-edge-litert")
    except Exception as exc:
        raise EncoderUnavailableError(f"LiteRT (ai-edge-litert) is not usable here: {exc}") from exc


class LiteEncoder:
    """A converted model with the Encoder's interface: uint8 [N, S, S, 3] in, unit vectors out."""

    runtime = RUNTIME

    def __init__(self, path: Path, describe: dict[str, Any], threads: int | None = None) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter

            self._interpreter = Interpreter(
                model_path=str(path), num_threads=threads or _threads or (os.cpu_count() or 1)
            )
            self._interpreter.allocate_tensors()
        except Exception as exc:  # a missing package, a truncated or foreign file
            raise EncoderUnavailableError(f"LiteRT could not load {path.name}: {exc}") from exc
        inp = self._interpreter.get_input_details()[0]
        out = self._interpreter.get_output_details()[0]
        shape = tuple(int(d) for d in inp["shape"])
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3 or inp["dtype"] != np.uint8:
            raise EncoderUnavailableError(f"{path.name} takes {inp['dtype']} {shape}, not uint8 [1, S, S, 3]")
        if shape[0] != 1:  # converted with a fixed batch: run one image per invoke
            self._interpreter.resize_tensor_input(inp["index"], [1, *shape[1:]])
            self._interpreter.allocate_tensors()
        self._input, self._output = inp["index"], out["index"]
        self.input_size = shape[1]
        self.dim = int(out["shape"][-1])
        self.fingerprint = str(describe.get("fingerprint", "unknown"))
        self._describe = {**describe, "runtime": RUNTIME}
        self._lock = threading.Lock()  # an interpreter runs one invoke at a time
        # Batching shares no work here (the model runs per image anyway): no waiting for company;
        # the batcher still lets one caller run every queued image while the others wait.
        self.batcher = Batcher(self._call, max_batch=64, window_s=0.0)

    def _call(self, batch: np.ndarray) -> np.ndarray:
        out = np.empty((len(batch), self.dim), np.float32)
        with self._lock:
            for i in range(len(batch)):
                self._interpreter.set_tensor(self._input, batch[i : i + 1])
                self._interpreter.invoke()
                out[i] = self._interpreter.get_tensor(self._output)[0]
        return out

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """The model's output before normalisation (what the conversion check compares)."""
        return self._call(batch)

    def encode(self, batch: np.ndarray) -> np.ndarray:
        """Embed a uint8 RGB batch [N, size, size, 3]; rows have unit length."""
        return batching.encode(self.batcher, batch, self.input_size, self.dim)

    def rows(self, batch: np.ndarray) -> np.ndarray:
        """`encode` without the normalisation, through the same batcher (and its metrics)."""
        return batching.run(self.batcher, batch, self.input_size, self.dim)

    def describe(self) -> dict[str, Any]:
        return dict(self._describe)


_cache: dict[str, LiteEncoder] = {}
_cache_lock = threading.Lock()


def load(path: Path, sha256: str, describe: dict[str, Any]) -> LiteEncoder:
    """Load a converted model once per process (by content): versions that share it share it."""
    with _cache_lock:
        encoder = _cache.get(sha256)
        if encoder is None:
            encoder = _cache[sha256] = LiteEncoder(path, describe)
            log.info("loaded converted encoder %s (%s, %d-d) with LiteRT", sha256[:12], path, encoder.dim)
        return encoder

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

from service.core import inflight
from service.core.errors import EncoderUnavailableError
from service.encoders import batching
from service.encoders.batching import Batcher

log = logging.getLogger(__name__)

MODEL_FILE = "encoder.tflite"  # the name it has in a version's folder
RUNTIME = "litert"

_threads = 0  # interpreter threads per model; 0: all cores
_lone_all_cores = False  # a pass that runs alone on the machine uses every core (inflight.py)


def configure_threads(threads: int, lone_all_cores: bool = False) -> None:
    """Threads per model for interpreters created from now on (TF_INTRA_OP_THREADS, like TensorFlow);
    with `lone_all_cores` (LONE_PASS_ALL_CORES, web workers only), a pass that finds no other
    running on the machine takes every core."""
    global _threads, _lone_all_cores
    _threads = max(0, threads)
    _lone_all_cores = lone_all_cores


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
        cores = os.cpu_count() or 1
        self._path, self._threads = path, threads or _threads or cores
        self._interpreter = self._open(self._threads)
        inp = self._interpreter.get_input_details()[0]
        out = self._interpreter.get_output_details()[0]
        shape = tuple(int(d) for d in inp["shape"])
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3 or inp["dtype"] != np.uint8:
            raise EncoderUnavailableError(f"{path.name} takes {inp['dtype']} {shape}, not uint8 [1, S, S, 3]")
        self._input, self._output = inp["index"], out["index"]
        self._one_image(self._interpreter)
        # A lone pass's interpreter on every core: made at its first use (about 20 ms, and the
        # model's packed weights again: +21 MB for MobileNetV2), so only the models that serve
        # queries on a quiet machine pay for it.
        self._lone_threads = cores if _lone_all_cores and self._threads < cores else 0
        self._lone: Any = None
        self.input_size = shape[1]
        self.dim = int(out["shape"][-1])
        self.fingerprint = str(describe.get("fingerprint", "unknown"))
        self._describe = {**describe, "runtime": RUNTIME}
        self._lock = threading.Lock()  # an interpreter runs one invoke at a time
        # Batching shares no work here (the model runs per image anyway): no waiting for company;
        # the batcher still lets one caller run every queued image while the others wait.
        self.batcher = Batcher(self._call, max_batch=64, window_s=0.0)

    def _open(self, threads: int) -> Any:
        try:
            from ai_edge_litert.interpreter import Interpreter

            interpreter = Interpreter(model_path=str(self._path), num_threads=threads)
            interpreter.allocate_tensors()
            return interpreter
        except Exception as exc:  # a missing package, a truncated or foreign file
            raise EncoderUnavailableError(f"LiteRT could not load {self._path.name}: {exc}") from exc

    def _one_image(self, interpreter: Any) -> None:
        shape = interpreter.get_input_details()[0]["shape"]
        if shape[0] != 1:  # converted with a fixed batch: run one image per invoke
            interpreter.resize_tensor_input(self._input, [1, *shape[1:]])
            interpreter.allocate_tensors()

    def _call(self, batch: np.ndarray) -> np.ndarray:
        out = np.empty((len(batch), self.dim), np.float32)
        with self._lock, inflight.forward() as alone:
            interpreter = self._lone_one() if alone and self._lone_threads else self._interpreter
            for i in range(len(batch)):
                interpreter.set_tensor(self._input, batch[i : i + 1])
                interpreter.invoke()
                out[i] = interpreter.get_tensor(self._output)[0]
        return out

    def _lone_one(self) -> Any:
        """The interpreter on every core, for a pass that runs alone on the machine; the usual one
        if it cannot be made (its file evicted from the cache since, memory): never a failed query."""
        if self._lone is None:
            try:
                lone = self._open(self._lone_threads)
                self._one_image(lone)
            except Exception as exc:  # EncoderUnavailableError, or resizing on a foreign model
                name, threads = self._path.name, self._threads
                log.warning("no all-core interpreter for %s (%s): its passes keep to %d", name, exc, threads)
                self._lone_threads = 0
                return self._interpreter
            self._lone = lone
        return self._lone

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

"""Import TensorFlow once, the way tensorflow-hub needs it (legacy tf-keras), with bounded threads."""

from __future__ import annotations

import os
import threading
from types import ModuleType

_lock = threading.Lock()
_threads = {"intra_op": 0, "inter_op": 0}  # 0: TensorFlow's default
_threads_set = False


def configure_threads(intra_op: int, inter_op: int) -> None:
    """Record TensorFlow's thread-pool sizes; they take effect when TensorFlow is first used."""
    _threads.update(intra_op=intra_op, inter_op=inter_op)


def tensorflow() -> ModuleType:
    """Return the `tensorflow` module, imported with TF_USE_LEGACY_KERAS=1 (tensorflow/hub#903)."""
    global _threads_set
    # Keras 3 cannot host hub.KerasLayer; this must be set before TensorFlow's first import.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # no C++ start-up noise (CUDA probing on CPUs)
    import tensorflow as tf

    with _lock:
        if not _threads_set:
            _threads_set = True
            try:
                if _threads["intra_op"] > 0:
                    tf.config.threading.set_intra_op_parallelism_threads(_threads["intra_op"])
                if _threads["inter_op"] > 0:
                    tf.config.threading.set_inter_op_parallelism_threads(_threads["inter_op"])
            except RuntimeError:
                pass  # TensorFlow already started its pools in this process; keep them.
    return tf


def tensorflow_hub() -> ModuleType:
    tensorflow()
    import tensorflow_hub as hub

    return hub

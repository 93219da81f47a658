"""Import TensorFlow once, the way tensorflow-hub needs it (legacy tf-keras), with bounded threads."""

from __future__ import annotations

import os
import threading
from types import ModuleType

_lock = threading.Lock()
_threads_set = False


def configure_threads(intra_op: int, inter_op: int) -> None:
    """Record TensorFlow's thread-pool sizes; they take effect when TensorFlow is first imported."""
    if intra_op > 0:
        os.environ["SIMSVC_TF_INTRA_OP"] = str(intra_op)
    if inter_op > 0:
        os.environ["SIMSVC_TF_INTER_OP"] = str(inter_op)


def tensorflow() -> ModuleType:
    """Return the `tensorflow` module, imported with TF_USE_LEGACY_KERAS=1 (tensorflow/hub#903)."""
    global _threads_set
    # Keras 3 cannot host hub.KerasLayer; this must be set before TensorFlow's first import.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    with _lock:
        if not _threads_set:
            _threads_set = True
            intra = int(os.environ.get("SIMSVC_TF_INTRA_OP", "0"))
            inter = int(os.environ.get("SIMSVC_TF_INTER_OP", "0"))
            try:
                if intra:
                    tf.config.threading.set_intra_op_parallelism_threads(intra)
                if inter:
                    tf.config.threading.set_inter_op_parallelism_threads(inter)
            except RuntimeError:
                pass  # TensorFlow already started its pools in this process; keep them.
    return tf


def tensorflow_hub() -> ModuleType:
    tensorflow()
    import tensorflow_hub as hub

    return hub

"""Catalogue and training: ingest, image decoding, the fine-tuned head, evaluation, index building."""

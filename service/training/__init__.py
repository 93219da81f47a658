"""The training pipeline: a zip in, a published version out, in named steps (plan, embed, merge,
fine-tune, stage, publish) shared by full trains (`train.py`) and item changes (`changes.py`)."""

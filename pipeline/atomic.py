"""Atomic outputs for the stages: a reader sees the old file or the new one, never half of one.

The implementation is ``models.atomic`` (the one writer of the project, placed where ``models`` can use it too:
imports only go down); this module re-exports it so stages write ``from pipeline.atomic import ...``.

    atomic_write_text(run_dir / "metrics.json", json.dumps(m))
    with atomic_dir(adapters / "arithmetic") as tmp:
        peft_model.save_pretrained(tmp)
"""

from models.atomic import atomic_dir, atomic_write_bytes, atomic_write_text, atomic_write_with, file_digest

__all__ = ["atomic_dir", "atomic_write_bytes", "atomic_write_text", "atomic_write_with", "file_digest"]

"""Atomically written results get the permissions the umask allows, not mkstemp's private 0600."""

import os
import stat

import torch

from common.atomic import atomic_dir, atomic_write_text
from models.routing.checkpoint import save_router_checkpoint


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_file_and_dir_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        f = atomic_write_text(tmp_path / "metrics.json", "{}")
        with atomic_dir(tmp_path / "adapter") as d:
            (d / "x.txt").write_text("x")
        ckpt = save_router_checkpoint(tmp_path / "router", "dlp", {"top_p": 0.6},
                                      {"w": torch.randn(2, 3)}, ["a", "b"])
    finally:
        os.umask(old)
    assert _mode(f) == 0o644
    assert _mode(tmp_path / "adapter") == 0o755
    assert all(_mode(p) == 0o644 for p in ckpt.iterdir()), {p.name: oct(_mode(p)) for p in ckpt.iterdir()}

"""Show and keep the composed config: a rich tree on the console, the same tree and the resolved YAML on disk."""

from __future__ import annotations

import io
from pathlib import Path

import rich.console
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf

from common.atomic import atomic_write_text

ORDER = ("name", "stage", "task", "tasks", "model", "adapter", "router", "data", "optim", "trainer", "logger",
         "paths")


def config_tree(cfg: DictConfig):
    """A ``rich.tree.Tree`` of the config: the main groups first, each as a YAML branch."""
    tree = rich.tree.Tree("CONFIG", guide_style="dim")
    keys = [k for k in ORDER if k in cfg] + [k for k in cfg if k not in ORDER and k != "hydra"]
    for key in keys:
        try:
            value = cfg[key]
            text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        except Exception as e:  # noqa: BLE001 an unresolvable interpolation should not hide the rest of the tree
            text = f"<unresolved: {e.__class__.__name__}>"
        tree.add(str(key), style="bold").add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark"))
    return tree


def show_and_save_config(cfg: DictConfig, run_dir, print_tree: bool = True) -> None:
    """Print the tree (when asked) and write ``config_tree.txt`` and resolved ``config.yaml`` into ``run_dir``."""
    tree = config_tree(cfg)
    if print_tree:
        rich.console.Console().print(tree)
    buf = io.StringIO()
    rich.console.Console(file=buf, width=120, color_system=None).print(tree)
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / "config_tree.txt", buf.getvalue())
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    plain.pop("hydra", None)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(plain))

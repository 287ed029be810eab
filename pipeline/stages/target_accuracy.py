"""Train a router until its validation accuracy reaches a target, and keep the curve that got it there.

MeteoRA trains its gates 15k steps x 8 sequences; a fixed, smaller step count leaves them routing tokens near
chance. ``router.train.target_accuracy`` (e.g. 0.9) trains instead until the validation token routing accuracy
first reaches the target, with ``router.train.steps`` as the upper bound: Lightning's own ``EarlyStopping``
(``stopping_threshold``, patience never running out) stops the fit, and ``AccuracyCurve`` records every
validation's (step, accuracy) and the step the target was first reached (None: not within the bound).

    curve = AccuracyCurve("val/router_accuracy", target=0.9)
    trainer = Trainer(callbacks=[*target_callbacks(curve), ...], val_check_interval=250, max_steps=15000)
    trainer.fit(...)
    curve.summary()    # {"target_accuracy": 0.9, "target_reached_step": 1750,
                       #  "router_accuracy_curve": [[250, 0.41], ...]}

Where validation also logs the accuracy on the answer tokens alone (``ANSWERS_MONITOR``: MeteoRA's gates, the
route stage's ``span_accuracies``), its curve is kept beside (``router_accuracy_answers_curve``); the target stays
on the monitored figure. The curves are part of the callback's state, so a resumed run
(pipeline/runtime/requeue.py) continues them.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping

MONITOR = "val/router_accuracy"
ANSWERS_MONITOR = "val/router_accuracy_answers"  # the same on the answer tokens, where a route stage logs it
NEVER = 10**9  # EarlyStopping's patience: only the threshold stops the fit


class AccuracyCurve(L.Callback):
    """Record ``(global step, monitored value)`` after every validation, and when ``target`` was first reached."""

    def __init__(self, monitor: str = MONITOR, target: float | None = None):
        if target is not None and not 0 < float(target) <= 1:
            raise ValueError(f"router.train.target_accuracy={target} must be in (0, 1] (or null: train all steps)")
        self.monitor, self.target = monitor, None if target is None else float(target)
        self.curve: list[list] = []
        self.answers_curve: list[list] = []  # (step, accuracy on the answer tokens), where validation logs it
        self.reached_step: int | None = None

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        step = int(trainer.global_step)
        _add_point(self.curve, step, value)
        if ANSWERS_MONITOR in trainer.callback_metrics:
            _add_point(self.answers_curve, step, float(trainer.callback_metrics[ANSWERS_MONITOR]))
        if self.target is not None and self.reached_step is None and value >= self.target:
            self.reached_step = step

    def state_dict(self):
        return {"curve": self.curve, "answers_curve": self.answers_curve, "reached_step": self.reached_step}

    def load_state_dict(self, state_dict):
        self.curve, self.reached_step = list(state_dict["curve"]), state_dict["reached_step"]
        self.answers_curve = list(state_dict.get("answers_curve", []))  # a checkpoint written before it was kept

    def summary(self) -> dict:
        return {"target_accuracy": self.target, "target_reached_step": self.reached_step,
                "router_accuracy_curve": self.curve,
                **({"router_accuracy_answers_curve": self.answers_curve} if self.answers_curve else {})}


def _add_point(curve: list, step: int, value: float) -> None:
    """Append ``[step, value]``; a validation repeated at the same step (the end of a fit) replaces its point."""
    if curve and curve[-1][0] == step:
        curve[-1][1] = round(value, 6)
    else:
        curve.append([step, round(value, 6)])


def target_callbacks(curve: AccuracyCurve) -> list:
    """The curve, plus (with a target) the EarlyStopping that ends the fit once the target is reached."""
    if curve.target is None:
        return [curve]
    stop = EarlyStopping(monitor=curve.monitor, mode="max", stopping_threshold=curve.target, patience=NEVER,
                         check_on_train_epoch_end=False, strict=True)
    return [curve, stop]


__all__ = ["ANSWERS_MONITOR", "AccuracyCurve", "target_callbacks"]

"""`train(options)`: the trainer --task asks for, run to the end; returns the run directory."""

from __future__ import annotations

from pathlib import Path

from kaki.train.classify_loop import ClassifierTrainer
from kaki.train.loop import Trainer
from kaki.train.options import TrainOptions


def train(o: TrainOptions) -> Path:
    if o.task != "causal-lm":
        return ClassifierTrainer(o).run()
    return Trainer(o).run()

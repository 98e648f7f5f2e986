"""Training: a loop any objective can drive, and pretraining as the first objective.

    config.py      TrainConfig (every setting, commented) and the one validation pass
    objectives.py  Objective: a batch in, (loss, metrics) out; NextToken for pretraining
    loop.py        Trainer: accumulation, clipping, schedule, eval, checkpoints, exact resume,
                   NaN guard, Ctrl-C, progress bar, JSONL log, plots
    checkpoint.py  atomic, checksummed checkpoints; load_model
    pretrain.py    train(cfg): text in, a trained model out (what `tinylm train` runs)
"""
from tinylm.train.checkpoint import CheckpointError, load_checkpoint, load_model
from tinylm.train.config import TrainConfig, validate
from tinylm.train.loop import Trainer, loss_report
from tinylm.train.objectives import NextToken, Objective
from tinylm.train.plots import plot_losses
from tinylm.train.pretrain import BatchSampler, evaluate, fixed_batches, train

__all__ = ["BatchSampler", "CheckpointError", "NextToken", "Objective", "TrainConfig", "Trainer", "evaluate",
           "fixed_batches", "load_checkpoint", "load_model", "loss_report", "plot_losses", "train", "validate"]

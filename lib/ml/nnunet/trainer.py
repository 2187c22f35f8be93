"""nnU-Net v2's trainer with its schedule from the environment; imported only in the child
processes of :mod:`lib.ml.nnunet.jobs` (it imports nnU-Net at module level).

``nnUNetTrainerSpine1k`` is ``nnUNetTrainer`` — same network, loss, augmentation, optimiser and
poly learning-rate schedule — with four settings read from the environment:

* ``SPINE1K_NNUNET_EPOCHS`` (nnU-Net: 1000) and ``SPINE1K_NNUNET_ITERATIONS`` (iterations per
  epoch, nnU-Net: 250; validation iterations scale with it, nnU-Net: 50);
* ``SPINE1K_NNUNET_BUDGET_S``: a wall-clock budget for the training loop (0: none). After each
  epoch the number of epochs is refitted to what the rest of the budget holds at the epochs'
  mean time (never more than asked for), and the poly learning-rate schedule is stretched over
  that number, so a budgeted run is nnU-Net's schedule compressed, ending with its learning rate
  near zero. Training ends as nnU-Net ends it (``checkpoint_final.pth``) when the refitted
  schedule is done or the budget is spent, and the log says which;
* ``SPINE1K_NNUNET_VALIDATION`` = 0 skips nnU-Net's final validation (on fold ``all`` it predicts
  the training cases again; the workspace evaluates the test sets itself).

Unset, every setting is nnU-Net's default, so this trainer is then exactly ``nnUNetTrainer``.

The jobs build it and its network directly, never through nnU-Net's search for a trainer by
name: that search imports every trainer module nnU-Net ships, the Primus ones import timm, and
timm needs a torchvision that imports beside the pinned CPU torch, which PyPI does not have.
"""

from __future__ import annotations

import os
import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

CUDA = torch.device("cuda")  # nnUNetTrainer's default device (its signature is kept)


class BudgetSpent(Exception):  # noqa: N818  (a signal, not an error)
    """The training loop's wall-clock budget ran out at the end of an epoch."""


class nnUNetTrainerSpine1k(nnUNetTrainer):  # noqa: N801  (nnU-Net's trainer naming)
    """``nnUNetTrainer`` with epochs, iterations per epoch, a wall-clock budget and the final
    validation taken from the environment (see the module docstring)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = CUDA):
        super().__init__(plans, configuration, fold, dataset_json, device)
        env = os.environ
        self.num_epochs = int(env.get("SPINE1K_NNUNET_EPOCHS", self.num_epochs))
        iterations = int(env.get("SPINE1K_NNUNET_ITERATIONS", self.num_iterations_per_epoch))
        self.num_val_iterations_per_epoch = max(1, round(self.num_val_iterations_per_epoch * iterations
                                                         / self.num_iterations_per_epoch))
        self.num_iterations_per_epoch = iterations
        self.budget_s = float(env.get("SPINE1K_NNUNET_BUDGET_S", 0) or 0)
        self.final_validation = env.get("SPINE1K_NNUNET_VALIDATION", "1") != "0"
        self._loop_start = None
        self._epochs_here = 0
        self._requested_epochs = self.num_epochs

    def on_train_start(self):
        super().on_train_start()
        self._loop_start = time.monotonic()
        budget = f"budget {self.budget_s:.0f} s" if self.budget_s else "no budget"
        self.print_to_log_file(f"spine1k schedule: {self.num_epochs} epochs x {self.num_iterations_per_epoch} "
                               f"iterations (validation {self.num_val_iterations_per_epoch}), {budget}")

    def on_epoch_end(self):
        super().on_epoch_end()  # current_epoch is now the number of epochs done
        if not self.budget_s:
            return
        self._epochs_here += 1
        spent = time.monotonic() - self._loop_start
        epoch_s = spent / self._epochs_here
        fitted = min(self.num_epochs, self.current_epoch + int((self.budget_s - spent) // epoch_s))
        if fitted != self.num_epochs:
            self.num_epochs = max(self.current_epoch, fitted)
            self.lr_scheduler.max_steps = max(self.num_epochs, self.current_epoch + 1)
        if self.current_epoch >= self._requested_epochs:
            return  # the schedule asked for is done within the budget: nnU-Net's loop ends by itself
        if spent >= self.budget_s or self.current_epoch >= self.num_epochs:
            self.print_to_log_file(f"spine1k budget: {spent:.0f} s of {self.budget_s:.0f} s after "
                                   f"{self.current_epoch} epochs ({epoch_s:.1f} s each); training ends here")
            raise BudgetSpent

    def run_training(self):
        try:
            super().run_training()
        except BudgetSpent:
            self.on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.final_validation:
            return super().perform_actual_validation(save_probabilities)
        self.print_to_log_file("spine1k: nnU-Net's final validation skipped (SPINE1K_NNUNET_VALIDATION=0)")
        return None

"""Training a BayesianModel's ``loss`` with a Lightning ``Trainer``, as a user would."""

from __future__ import annotations

import warnings

import pytest
import torch


def train_with_lightning(bm, loader, *, epochs: int, root, lr: float = 1e-2,
                         finish_in_hook: bool = False) -> None:
    """Fit ``bm.loss`` for ``epochs`` with Adam(lr) in a LightningModule; with
    ``finish_in_hook`` the module calls ``bm.finish_fit()`` in ``on_train_end``."""
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.bm = bm

        def training_step(self, batch, batch_idx):
            return self.bm.loss(*batch)

        def configure_optimizers(self):
            return torch.optim.Adam(self.bm.parameters(), lr=lr)

        def on_train_end(self):
            if finish_in_hook:
                self.bm.finish_fit()

    with warnings.catch_warnings():
        # Lightning's own advice (worker counts, logging, accelerators) is not ours.
        warnings.simplefilter("ignore")
        trainer = lightning.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False,
                                    accelerator="cpu", devices=1, default_root_dir=root)
        trainer.fit(Module(), loader)

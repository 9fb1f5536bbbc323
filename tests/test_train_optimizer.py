"""train.optimizer: Adam through the one trainer; checkpoints from before the setting resume."""

from __future__ import annotations

import torch

from splitcem.config import TrainConfig
from splitcem.defenses import DefenseStack
from splitcem.train import Trainer
from tests.test_byo_protect import tiny_model, toy_splits


def test_adam_trains_and_older_checkpoints_still_resume():
    cfg = TrainConfig(epochs=1, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=0.0,
                      milestones=[])
    torch.manual_seed(0)
    tr = Trainer(tiny_model(), DefenseStack(), toy_splits(), cfg, device=torch.device("cpu"),
                 progress=False, augment=False)
    assert isinstance(tr.optimizer, torch.optim.Adam)
    tr.fit()
    sgd = Trainer(tiny_model(), DefenseStack(), toy_splits(), TrainConfig(epochs=1),
                  device=torch.device("cpu"), progress=False)
    state = sgd.state_dict()
    del state["train_config"]["optimizer"]  # written before train.optimizer existed
    sgd.load_state_dict(state)  # no CheckpointError: the missing setting is the default

"""A run's model and trained variables, as every consumer needs them: the experiment, the
evaluators, the sweep CLI and notebooks.

  run = advdef.load_run('/tmp/qs'); logits = run.logits_fn(x, key, defense='sap(frac=0.5)')
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections

from advdef import checkpointing
from advdef import data as data_lib
from advdef import models
from advdef import pruning
from advdef import recipes
from advdef import retrofit
from advdef import training


@dataclasses.dataclass
class Run:
  """A trained run, for notebooks: config, model, variables, data and logits_fn."""
  workdir: str
  config: ml_collections.ConfigDict
  model: nn.Module
  variables: dict[str, Any]
  splits: data_lib.Splits
  step: int

  def logits_fn(self, x, key=None, *, defense: str = 'none'):
    """logits [B, K] of the model (optionally defended) on x float32[B,H,W,C] in [0, 1]."""
    fn = self.defended_logits_fn(defense)
    return fn(x, jax.random.key(0) if key is None else key)

  def defended_logits_fn(self, defense: str) -> Callable:
    """Returns logits_fn(x, key) for a defense spec, the signature attacks expect."""
    return retrofit.make_logits_fn(self.model, self.variables, retrofit.build_hook(defense))


def build_model(config, info) -> nn.Module:
  """The registry model in eval form: with its test-time pruning masks when the recipe
  learns them (anp, bp), so every evaluation path sees the masked network."""
  kwargs = dict(config.model.kwargs)
  model = models.create_model(config.model.name, num_classes=info.num_classes, mean=info.mean,
                              std=info.std, normalize=config.model.normalize, **kwargs)
  placement = recipes.mask_placement(config)
  if placement is not None:
    model = model.clone(hook=pruning.mask_hook(placement, training=False))
  return model


def load_run(workdir: str) -> Run:
  """Loads config.json and the latest checkpoint of a run for notebook use."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir} holds no config.json; is it an advdef workdir?')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  splits = data_lib.load_dataset(config.data)
  model = build_model(config, splits.info)
  source = config.train.checkpoint or workdir
  variables = training.load_variables(
      source, model, splits.info, expected_fingerprint=training.fingerprint(config, splits.info))
  latest = None
  ckpt_dir = os.path.join(source, 'checkpoints')
  if os.path.isdir(ckpt_dir):
    with checkpointing.Checkpointer(ckpt_dir, fingerprint=training.fingerprint(
        config, splits.info)) as ckpt:
      latest = ckpt.latest_step()
  return Run(workdir=workdir, config=config, model=model, variables=variables, splits=splits,
             step=int(latest or 0))

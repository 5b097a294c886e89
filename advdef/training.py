"""Training: optimizers and schedules from config, TrainState, jitted train/eval steps, the loop.

The loop keeps the whole training set on the device and draws each batch inside the jitted
step (advdef.data.train_batch), so there is no host transfer per step. Data parallel over
`config.parallel.num_devices` devices (advdef.parallel): the data set and the state are
replicated, each drawn batch is split over the mesh's 'data' axis, and XLA all-reduces
the gradients; results match one device up to floating-point reassociation. All randomness comes
from `fold_in(stream_key, step)`, so a run resumed from a checkpoint replays exactly the
steps an uninterrupted run would have taken.

  state = create_train_state(key, model, tx, input_shape)
  step_fn = make_train_step(model, tx, StepConfig(...), mesh=mesh)  # jitted once, donated
  state, metrics = step_fn(state, images_u8, labels, perm, train_key)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from advdef import checkpointing
from advdef import data as data_lib
from advdef import metric_writers
from advdef import parallel
from advdef import pruning
from advdef import recipes
from advdef import retrofit
from advdef import rng

OPTIMIZERS = ('sgd', 'adam', 'adamw')
SCHEDULES = ('constant', 'piecewise', 'cosine')


class NonFiniteLossError(RuntimeError):
  """Raised when the training loss becomes NaN or infinite."""


def non_finite_message(loss: float, last_good: int, step: int, checkpoint: int | None) -> str:
  """NonFiniteLossError's message; checkpoint: the newest saved step, None before the first."""
  kept = ('no checkpoint has been written yet' if checkpoint is None else
          f'the last good checkpoint (step {checkpoint}) is kept')
  return (f'training loss became {loss} between steps {last_good} and {step}; {kept}. Lower '
          'train.learning_rate or check the data.')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  # (params, batch_stats) at the start of the epoch, for recipes that attack the model of
  # the previous epoch (fgsm_mix(source=previous_epoch)); {} otherwise.
  snapshot: Any = flax.struct.field(default_factory=dict)


def make_schedule(train_config, steps_per_epoch: int) -> optax.Schedule:
  """Learning-rate schedule in steps from a config whose boundaries are in epochs."""
  lr = train_config.learning_rate
  total = train_config.num_epochs * steps_per_epoch
  name = train_config.schedule
  if name == 'constant':
    schedule = optax.constant_schedule(lr)
  elif name == 'piecewise':
    # boundaries (epochs) and decay_factor: lr * factor**k after the k-th boundary.
    boundaries = {int(round(b * steps_per_epoch)): train_config.decay_factor
                  for b in train_config.boundaries}
    schedule = optax.piecewise_constant_schedule(lr, boundaries)
  elif name == 'cosine':
    schedule = optax.cosine_decay_schedule(lr, max(total, 1))
  else:
    raise ValueError(f'train.schedule={name!r}; valid choices: {SCHEDULES}')
  warmup = int(round(train_config.warmup_epochs * steps_per_epoch))
  if warmup:
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), schedule], [warmup])
  return schedule


def create_optimizer(train_config, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD (momentum, nesterov) or Adam(W); weight decay coupled as in PyTorch's SGD."""
  schedule = make_schedule(train_config, steps_per_epoch)
  name = train_config.optimizer
  if name == 'sgd':
    opt = optax.sgd(schedule, momentum=train_config.momentum or None,
                    nesterov=train_config.nesterov)
  elif name == 'adam':
    opt = optax.adam(schedule)
  elif name == 'adamw':
    return optax.adamw(schedule, weight_decay=train_config.weight_decay)
  else:
    raise ValueError(f'train.optimizer={name!r}; valid choices: {OPTIMIZERS}')
  if train_config.weight_decay:
    # L2 added to the gradient before momentum, like torch.optim.SGD(weight_decay=...).
    return optax.chain(optax.add_decayed_weights(train_config.weight_decay), opt)
  return opt


def create_train_state(key, model: nn.Module, tx: optax.GradientTransformation,
                       input_shape, *, snapshot: bool = False,
                       init_variables: dict[str, Any] | None = None) -> TrainState:
  """A fresh state. init_variables: trained params/batch_stats (e.g. a clean model that
  ANP fine-tunes) overriding the fresh ones they name; parameters they lack (masks) stay
  freshly initialised."""
  x = jnp.zeros((1, *input_shape), jnp.float32)
  params_key, dropout_key, defense_key = jax.random.split(key, 3)
  # Jitted: run op by op, init compiles dozens of small programs (seconds at every start).
  variables = jax.jit(functools.partial(model.init, train=False))(
      {'params': params_key, 'dropout': dropout_key, 'defense': defense_key}, x)
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  if init_variables is not None:
    params = _override(params, init_variables['params'])
    batch_stats = _override(batch_stats, init_variables.get('batch_stats', {}))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params),
                    # Copies: the donated state must not hold one buffer twice.
                    snapshot=jax.tree_util.tree_map(
                        jnp.copy, {'params': params, 'batch_stats': batch_stats})
                    if snapshot else {})


def _override(fresh, trained):
  """`fresh` with every leaf that `trained` has at the same path (shapes must agree)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(fresh))
  for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(trained)).items():
    if path not in flat:
      raise ValueError(f'train.init_from holds {"/".join(path)}, which this model lacks')
    if tuple(flat[path].shape) != tuple(value.shape):
      raise ValueError(f'train.init_from: {"/".join(path)} has shape {tuple(value.shape)}, '
                       f'this model expects {tuple(flat[path].shape)}')
    flat[path] = jnp.asarray(value)
  return flax.traverse_util.unflatten_dict(flat)


def variables_of(state: TrainState) -> dict[str, Any]:
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return variables


def cross_entropy(logits, labels, label_smoothing=0.0):
  """Per-example cross-entropy, float32[B]."""
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = targets * (1 - label_smoothing) + label_smoothing / num_classes
  return optax.softmax_cross_entropy(logits, targets)


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What the train step needs from config.train, parsed once (`from_config`).

  batch_size, steps_per_epoch: B and the number of steps per epoch.
  recipe: the loss (advdef.recipes); placement: its pruning masks (anp, bp), else None.
  train_defense: a defense spec active in training (RSE's noise), 'none' for none.
  crop_padding, flip: augmentation; label_smoothing: of the cross-entropy.
  num_train: ANP's N; total_steps: the run's length, for the recipe's eps warm-up.
  """
  batch_size: int
  steps_per_epoch: int
  recipe: recipes.Recipe = dataclasses.field(
      default_factory=lambda: recipes.parse_recipe('standard'))
  placement: pruning.Placement | None = None
  train_defense: str = 'none'
  crop_padding: int = 0
  flip: bool = False
  label_smoothing: float = 0.0
  num_train: int = 0
  total_steps: int = 0

  @classmethod
  def from_config(cls, config, info, recipe: recipes.Recipe | None = None) -> StepConfig:
    """From an experiment config and its data set's DatasetInfo (recipe: already parsed)."""
    tc = config.train
    recipe = recipe or recipes.parse_recipe(tc.recipe)
    spe = data_lib.steps_per_epoch(info.num_train, tc.batch_size)  # raises if batch > data
    return cls(batch_size=tc.batch_size, steps_per_epoch=spe, recipe=recipe,
               placement=recipe.placement(config.model.name), train_defense=tc.defense,
               crop_padding=tc.augment.crop_padding, flip=tc.augment.flip,
               label_smoothing=tc.label_smoothing, num_train=info.num_train,
               total_steps=tc.num_epochs * spe)


def make_train_step(model: nn.Module, tx, step_config: StepConfig, *,
                    unroll_attacks: bool | None = None, mesh=None) -> Callable:
  """Returns the jitted train step (state donated).

  step(state, images_u8 [N,H,W,C], labels [N], perm int32[N], train_key) -> (state, metrics)
  The batch is perm[(step % steps_per_epoch) * B : ...], augmented from fold_in(key, step).
  `model` is the eval-mode network (with test-time masks when the recipe places them; the
  recipe's attacks run on it); training runs it with dropout, sampled masks and the
  train defense (see StepConfig).
  unroll_attacks: unroll attack loops (default: on CPU). Iterates are bit-identical either
    way; on 2 CPU cores unrolled crafting ran 3-8% faster per step (PGD-10 lenet_like b=64:
    295 vs 320 ms; PGD-7 ResNet-20 b=32: 886 vs 908 ms) for 1.2-1.8x the compile time
    (4.8 vs 2.6 s; 10.3 vs 8.7 s), which a training run repays. It was ~3x before the
    models' convolutions became canonical_conv (advdef.layers).
  With a mesh (advdef.parallel), the drawn batch is split over its 'data' axis (B must be a
  multiple of the device count) and the new state and metrics come back replicated; pass
  the state and data set replicated (parallel.replicate).
  """
  c = step_config
  recipe, placement, steps_per_epoch = c.recipe, c.placement, c.steps_per_epoch
  if recipe.uses_masks and placement is None:
    raise ValueError(f'train.recipe={recipe.name!r} needs a mask placement')
  if unroll_attacks is None:
    unroll_attacks = jax.default_backend() == 'cpu'
  defense_hook = retrofit.build_hook(c.train_defense, training=True, field='train.defense')
  base = model.clone(hook=None)
  plain_train = base.clone(hook=retrofit.compose(
      pruning.mask_hook(placement, training=True), defense_hook))
  capturing_train = base.clone(hook=retrofit.compose(
      pruning.mask_hook(placement, training=True, capture_features=True), defense_hook))

  def forward(params, batch_stats, x, key, capture):
    dropout_key, defense_key = jax.random.split(key)
    variables = {'params': params}
    mutable = ['intermediates'] if capture else []
    if batch_stats:
      variables['batch_stats'] = batch_stats
      mutable.append('batch_stats')
    logits, updates = (capturing_train if capture else plain_train).apply(
        variables, x, train=True, mutable=mutable,
        rngs={'dropout': dropout_key, 'defense': defense_key})
    features = pruning.latent_features(updates['intermediates']) if capture else []
    return logits, updates.get('batch_stats', batch_stats), features

  def eval_logits_fn(params, batch_stats):
    variables = {'params': params, **({'batch_stats': batch_stats} if batch_stats else {})}
    return lambda x, key: model.apply(variables, x, train=False)

  ctx = recipes.StepContext(
      forward=forward, eval_logits_fn=eval_logits_fn,
      cross_entropy=lambda logits, y: cross_entropy(logits, y, c.label_smoothing),
      num_train=c.num_train, unroll=unroll_attacks, total_steps=c.total_steps)

  def step_fn(state, images, labels, perm, train_key):
    step_key = jax.random.fold_in(train_key, state.step)
    aug_key, recipe_key = jax.random.split(step_key)
    x, y = data_lib.train_batch(images, labels, perm, state.step % steps_per_epoch, aug_key,
                                batch_size=c.batch_size, crop_padding=c.crop_padding,
                                flip=c.flip)
    if mesh is not None:
      x, y = parallel.constrain_batch((x, y), mesh)
    snapshot = state.snapshot
    if recipe.needs_snapshot:  # the model as it was when this epoch began
      new_epoch = state.step % steps_per_epoch == 0
      current = {'params': state.params, 'batch_stats': state.batch_stats}
      snapshot = jax.tree_util.tree_map(lambda c, s: jnp.where(new_epoch, c, s), current,
                                        snapshot)
    source = (snapshot['params'], snapshot['batch_stats']) if snapshot else None
    grads, batch_stats, metrics = recipes.recipe_grads(
        recipe, ctx, state.params, state.batch_stats, source, x, y, recipe_key, state.step)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                           opt_state=opt_state, snapshot=snapshot)
    return new_state, metrics

  if mesh is None:
    return jax.jit(step_fn, donate_argnums=0)
  return jax.jit(step_fn, donate_argnums=0, out_shardings=parallel.replicated(mesh))


def make_eval_step(model: nn.Module) -> Callable:
  """eval_step(variables, x, y, mask) -> dict of masked sums (correct, loss, count)."""

  def eval_fn(variables, x, y, mask):
    logits = model.apply(variables, x, train=False)
    correct = (jnp.argmax(logits, -1) == y) & mask
    loss = jnp.where(mask, cross_entropy(logits, y), 0.0)
    return {'correct': jnp.sum(correct), 'loss': jnp.sum(loss), 'count': jnp.sum(mask)}

  return jax.jit(eval_fn)


def evaluate_clean(eval_step, variables, images, labels, batch_size,
                   mesh=None) -> dict[str, float]:
  """Exact clean accuracy and mean loss over a split (the last batch padded and masked).

  With a mesh, each batch is split over its devices (variables replicated on it).
  """
  totals = None
  for batch in data_lib.eval_batches(images, labels, batch_size):
    if mesh is not None:
      batch = parallel.shard_batch(batch, mesh)
    out = eval_step(variables, batch['image'], batch['label'], batch['mask'])
    totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
  totals = parallel.to_numpy(totals)
  count = int(totals['count'])
  return {'accuracy': float(totals['correct']) / count, 'loss': float(totals['loss']) / count,
          'n': count}


def fingerprint(config, info, *, with_masks: bool = True) -> dict[str, Any]:
  """What a checkpoint belongs to; a workdir holding another model or data set is refused.

  Runs with pruning masks (recipes anp, bp) also record the mask sites, since their
  parameters differ from the plain model's.
  """
  fp = {'model': config.model.name, 'dataset': f'{config.data.source}:{config.data.name}',
        'num_classes': int(info.num_classes), 'image_shape': list(info.image_shape)}
  placement = recipes.mask_placement(config)
  if with_masks and placement is not None:
    fp['mask_sites'] = list(placement.sites)
  return fp


def train_and_evaluate(config, workdir: str, model: nn.Module, splits: data_lib.Splits, *,
                       recipe: recipes.Recipe | None = None,
                       writer: metric_writers.MetricWriter | None = None,
                       progress: bool = True) -> tuple[TrainState, dict[str, Any]]:
  """Trains `model` per `config.train`, resuming from `workdir`'s latest checkpoint.

  recipe: config.train.recipe already parsed (parsed here when None).
  Returns the final state (replicated over the `config.parallel` mesh) and a summary dict
  (steps, final train/test metrics, wall time).
  """
  tc = config.train
  info = splits.info
  step_config = StepConfig.from_config(config, info, recipe)
  spe, recipe = step_config.steps_per_epoch, step_config.recipe
  mesh = parallel.mesh_from_config(config)  # Before any compute: bad device counts fail here.
  parallel.check_divisible(tc.batch_size, mesh, 'train.batch_size')
  parallel.check_divisible(config.eval.batch_size, mesh, 'eval.batch_size')
  logging.info('Training on a %s', parallel.describe(mesh))
  total_steps = step_config.total_steps
  ckpt = checkpointing.Checkpointer(f'{workdir}/checkpoints', keep=tc.keep_checkpoints,
                                    fingerprint=fingerprint(config, info))
  ckpt.check_compatible()  # Before any compute: a workdir of another run is refused.
  schedule = make_schedule(tc, spe)  # for logging the learning rate
  tx = recipes.wrap_optimizer(recipe, create_optimizer(tc, spe), schedule)
  init_key, train_key, data_key = (rng.run_key(config.seed, stream)
                                    for stream in ('init', 'train', 'data'))
  init_vars = None
  if ckpt.latest_step() is None and tc.init_from:  # a trained run without masks (ANP)
    init_vars = load_variables(tc.init_from, model.clone(hook=None), info,
                               expected_fingerprint=fingerprint(config, info, with_masks=False))
  # Replicated before the restore: orbax restores into the target's sharding.
  state = parallel.replicate(create_train_state(
      init_key, model, tx, info.image_shape, snapshot=recipe.needs_snapshot,
      init_variables=init_vars), mesh)
  # The newest checkpoint that reads back; damaged newer ones are reported and dropped.
  start, state = ckpt.restore_latest(target=state)
  if start is not None:
    logging.info('Resumed from step %d in %s', start, workdir)
  start = int(start or 0)
  if writer is not None:
    writer.truncate_after(start)

  # The whole data set on every device: each step gathers its batch inside jit.
  images = parallel.replicate(splits.train_images, mesh)
  labels = parallel.replicate(splits.train_labels.astype(np.int32), mesh)
  test_images = parallel.replicate(splits.test_images, mesh)
  test_labels = parallel.replicate(splits.test_labels.astype(np.int32), mesh)
  step_fn = make_train_step(model, tx, step_config, mesh=mesh)
  eval_step = make_eval_step(model)
  permute = jax.jit(data_lib.epoch_permutation, static_argnums=2,
                    out_shardings=parallel.replicated(mesh))
  ckpt_every = tc.checkpoint_every_epochs * spe

  bar = metric_writers.ProgressBar(total=total_steps, initial=start, enabled=progress,
                                   batch_size=tc.batch_size)
  t0 = time.time()
  summary: dict[str, Any] = {'steps': total_steps, 'steps_per_epoch': spe, 'resumed_from': start}
  pending, last_good = [], start
  step = start
  perm = None
  try:
    while step < total_steps:
      epoch = step // spe
      if perm is None or step % spe == 0:
        perm = permute(data_key, epoch, info.num_train)
      state, metrics = step_fn(state, images, labels, perm, train_key)
      pending.append(metrics)
      step += 1
      bar.update(1)
      end_of_epoch = step % spe == 0
      if step % tc.log_every_steps == 0 or end_of_epoch or step == total_steps:
        means = {k: float(v) for k, v in jax.device_get(
            jax.tree_util.tree_map(lambda *xs: jnp.mean(jnp.stack(xs)), *pending)).items()}
        pending = []
        if not math.isfinite(means['loss']):
          raise NonFiniteLossError(non_finite_message(means['loss'], last_good, step,
                                                      ckpt.latest_step()))
        last_good = step
        scalars = {f'train/{k}': v for k, v in means.items()}
        scalars['train/learning_rate'] = float(schedule(step - 1))
        if end_of_epoch and ((step // spe) % tc.eval_every_epochs == 0 or step == total_steps):
          test = evaluate_clean(eval_step, variables_of(state), test_images, test_labels,
                                config.eval.batch_size, mesh)
          scalars.update({'test/accuracy': test['accuracy'], 'test/loss': test['loss']})
          bar.update(0, loss=means['loss'], test_acc=test['accuracy'])
          summary['final_test'] = test
        if writer is not None:
          writer.write_scalars(step, scalars)
        summary['final_train'] = means
        if (ckpt_every and step % ckpt_every == 0) or step == total_steps:
          ckpt.save(step, state, force=True)
  finally:
    bar.close()
    ckpt.wait()
    ckpt.close()
  summary['wall_seconds'] = time.time() - t0
  if 'final_test' not in summary:  # Nothing left to train (finished run, or num_epochs=0).
    summary['final_test'] = evaluate_clean(eval_step, variables_of(state), test_images,
                                           test_labels, config.eval.batch_size, mesh)
  return state, summary


def load_variables(path: str, model: nn.Module, info, *,
                   expected_fingerprint: dict[str, Any]) -> dict[str, Any]:
  """params (and batch_stats) shaped for `model` from a run's workdir or checkpoint directory.

  Raises when the checkpoint belongs to another model or data set (`fingerprint`).
  """
  shapes = jax.eval_shape(lambda: create_train_state(jax.random.key(0), model, optax.identity(),
                                                     info.image_shape))
  target = {'params': shapes.params}
  if shapes.batch_stats:
    target['batch_stats'] = shapes.batch_stats
  return dict(checkpointing.restore_variables(path, target,
                                              expected_fingerprint=expected_fingerprint))

"""Physically pruned export of ANP-VS masked networks, and the authors' FLOPs/memory counts.

A model masked with advdef.pruning computes, in eval mode, the dense network with every
masked unit multiplied by its test mask z (E[pi], exactly 0 for pruned units). This module
turns such a (model, variables) pair into a `PrunedModel`: smaller kernels with the pruned
units removed and z (and eval-mode BatchNorm) folded into the weights, whose logits equal
the masked model's to float32 rounding.

  pm = pruned_export.export_pruned(model, variables)     # model: plain or masked
  logits = jax.jit(pm.apply)(x)                          # == masked.apply(variables, x)
  pruned_export.count_flops_and_memory(pm.model_name, pm.active_units, pm.input_shape,
                                       pm.num_classes)   # the ANP paper's speedup/memory
  pruned_export.save_pruned('/tmp/pm.npz', pm); pm2 = pruned_export.load_pruned('/tmp/pm.npz')

Supported: `lenet5_caffe` and `vgg16_anp` (their layer plans are in PLANS).

Exactness. In VGG the mask sits before BatchNorm, so a pruned channel (z = 0) is not zero
after BN + ReLU: it is the constant c = relu(bn_bias - bn_scale * mean / sqrt(var + eps)).
Such channels are removed and their constant contribution is added to the consumer: for a
conv, as a position-dependent bias map float32[H_out, W_out, C_out] (the conv of a constant
c-image with zero SAME padding differs at the borders); for a dense layer, folded into its
bias. A channel that the next layer ignores entirely (all its fc*_in mask entries are 0) is
removed from its producer as well.

Fully pruned masks. When every unit of a layer would be removed, the export keeps one unit
(the first) rather than a zero-width tensor; it carries what the masked model computes there
(z = 0: a zero kernel, so 0 or relu(BN(0))), so the logits stay exact.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from advdef import models
from advdef import pruning

# ---------------------------------------------------------------------------------------
# Layer plans.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Conv:
  """Conv kernel x kernel, stride 1, with bias: params[name]['kernel'] HWIO, ['bias'].

  out_mask: the conv_out site masking its output channels (None: unmasked).
  bn: the BatchNorm module right after the mask (None: none), eval mode.
  """
  name: str
  features: int
  kernel: int
  padding: str  # 'SAME' or 'VALID'
  out_mask: str | None
  bn: str | None = None


@dataclasses.dataclass(frozen=True)
class Act:
  """ReLU."""


@dataclasses.dataclass(frozen=True)
class Pool:
  """Max pool 2x2, stride 2, VALID (H -> H // 2)."""


@dataclasses.dataclass(frozen=True)
class Flatten:
  """[B, H, W, C] -> [B, H*W*C], NHWC order: flat index = (h*W + w)*C + c."""


@dataclasses.dataclass(frozen=True)
class Dense:
  """Dense with bias: params[name]['kernel'] [in, out], ['bias'].

  features: output width; None for the last layer (num_classes).
  in_mask: the dense_in site masking its input features (None: unmasked).
  bn: BatchNorm on its output (None: none), eval mode.
  flops_act: whether the authors' FLOPs count adds `out` for an activation (for counting
    only; their VGG counts one after the logits too).
  """
  name: str
  features: int | None
  in_mask: str | None
  bn: str | None = None
  flops_act: bool = True


Op = Conv | Act | Pool | Flatten | Dense
_OP_TYPES = {'conv': Conv, 'act': Act, 'pool': Pool, 'flatten': Flatten, 'dense': Dense}


@dataclasses.dataclass(frozen=True)
class Plan:
  """The eval-mode layer sequence of one architecture (after `prepare`, the normalization).

  input_shape: (H, W, C) the authors use; bn_epsilon: of every BatchNorm in the plan.
  """
  ops: tuple[Op, ...]
  input_shape: tuple[int, int, int]
  bn_epsilon: float = 1e-3


def _vgg16_anp_plan() -> Plan:
  ops, block = [], 0
  for v in models.VGG16_CFG:
    if v == 'M':
      ops.append(Pool())
      continue
    block += 1
    ops += [Conv(f'conv{block}', v, 3, 'SAME', f'conv{block}_out', f'bn{block}'), Act()]
  # Dropout is inactive in eval mode. fc2: the authors' vgg_flops counts an activation after
  # the logits (count_flops_dense(num_units[14], n_classes) keeps activation=True); we
  # reproduce that so the speedups match theirs.
  ops += [Flatten(), Dense('fc1', 512, 'fc1_in', 'bn14'), Act(),
          Dense('fc2', None, 'fc2_in', None, flops_act=True)]
  return Plan(tuple(ops), (32, 32, 3), bn_epsilon=1e-3)


PLANS: dict[str, Plan] = {
    'lenet5_caffe': Plan((
        Conv('conv1', 20, 5, 'VALID', 'conv1_out'), Act(), Pool(),
        Conv('conv2', 50, 5, 'VALID', 'conv2_out'), Act(), Pool(),
        Flatten(), Dense('fc1', 500, 'fc1_in'), Act(),
        Dense('fc2', None, 'fc2_in', flops_act=False)), (28, 28, 1)),
    'vgg16_anp': _vgg16_anp_plan(),
}


def _unsupported(name) -> ValueError:
  return ValueError(f'model.name={name!r} has no pruned-export layer plan; supported '
                    f'model.name values: {", ".join(PLANS)}')


def get_plan(model_name: str) -> Plan:
  if model_name not in PLANS:
    raise _unsupported(model_name)
  return PLANS[model_name]


def model_name_of(model: nn.Module) -> str:
  """The registry name of a supported model instance ('lenet5_caffe' or 'vgg16_anp').

  Raises:
    ValueError naming model.name (best-effort registry name) and the supported ones.
  """
  if isinstance(model, models.LeNet5Caffe):
    return 'lenet5_caffe'
  if isinstance(model, models.VGG16) and model.head == 'anp':
    return 'vgg16_anp'
  # Best effort at the registry name for the message: a partial whose keywords match first.
  guess = type(model).__name__
  for name, ctor in sorted(models.MODELS.items(), key=lambda kv: not isinstance(
      kv[1], functools.partial)):
    if isinstance(ctor, functools.partial):
      if ctor.func is type(model) and all(getattr(model, k, None) == v
                                          for k, v in ctor.keywords.items()):
        guess = name
        break
    elif ctor is type(model):
      guess = name
      break
  raise _unsupported(guess)


def _shapes(plan: Plan, input_shape: Sequence[int], num_classes: int) -> list[tuple[int, ...]]:
  """Full (unpruned) shapes: [input of op 0, ..., input of op i, ..., output of the last]."""
  shape = tuple(int(s) for s in input_shape)
  out = [shape]
  for op in plan.ops:
    if isinstance(op, Conv):
      h, w, _ = shape
      if op.padding == 'VALID':
        h, w = h - op.kernel + 1, w - op.kernel + 1
      shape = (h, w, op.features)
    elif isinstance(op, Pool):
      shape = (shape[0] // 2, shape[1] // 2, shape[2])
    elif isinstance(op, Flatten):
      shape = (int(np.prod(shape)),)
    elif isinstance(op, Dense):
      shape = (op.features if op.features is not None else num_classes,)
    out.append(shape)
  return out


def mask_units(model_name: str, input_shape: Sequence[int] | None = None,
               num_classes: int = 10) -> dict[str, int]:
  """{mask site: number of units} of the dense network (channels, or dense input width)."""
  plan = get_plan(model_name)
  shapes = _shapes(plan, input_shape or plan.input_shape, num_classes)
  units = {}
  for i, op in enumerate(plan.ops):
    if isinstance(op, Conv) and op.out_mask:
      units[op.out_mask] = op.features
    elif isinstance(op, Dense) and op.in_mask:
      units[op.in_mask] = shapes[i][0]
  return units


# ---------------------------------------------------------------------------------------
# The authors' FLOPs and memory counts.
# ---------------------------------------------------------------------------------------


def _count(plan: Plan, units: Mapping[str, int], input_shape, num_classes) -> tuple[int, int]:
  """(flops, memory) of the network with `units` active per mask site (authors' formulas)."""
  shapes = _shapes(plan, input_shape, num_classes)
  denses = [op for op in plan.ops if isinstance(op, Dense)]
  flops = memory = 0
  c_in = shapes[0][2]  # active channels of the current feature map
  for i, op in enumerate(plan.ops):
    if isinstance(op, Conv):
      h_out, w_out, _ = shapes[i + 1]
      c_out = units[op.out_mask] if op.out_mask else op.features
      n = op.kernel * op.kernel * c_in
      # (2n - 1) per output, + bias, + activation (flops/utils.py count_flops_conv).
      flops += (2 * n - 1) * h_out * w_out * c_out + 2 * c_out * h_out * w_out
      # Feature map + kernel, + 2 C_out for BatchNorm (memory/utils.py count_memory_conv).
      memory += n * h_out * w_out + n * c_out + (2 * c_out if op.bn else 0)
      c_in = c_out
    elif isinstance(op, Pool):
      h_out, w_out, _ = shapes[i + 1]
      flops += c_in * h_out * w_out * 4
    elif isinstance(op, Dense):
      d_in = units[op.in_mask] if op.in_mask else shapes[i][0]
      k = denses.index(op)
      if k + 1 < len(denses):
        nxt = denses[k + 1]
        d_out = units[nxt.in_mask] if nxt.in_mask else shapes[i + 1][0]
      else:
        d_out = num_classes
      flops += (2 * d_in - 1) * d_out + d_out + (d_out if op.flops_act else 0)
      # Their count_memory_dense adds 2 * in_features (not out) for batch_norm=True.
      memory += d_in * d_out + d_out + (2 * d_in if op.bn else 0)
  return flops, memory


def count_flops_and_memory(model_name: str, active_units: Mapping[str, int] | None,
                           input_shape: Sequence[int] | None = None,
                           num_classes: int = 10) -> dict[str, float]:
  """FLOPs and memory of the dense and the pruned network, counted as the ANP authors do.

  Their flops/utils.py and memory/utils.py (lenet_conv_flops, vgg_flops, lenet_memory,
  vgg_memory), generalized to any input shape: a conv's C_in is the active count of the
  previous conv's out-mask (image channels for the first), its C_out its own out-mask's; a
  dense layer's `in` is its in-mask's active count, its `out` the next dense layer's in-mask's
  (num_classes for the last). BatchNorm and dropout add no FLOPs. One deliberate deviation:
  their vgg_memory adds the two dense layers' memory inside the 13-iteration conv loop
  (counted 13 times); here they are counted once.

  Args:
    model_name: 'lenet5_caffe' or 'vgg16_anp'.
    active_units: {mask site: active units}, e.g. pruning.sparsity_summary(params)
      ['active_units'] or PrunedModel.active_units; missing sites count as fully active;
      None means every unit active.
    input_shape: (H, W, C); defaults to the plan's (28, 28, 1) / (32, 32, 3).
    num_classes: width of the last dense layer.

  Returns:
    {'flops_dense', 'flops_pruned', 'flops_speedup' (dense / pruned), 'memory_dense',
     'memory_pruned', 'memory_percent' (100 * pruned / dense)}.

  Raises:
    ValueError: unsupported model_name, unknown site, or a count outside [0, units].
  """
  plan = get_plan(model_name)
  input_shape = tuple(input_shape or plan.input_shape)
  full = mask_units(model_name, input_shape, num_classes)
  units = dict(full)
  for site, n in (active_units or {}).items():
    if site not in full:
      raise ValueError(f'active_units: {site!r} is not a mask site of {model_name}; valid '
                       f'sites: {", ".join(full)}')
    if not 0 <= int(n) <= full[site]:
      raise ValueError(f'active_units[{site!r}]={n} is outside [0, {full[site]}]')
    units[site] = int(n)
  flops_dense, memory_dense = _count(plan, full, input_shape, num_classes)
  flops_pruned, memory_pruned = _count(plan, units, input_shape, num_classes)
  return {'flops_dense': flops_dense, 'flops_pruned': flops_pruned,
          # A network with every unit pruned has no meaningful count (the authors' dense
          # formula (2 in - 1) out even goes negative at in = 0): None, not a division error.
          'flops_speedup': flops_dense / flops_pruned if flops_pruned > 0 else None,
          'memory_dense': memory_dense, 'memory_pruned': memory_pruned,
          'memory_percent': 100.0 * memory_pruned / memory_dense}


# ---------------------------------------------------------------------------------------
# The pruned model.
# ---------------------------------------------------------------------------------------


def _forward(plan: Plan, normalize: str, mean, std, params, x):
  """Logits float32[B, num_classes] of the pruned network for images x float32[B, H, W, C]."""
  x = models.normalize_images(x, normalize, mean, std)
  for op in plan.ops:
    if isinstance(op, Conv):
      p = params[op.name]
      x = jax.lax.conv_general_dilated(x, p['kernel'], (1, 1), op.padding,
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      # bias is float32[C] or a position-dependent map float32[H_out, W_out, C].
      x = x + p['bias'].reshape((1,) * (x.ndim - p['bias'].ndim) + p['bias'].shape)
    elif isinstance(op, Act):
      x = jax.nn.relu(x)
    elif isinstance(op, Pool):
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    elif isinstance(op, Flatten):
      x = x.reshape((x.shape[0], -1))
    elif isinstance(op, Dense):
      p = params[op.name]
      if 'gather' in p:  # the kept input features, int32[in_kept] into the present ones
        x = jnp.take(x, p['gather'], axis=1)
      x = x @ p['kernel'] + p['bias'][None, :]
  return x


@dataclasses.dataclass(frozen=True, eq=False)  # identity hash, so jax.jit(pm.apply) works
class PrunedModel:
  """A physically pruned network.

  params: {layer name: {'kernel', 'bias', and for dense layers maybe 'gather'}}; conv kernels
    float32[k, k, C_in_kept, C_out_kept], conv bias float32[C_out_kept] or a bias map
    float32[H_out, W_out, C_out_kept]; dense kernels float32[in_kept, out_kept], 'gather'
    int32[in_kept] (indices into the flattened present features).
  active_units: {mask site: units with z != 0} of the source masks (the counts the ANP
    authors report; count_flops_and_memory takes them).
  """
  model_name: str
  plan: Plan
  params: dict[str, dict[str, jax.Array]]
  normalize: str
  mean: tuple[float, ...]
  std: tuple[float, ...]
  num_classes: int
  input_shape: tuple[int, int, int]
  active_units: dict[str, int]

  def forward(self, params, x):
    """Pure logits function of (params, x); jit it to pass params as arguments."""
    return _forward(self.plan, self.normalize, self.mean, self.std, params, x)

  def apply(self, x):
    """Logits float32[B, num_classes] for images float32[B, H, W, C] in [0, 1]."""
    return self.forward(self.params, x)

  @property
  def num_params(self) -> int:
    """Stored float parameters (kernels, biases and bias maps; gather indices excluded)."""
    return sum(int(a.size) for a in jax.tree_util.tree_leaves(self.params)
               if jnp.issubdtype(a.dtype, jnp.floating))


def _needed(plan: Plan, i: int, masks, shapes, width: int) -> np.ndarray:
  """bool[width]: the output units of op i that its consumer reads (mask entry != 0)."""
  flat = None
  for j in range(i + 1, len(plan.ops)):
    op = plan.ops[j]
    if isinstance(op, (Act, Pool)):
      continue
    if isinstance(op, Flatten):
      flat = shapes[j]
      continue
    if isinstance(op, Dense) and op.in_mask in masks:
      nz = masks[op.in_mask] != 0
      # After a flatten, a channel is read if any of its H*W positions is.
      return nz.reshape(flat).any(axis=(0, 1)) if flat is not None else nz
    break
  return np.ones(width, bool)


def _nonempty(idx: np.ndarray) -> np.ndarray:
  # Fully pruned: keep the first unit (see the module docstring) instead of zero width.
  return idx if idx.size else np.zeros(1, np.int64)


def _bn_affine(variables, name, eps, idx):
  """Eval-mode BatchNorm as y * s + t on units idx (float64)."""
  p, st = variables['params'][name], variables['batch_stats'][name]
  scale = np.asarray(p['scale'], np.float64)[idx]
  s = scale / np.sqrt(np.asarray(st['var'], np.float64)[idx] + eps)
  t = np.asarray(p['bias'], np.float64)[idx] - np.asarray(st['mean'], np.float64)[idx] * s
  return s, t


def _const_conv_map(v: np.ndarray, h: int, w: int, padding: str) -> np.ndarray:
  """Conv of constant input channels: float64[H_out, W_out, C_out] (VALID: [C_out]).

  v: float64[k, k, C_out], sum over the constant channels of c * kernel slice. With SAME zero
  padding an output position only sees the kernel offsets that land inside the image.
  """
  k = v.shape[0]
  if padding == 'VALID':
    return v.sum(axis=(0, 1))  # every output position sees the whole kernel
  lo = (k - 1) // 2  # lax's SAME padding (low side) for stride 1
  ind_h = np.array([[0 <= r + i - lo < h for r in range(h)] for i in range(k)], np.float64)
  ind_w = np.array([[0 <= r + j - lo < w for r in range(w)] for j in range(k)], np.float64)
  return np.einsum('ih,jw,ijo->hwo', ind_h, ind_w, v)


def export_pruned(model: nn.Module, variables: Mapping[str, Any],
                  input_shape: Sequence[int] | None = None) -> PrunedModel:
  """Exports the eval-mode masked network with the pruned units physically removed.

  Args:
    model: a lenet5_caffe or vgg16_anp registry model, plain or masked (its hook, masks or
      defenses, is ignored: the export computes the network with the test masks found in
      `variables`; a site without a mask counts as z = 1).
    variables: {'params' (with the bb_a_uc/bb_b_uc masks), 'batch_stats'?}.
    input_shape: (H, W, C); defaults to the plan's. Fixes the bias-map and flatten sizes.

  Returns:
    PrunedModel whose apply(x) equals masked.apply(variables, x, train=False).

  Raises:
    ValueError: unsupported model (naming model.name), or params that do not fit the plan.
  """
  model_name = model_name_of(model)
  plan = PLANS[model_name]
  input_shape = tuple(int(s) for s in (input_shape or plan.input_shape))
  num_classes = int(model.num_classes)
  shapes = _shapes(plan, input_shape, num_classes)
  masks = {k: np.asarray(v, np.float64) for k, v in pruning.test_masks(variables['params']).items()}
  f64 = lambda a: np.asarray(a, np.float64)

  # The current feature map: `present` lists the full-network units physically kept (in
  # order); the others are constant (`const`, over all units) or unread by the consumer.
  present = np.arange(input_shape[-1])
  const = np.zeros(input_shape[-1])
  out_params = {}
  for i, op in enumerate(plan.ops):
    if isinstance(op, Conv):
      w, b = f64(variables['params'][op.name]['kernel']), f64(variables['params'][op.name]['bias'])
      expected = (op.kernel, op.kernel, shapes[i][2], op.features)
      if w.shape != expected:
        raise ValueError(f'{op.name} kernel has shape {w.shape}, the {model_name} plan for '
                         f'input {input_shape} expects {expected}')
      z = masks.get(op.out_mask, np.ones(op.features))
      absent = np.setdiff1d(np.arange(w.shape[2]), present)
      v = np.einsum('ijco,c->ijo', w[:, :, absent, :], const[absent])
      extra = (_const_conv_map(v, shapes[i][0], shapes[i][1], op.padding) if np.any(v)
               else np.zeros(op.features))
      keep = _nonempty(np.nonzero((z != 0) & _needed(plan, i, masks, shapes, op.features))[0])
      kernel = w[:, :, present][..., keep] * z[keep]  # z (w * x + b), z folded in
      bias = (b + extra)[..., keep] * z[keep]
      const = np.zeros(op.features)  # pruned (z = 0) channels are 0 before BN
      if op.bn:
        s, t = _bn_affine(variables, op.bn, plan.bn_epsilon, keep)
        kernel, bias = kernel * s, bias * s + t
        _, t_all = _bn_affine(variables, op.bn, plan.bn_epsilon, np.arange(op.features))
        const = np.where(z == 0, t_all, 0.0)  # BN(0) = t; unread channels do not matter
      out_params[op.name] = {'kernel': kernel, 'bias': bias}
      present = keep
    elif isinstance(op, Act):
      const = np.maximum(const, 0.0)
    elif isinstance(op, Flatten):
      h, wd, c = shapes[i]
      present = (np.arange(h * wd)[:, None] * c + present[None, :]).reshape(-1)
      const = np.tile(const, h * wd)
    elif isinstance(op, Dense):
      w, b = f64(variables['params'][op.name]['kernel']), f64(variables['params'][op.name]['bias'])
      if w.shape != (shapes[i][0], shapes[i + 1][0]):
        raise ValueError(f'{op.name} kernel has shape {w.shape}, the {model_name} plan for '
                         f'input {input_shape} and {num_classes} classes expects '
                         f'{(shapes[i][0], shapes[i + 1][0])}')
      z = masks.get(op.in_mask, np.ones(w.shape[0]))
      absent = np.setdiff1d(np.arange(w.shape[0]), present)
      contrib = (const[absent] * z[absent]) @ w[absent]  # constant inputs, into the bias
      # Present inputs with z = 0 are dropped (a fully pruned one keeps a zero row).
      use = _nonempty(np.nonzero(z[present] != 0)[0])
      rows = present[use]
      keep = _nonempty(np.nonzero(_needed(plan, i, masks, shapes, w.shape[1]))[0])
      kernel = w[rows][:, keep] * z[rows][:, None]
      bias = (b + contrib)[keep]
      if op.bn:
        s, t = _bn_affine(variables, op.bn, plan.bn_epsilon, keep)
        kernel, bias = kernel * s, bias * s + t
      out_params[op.name] = {'kernel': kernel, 'bias': bias}
      if use.size != present.size:
        out_params[op.name]['gather'] = use
      present, const = keep, np.zeros(w.shape[1])
  params = {layer: {k: jnp.asarray(v, jnp.int32 if k == 'gather' else jnp.float32)
                    for k, v in p.items()} for layer, p in out_params.items()}
  active = {site: int(np.sum(masks[site] != 0)) if site in masks else n
            for site, n in mask_units(model_name, input_shape, num_classes).items()}
  return PrunedModel(model_name, plan, params, model.normalize, tuple(model.mean),
                     tuple(model.std), num_classes, input_shape, active)


# ---------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------


def _median_ms(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile (and warm up) outside the timing
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(1e3 * (time.perf_counter() - start))
  return statistics.median(times)


def measure_speedup(model: nn.Module, variables: Mapping[str, Any], pruned: PrunedModel,
                    batch_size: int = 256, input_shape: Sequence[int] | None = None,
                    repeats: int = 10, key: jax.Array | None = None) -> dict[str, Any]:
  """Wall-clock speedup of the pruned forward over the masked dense forward.

  Both are jitted with their parameters as arguments and run on the same uniform batch
  float32[batch_size, H, W, C]; each is compiled first, then timed `repeats` times
  (block_until_ready) and the median kept. The dense forward is `model` with the test masks
  of `variables` at the sites that have one (any other hook is replaced).

  Returns:
    {'dense_ms', 'pruned_ms', 'measured_speedup' (dense / pruned), 'batch_size', 'device'}.
  """
  input_shape = tuple(input_shape or pruned.input_shape)
  sites = tuple(pruning.mask_params(variables['params']))
  hook = pruning.mask_hook(pruning.Placement(sites), training=False) if sites else None
  masked = model.clone(hook=hook)
  key = jax.random.key(0) if key is None else key
  x = jax.random.uniform(key, (batch_size, *input_shape), jnp.float32)
  dense_fn = jax.jit(lambda v, x: masked.apply(v, x, train=False))
  dense_ms = _median_ms(dense_fn, (variables, x), repeats)
  pruned_ms = _median_ms(jax.jit(pruned.forward), (pruned.params, x), repeats)
  return {'dense_ms': dense_ms, 'pruned_ms': pruned_ms, 'measured_speedup': dense_ms / pruned_ms,
          'batch_size': batch_size, 'device': jax.devices()[0].device_kind}


# ---------------------------------------------------------------------------------------
# Saving and loading.
# ---------------------------------------------------------------------------------------

_FORMAT = 'advdef.pruned_export/1'
_META = '__meta__'


def _plan_to_json(plan: Plan) -> dict[str, Any]:
  names = {t: n for n, t in _OP_TYPES.items()}
  return {'ops': [{'op': names[type(op)], **dataclasses.asdict(op)} for op in plan.ops],
          'input_shape': list(plan.input_shape), 'bn_epsilon': plan.bn_epsilon}


def _plan_from_json(d: Mapping[str, Any]) -> Plan:
  ops = tuple(_OP_TYPES[o['op']](**{k: v for k, v in o.items() if k != 'op'}) for o in d['ops'])
  return Plan(ops, tuple(d['input_shape']), d['bn_epsilon'])


def save_pruned(path: str | os.PathLike, pruned: PrunedModel) -> str:
  """Writes `pruned` to an .npz: one array per 'layer/name' plus a JSON '__meta__' string.

  The description (plan, model_name, normalization, shapes, active units) is plain JSON, so
  the file loads with allow_pickle=False. Returns the path written ('.npz' appended by
  numpy when missing).
  """
  arrays = {f'{layer}/{k}': np.asarray(v) for layer, p in pruned.params.items()
            for k, v in p.items()}
  meta = {'format': _FORMAT, 'model_name': pruned.model_name, 'plan': _plan_to_json(pruned.plan),
          'normalize': pruned.normalize, 'mean': list(pruned.mean), 'std': list(pruned.std),
          'num_classes': pruned.num_classes, 'input_shape': list(pruned.input_shape),
          'active_units': pruned.active_units,
          'shapes': {k: list(v.shape) for k, v in arrays.items()}}
  path = os.fspath(path)
  np.savez(path, **{_META: np.array(json.dumps(meta))}, **arrays)
  return path if path.endswith('.npz') else path + '.npz'


def load_pruned(path: str | os.PathLike) -> PrunedModel:
  """Reads a PrunedModel written by save_pruned.

  Raises:
    ValueError: not a pruned-export file, or arrays that disagree with its description.
  """
  with np.load(os.fspath(path), allow_pickle=False) as data:
    if _META not in data.files:
      raise ValueError(f'{path} is not a pruned-export .npz (no {_META} entry)')
    meta = json.loads(str(data[_META]))
    if meta.get('format') != _FORMAT:
      raise ValueError(f'{path}: format {meta.get("format")!r}, expected {_FORMAT!r}')
    params: dict[str, dict[str, jax.Array]] = {}
    for name, shape in meta['shapes'].items():
      arr = data[name]
      if list(arr.shape) != shape:
        raise ValueError(f'{path}: {name} has shape {arr.shape}, its description says {shape}')
      layer, k = name.split('/')
      params.setdefault(layer, {})[k] = jnp.asarray(arr)
  return PrunedModel(meta['model_name'], _plan_from_json(meta['plan']), params,
                     meta['normalize'], tuple(meta['mean']), tuple(meta['std']),
                     int(meta['num_classes']), tuple(meta['input_shape']),
                     {k: int(v) for k, v in meta['active_units'].items()})

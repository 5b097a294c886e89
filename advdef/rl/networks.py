"""The DQN Q-network: a Linen module with named defense sites, like the classifiers.

It is built from advdef.models' `_Base` (and its `_SiteMixin`), so every convolution input
and output, every dense-layer input and every activation is a `Site`, and every advdef
defense retrofits onto it by spec string exactly as on a classifier:

  net = networks.QNetwork(num_classes=env.num_actions)       # num_classes = actions
  variables = networks.init_variables(net, key, env.obs_shape)
  q = net.apply(variables, obs, train=False)                  # float32[B, A]
  q_fn = retrofit.make_logits_fn(net, variables, retrofit.build_hook('sap(frac=1.0)'))
  q = q_fn(obs, key)                                          # Q-values under SAP, one draw

Q-values play the role of logits: `logits_fn(x, key) -> float32[B, num_actions]`, so the
attacks of advdef.attacks and the Monte-Carlo helpers of advdef.defenses apply unchanged.

Architecture (MinAtar's DQN, Young & Tian 2019): conv 3x3, 16 filters, stride 1, VALID
(10x10 -> 8x8), ReLU, flatten, dense 128, ReLU, dense num_actions. Sites, in call order:
conv1_in (the model input: RSE's sigma_init), conv1_out, act1, fc1_in, act2, fc2_in.
Inputs are float32 [B, 10, 10, C] in [0, 1] and are not normalized (normalize='none'): the
binary channels are already on the scale the network is trained on.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from advdef import models


def patch_conv(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, precision=None):
  """A stride-1 NHWC/HWIO convolution as one matrix product over the input's patches.

  Drop-in for `lax.conv_general_dilated` in `nn.Conv` (same parameters, same values up to
  float summation order). Why: DQN differentiates through the network inside `lax.scan`,
  and XLA:CPU runs convolution gradients inside loops on a slow generic kernel (see
  advdef.layers.canonical_conv); on this 10x10 input a training iteration was 4x slower in
  the scan than alone (measured 54 vs 12 ms per update, batch 64, 2 shared cores). Patches
  of a 10x10 map are small (8x8 positions x 9 taps), and a matrix product (and both of its
  gradients) is fast anywhere.
  """
  if tuple(window_strides) != (1, 1) or feature_group_count != 1 or any(
      d is not None and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation)):
    raise ValueError('patch_conv supports stride 1, no dilation and no feature groups')
  expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
  if dimension_numbers is not None and dimension_numbers != expected:
    raise ValueError(f'patch_conv supports NHWC/HWIO only, got {dimension_numbers}')
  kh, kw, cin, cout = rhs.shape
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (1, 1), padding)
  x = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  # Taps in (i, j, channel) order, the order of rhs.reshape(kh * kw * cin, cout).
  patches = jnp.concatenate([x[:, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw)],
                            axis=-1)
  return jnp.dot(patches, rhs.reshape(kh * kw * cin, cout), precision=precision)


class QNetwork(models._Base):  # pylint: disable=protected-access  # the models' site base
  """Conv layers (3x3, VALID, bias) then one hidden dense layer; Q-values out.

  conv_features: filters of each 3x3 convolution (MinAtar: (16,)).
  hidden: width of the dense layer (MinAtar: 128).
  """
  conv_features: Sequence[int] = (16,)
  hidden: int = 128
  normalize: str = 'none'

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No dropout or BatchNorm: train and eval modes are the same network.
    x = self.prepare(x)
    for i, features in enumerate(self.conv_features):
      name = f'conv{i + 1}'
      # The sites of advdef.models._SiteMixin.conv, around a patch-matmul convolution.
      x = self.site('conv_in', x, f'{name}_in', is_model_input=i == 0)
      x = nn.Conv(features, (3, 3), padding='VALID', use_bias=True, name=name,
                  conv_general_dilated=patch_conv)(x)
      x = self.site('conv_out', x, f'{name}_out')
      x = self.site('act', x, f'act{i + 1}')
    x = x.reshape((x.shape[0], -1))
    x = self.site('act', self.dense(self.hidden, x, 'fc1'), f'act{len(self.conv_features) + 1}')
    return self.dense(self.num_classes, x, 'fc2')


def create_q_network(num_actions: int, *, conv_features: Sequence[int] = (16,),
                     hidden: int = 128) -> QNetwork:
  """The Q-network for `num_actions` actions.

  Raises:
    ValueError: naming the field when a size is not a positive int.
  """
  if not isinstance(num_actions, int) or num_actions < 2:
    raise ValueError(f'num_actions={num_actions!r} must be an int >= 2')
  features = tuple(conv_features)
  if not features or any(not isinstance(f, int) or f < 1 for f in features):
    raise ValueError(f'rl.network.conv_features={conv_features!r} must be a non-empty tuple '
                     'of positive ints')
  if not isinstance(hidden, int) or hidden < 1:
    raise ValueError(f'rl.network.hidden={hidden!r} must be a positive int')
  return QNetwork(num_classes=num_actions, conv_features=features, hidden=hidden)


def init_variables(network: nn.Module, key: jax.Array, obs_shape: Sequence[int]
                   ) -> dict[str, Any]:
  """{'params': ...} of `network` for observations of shape obs_shape ([H, W, C])."""
  x = jnp.zeros((1, *obs_shape), jnp.float32)
  return dict(network.init({'params': key}, x, train=False))

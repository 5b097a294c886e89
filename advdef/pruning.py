"""Beta-Bernoulli pruning masks (ANP-VS and its BP baseline), as in Madaan et al.'s code.

Each prunable unit k (a conv output channel, or an input neuron of a dense layer) carries a
mask z_k with prior pi_k ~ Beta(alpha, 1), z_k ~ Bernoulli(pi_k), alpha = 1e-4, and a
Kumaraswamy(a_k, b_k) posterior on pi_k with a = softplus(max(-10, a_uc)),
b = softplus(clip(b_uc, -10, 50)).

  training: one pi per unit per forward call, pi = (1 - u^(1/b))^(1/a), then a concrete
            (relaxed Bernoulli) mask per example, z = sigmoid((logit(u') + logit(pi)) / tau),
            tau = 0.1.
  test:     z = E[pi] = b Gamma(1 + 1/a) Gamma(b) / Gamma(1 + 1/a + b), and units with
            E[pi] <= 1e-3 are pruned (z = 0).

Masks live in the model's `params` as `bb_a_uc` / `bb_b_uc` of the `Site` they sit at
(advdef.models), so checkpoints, sharding and optimizers treat them like any parameter;
`mask_hook` builds the hook that creates and applies them. Placement follows the authors'
networks: LeNet-5-Caffe masks conv1/conv2 outputs and the inputs of fc1 (800) and fc2 (500);
VGG-16 masks the 13 conv outputs (before BatchNorm) and the inputs of fc1 and fc2.

  hook = pruning.mask_hook(pruning.default_placement('lenet5_caffe'), training=False)
  masked = model.clone(hook=hook)                   # deterministic test-time masks
  kl = pruning.kl_total(params)                     # sum over all masks, closed form
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import special

from advdef import models
from advdef import retrofit

PRIOR_ALPHA = 1e-4
TEMPERATURE = 0.1
PRUNE_THRESHOLD = 1e-3
B_UC_INIT = 0.5413  # softplus(0.5413) = 1.0
A_PARAM, B_PARAM = 'bb_a_uc', 'bb_b_uc'
EULER_GAMMA = 0.5772156649015329
_U_EPS = 1e-10


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where masks go. sites: globs over site names (conv_out and dense_in sites only).

  a_uc_init_conv / a_uc_init_dense: initial a_uc of masks at conv_out / dense_in sites
  (the authors use 2.0 for VGG conv masks, -1.0 elsewhere).
  """
  sites: tuple[str, ...]
  a_uc_init_conv: float = -1.0
  a_uc_init_dense: float = -1.0


# The authors' placements for their two networks; other models name their sites.
DEFAULT_PLACEMENTS = {
    'lenet5_caffe': Placement(('conv1_out', 'conv2_out', 'fc1_in', 'fc2_in')),
    'vgg16_anp': Placement(('conv*_out', 'fc1_in', 'fc2_in'), a_uc_init_conv=2.0),
}
MASKABLE_KINDS = ('conv_out', 'dense_in')


def default_placement(model_name: str) -> Placement:
  if model_name not in DEFAULT_PLACEMENTS:
    raise ValueError(f'model.name={model_name!r} has no default pruning-mask placement (the '
                     f'authors\' placements exist for {", ".join(DEFAULT_PLACEMENTS)}); name '
                     'the sites with mask_sites=[...] in train.recipe')
  return DEFAULT_PLACEMENTS[model_name]


def placement_from(model_name: str, mask_sites=None, a_uc_init_conv=None,
                   a_uc_init_dense=None) -> Placement:
  """The default placement of `model_name`, or one from explicit site globs."""
  if mask_sites is None:
    base = default_placement(model_name)
  else:
    if isinstance(mask_sites, str):
      mask_sites = (mask_sites,)
    if not mask_sites or not all(isinstance(s, str) and s for s in mask_sites):
      raise ValueError(f'train.recipe: mask_sites={mask_sites!r} must be a non-empty list of '
                       'site names or globs')
    base = Placement(tuple(mask_sites))
  return Placement(base.sites,
                   base.a_uc_init_conv if a_uc_init_conv is None else float(a_uc_init_conv),
                   base.a_uc_init_dense if a_uc_init_dense is None else float(a_uc_init_dense))


def masked_sites(placement: Placement, model: nn.Module, input_shape) -> list[tuple[str, str]]:
  """[(site_name, kind)] of the model's sites that get a mask.

  Raises:
    ValueError naming `train.recipe` when a glob matches no conv_out/dense_in site.
  """
  sites = [(n, k) for n, k in models.list_sites(model, input_shape) if k in MASKABLE_KINDS]
  names = [n for n, _ in sites]
  if not sites:
    raise ValueError('train.recipe: this model has no conv_out or dense_in sites to mask')
  for glob in placement.sites:
    if not any(fnmatch.fnmatchcase(n, glob) for n in names):
      raise ValueError(f'train.recipe: mask site {glob!r} matches no conv_out or dense_in site '
                       f'of this model; valid sites: {", ".join(names)}')
  return [(n, k) for n, k in sites if any(fnmatch.fnmatchcase(n, g) for g in placement.sites)]


# ---------------------------------------------------------------------------------------
# The distributions (pure functions of the unconstrained parameters).
# ---------------------------------------------------------------------------------------


def kumaraswamy_ab(a_uc, b_uc):
  """Posterior parameters (a, b) from the unconstrained ones, clipped as the authors do."""
  a = jax.nn.softplus(jnp.maximum(-10.0, a_uc))
  b = jax.nn.softplus(jnp.clip(b_uc, -10.0, 50.0))
  return a, b


def expected_pi(a_uc, b_uc):
  """E_q[pi] = b Gamma(1 + 1/a) Gamma(b) / Gamma(1 + 1/a + b), per unit."""
  a, b = kumaraswamy_ab(a_uc, b_uc)
  return b * jnp.exp(special.gammaln(1 + 1 / a) + special.gammaln(b)
                     - special.gammaln(1 + 1 / a + b))


def test_mask(a_uc, b_uc, threshold: float = PRUNE_THRESHOLD):
  """The deterministic test-time mask: E[pi], and exactly 0 where E[pi] <= threshold."""
  e = expected_pi(a_uc, b_uc)
  return jnp.where(e > threshold, e, 0.0)


def sample_log_pi(key, a_uc, b_uc):
  """log pi for one Kumaraswamy draw per unit (inverse CDF, in log space for tiny a)."""
  a, b = kumaraswamy_ab(a_uc, b_uc)
  u = jax.random.uniform(key, jnp.shape(a_uc), minval=_U_EPS, maxval=1 - _U_EPS)
  # pi = (1 - u^(1/b))^(1/a); log1p(-exp(.)) keeps 1 - u^(1/b) accurate near u = 1.
  log_pi = jnp.log1p(-jnp.exp(jnp.log(u) / b)) / a
  return jnp.clip(log_pi, -1e4, -1e-7)  # finite, so the logit and its gradient stay finite


def concrete_mask(key, log_pi, batch: int, temperature: float = TEMPERATURE):
  """Relaxed Bernoulli masks float32[batch, units] around pi = exp(log_pi)."""
  u = jax.random.uniform(key, (batch, log_pi.shape[-1]), minval=_U_EPS, maxval=1 - _U_EPS)
  logit_pi = log_pi - jnp.log(-jnp.expm1(log_pi))
  return jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + logit_pi[None, :]) / temperature)


def kl_divergence(a_uc, b_uc, alpha: float = PRIOR_ALPHA):
  """KL[Kumaraswamy(a, b) || Beta(alpha, 1)] per unit, in closed form (Nalisnick & Smyth)."""
  a, b = kumaraswamy_ab(a_uc, b_uc)
  return ((1 - alpha / a) * (-EULER_GAMMA - special.digamma(b) - 1 / b)
          + jnp.log(a * b / alpha) - (b - 1) / b)


# ---------------------------------------------------------------------------------------
# Masks in a model's parameters.
# ---------------------------------------------------------------------------------------


def mask_params(params) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{site_name: (a_uc, b_uc)} for every mask in a params tree, in tree order."""
  out = {}
  for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items():
    if path[-1] == A_PARAM:
      site = '/'.join(path[:-1])
      out[site] = (leaf, out.get(site, (None, None))[1])
    elif path[-1] == B_PARAM:
      site = '/'.join(path[:-1])
      out[site] = (out.get(site, (None, None))[0], leaf)
  return out


def is_mask_param(path: Sequence[Any]) -> bool:
  """True for a flattened params path that ends in a mask parameter."""
  last = path[-1]
  last = getattr(last, 'key', last)
  return last in (A_PARAM, B_PARAM)


def kl_total(params, alpha: float = PRIOR_ALPHA):
  """Sum of the KL over every unit of every mask in `params` (0 when there are none)."""
  total = jnp.zeros((), jnp.float32)
  for a_uc, b_uc in mask_params(params).values():
    total = total + jnp.sum(kl_divergence(a_uc, b_uc, alpha))
  return total


def test_masks(params, threshold: float = PRUNE_THRESHOLD) -> dict[str, np.ndarray]:
  """{site_name: float32[units] test mask} (E[pi] with pruned units at 0)."""
  return {site: np.asarray(test_mask(a, b, threshold))
          for site, (a, b) in mask_params(params).items()}


def sparsity_summary(params, threshold: float = PRUNE_THRESHOLD) -> dict[str, Any]:
  """Units kept per mask and the sparsity as the ANP code reports it.

  sparsity_percent = 100 - 100 * sum(active units) / sum(units), over every mask.
  """
  masks = test_masks(params, threshold)
  units = {site: int(m.size) for site, m in masks.items()}
  active = {site: int(np.sum(m > 0)) for site, m in masks.items()}
  total = sum(units.values())
  sparsity = 100.0 - 100.0 * sum(active.values()) / total if total else 0.0
  return {'units': units, 'active_units': active, 'sparsity_percent': sparsity}


# ---------------------------------------------------------------------------------------
# The hook.
# ---------------------------------------------------------------------------------------


def _mask_fn(placement: Placement, training: bool, temperature: float):
  def fn(key, x, site):
    init = placement.a_uc_init_conv if site.kind == 'conv_out' else placement.a_uc_init_dense
    units = x.shape[-1]
    a_uc = site.param(A_PARAM, nn.initializers.constant(init), (units,), jnp.float32)
    b_uc = site.param(B_PARAM, nn.initializers.constant(B_UC_INIT), (units,), jnp.float32)
    if training:
      pi_key, z_key = jax.random.split(key)
      z = concrete_mask(z_key, sample_log_pi(pi_key, a_uc, b_uc), x.shape[0], temperature)
      z = z.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (units,))
    else:
      z = test_mask(a_uc, b_uc).reshape((1,) * (x.ndim - 1) + (units,))
    return x * z.astype(x.dtype)
  return fn


def _capture(key, x, site):
  del key
  site.sow('intermediates', 'latent', x)
  return x


def mask_transforms(placement: Placement, *, training: bool,
                    temperature: float = TEMPERATURE) -> list[retrofit.SiteTransform]:
  """Site transforms applying the masks (sampled when `training`, else the test mask)."""
  fn = _mask_fn(placement, training, temperature)
  return [retrofit.SiteTransform('bbmask', kind, fn, stochastic=training, in_training=True,
                                 sites=placement.sites) for kind in MASKABLE_KINDS]


def feature_capture_transforms() -> list[retrofit.SiteTransform]:
  """Sows every activation's output, and every 'latent' site's tensor, into 'intermediates',
  in call order: the latent features of the VS term and of the vulnerability metric, as the
  authors' `temp_x` lists them (LeNet-5-Caffe: its 3 activations; vgg16_anp: its 13 conv
  activations, fc1's output before BN, then act14, 15 tensors). Masks are never placed at
  'latent' sites. Apply with mutable=['intermediates']."""
  return [retrofit.SiteTransform('capture', stage, _capture, stochastic=False,
                                 in_training=True) for stage in ('post_act', 'latent')]


def mask_hook(placement: Placement | None, *, training: bool,
              capture_features: bool = False) -> retrofit.Retrofit | None:
  transforms = mask_transforms(placement, training=training) if placement else []
  if capture_features:
    transforms += feature_capture_transforms()
  return retrofit.Retrofit(transforms, training=training) if transforms else None


def latent_features(intermediates) -> list[jax.Array]:
  """The sown features, in call order, from an 'intermediates' collection.

  Call it on the collection `apply` returns, inside the traced function: a dict that has
  been through jax.jit's outputs comes back with its keys sorted (act10 before act2).
  """
  leaves = []
  for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates)).items():
    if path[-1] == 'latent':
      leaves.extend(value)
  return leaves


def vulnerability(features_clean: Sequence[jax.Array], features_adv: Sequence[jax.Array]):
  """V = mean over layers of the mean |z(x) - z(x_adv)| (the authors' Net.vulnerability)."""
  if not features_clean:
    raise ValueError('vulnerability needs at least one latent feature')
  terms = [jnp.mean(jnp.abs(a - b)) for a, b in zip(features_clean, features_adv)]
  return sum(terms) / len(terms)


def vulnerability_per_example(features_clean: Sequence[jax.Array],
                              features_adv: Sequence[jax.Array]) -> jax.Array:
  """float32[B]: each example's V; their mean over a batch is `vulnerability`."""
  if not features_clean:
    raise ValueError('vulnerability needs at least one latent feature')
  terms = [jnp.mean(jnp.abs(a - b).reshape(a.shape[0], -1), axis=1)
           for a, b in zip(features_clean, features_adv)]
  return sum(terms) / len(terms)

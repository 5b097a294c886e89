"""Retrofitting defenses onto any registry model through its sites, from spec strings.

A defense spec names one or more transforms (`'sap(frac=1.0)'`, `'jump(kappa=0.5)'`,
`'rse(sigma_init=0.2, sigma_inner=0.1) + jump(kappa=0.1)'`, `'none'`). `build_hook` turns it
into a model hook (see advdef.models) that applies the pure transforms of advdef.defenses
at the matching sites; the model's parameters are untouched.

Registry (faithful placement by default; `sites=<glob>` restricts to matching site names):
  none                       the plain model, bit for bit
  sap(frac=1.0, placement=relu|conv, gradient=constant|through_scale|identity,
      sampler=exact|bernoulli)
      relu: after every activation (the authors' ResNet-20); conv: after every convolution,
      before BatchNorm (Athalye et al.'s re-implementation). Inference only.
      gradient=identity is BPDA: SAP's forward values, the identity backward.
  jump(kappa, surrogate=None|relu|sigmoid, temperature=0.1)
      replaces every ReLU at inference; training keeps ReLU (the retrofit idea).
  rse(sigma_init=0.2, sigma_inner=0.1)
      Gaussian noise before every convolution (sigma_init on the model input); active in
      training and at inference.
  noise(sigma, placement=input|conv_in|act)
      Gaussian noise at one kind of site (a baseline; 'input' = first conv input only).

Hyperparameters may be traced: `make_hook([('sap', {'frac': frac_tracer})])` inside a
vmapped function gives one compiled sweep over a grid.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax

from advdef import config_utils
from advdef import defenses
from advdef import models
from advdef import validate

# Where a transform acts. 'activation' replaces the nonlinearity at act sites; 'post_act'
# runs after it; the rest are site kinds of advdef.models.
STAGES = ('activation', 'post_act', 'conv_in', 'conv_out', 'dense_in')


@dataclasses.dataclass(frozen=True)
class SiteTransform:
  """One transform at one kind of site.

  fn: (key or None, x, site) -> x. `key` is None when not `stochastic`.
  """
  name: str
  stage: str
  fn: Callable[[Any, jax.Array, models.Site], jax.Array]
  stochastic: bool
  in_training: bool
  sites: str | tuple[str, ...] = '*'  # a glob over site names, or several

  def matches(self, site: models.Site) -> bool:
    globs = (self.sites,) if isinstance(self.sites, str) else self.sites
    return any(fnmatch.fnmatchcase(site.site_name, g) for g in globs)


class Retrofit:
  """A model hook applying site transforms. `training` keeps only in-training transforms."""

  def __init__(self, transforms: Sequence[SiteTransform], *, training: bool = False):
    self.transforms = tuple(t for t in transforms if t.in_training or not training)
    self.training = training

  @property
  def stochastic(self) -> bool:
    return any(t.stochastic for t in self.transforms)

  def _apply(self, stage, site, x):
    for t in self.transforms:
      if t.stage == stage and t.matches(site):
        key = site.make_rng('defense') if t.stochastic else None
        x = t.fn(key, x, site)
    return x

  def __call__(self, site: models.Site, x: jax.Array) -> jax.Array:
    if site.kind == 'act':
      replacements = [t for t in self.transforms if t.stage == 'activation' and t.matches(site)]
      if len(replacements) > 1:
        raise ValueError(f'two defenses replace the activation at {site.site_name}: '
                         f'{[t.name for t in replacements]}')
      x = replacements[0].fn(None, x, site) if replacements else nn.relu(x)
      return self._apply('post_act', site, x)
    return self._apply(site.kind, site, x)


def _check(field, value, *, allow_zero):
  """Checks concrete hyperparameters early; traced ones (sweeps) are checked by the caller."""
  validate.check_hyperparameter(field, value, strict=not allow_zero, scalar=True)


def _sap(frac=1.0, placement='relu', gradient='constant', sampler='exact', max_frac=None,
         sites='*'):
  _check('sap.frac', frac, allow_zero=False)
  validate.check_choice('sap.placement', placement, ('relu', 'conv'))
  validate.check_choice('sap.gradient', gradient,
                        defenses.SAP_GRADIENTS + (defenses.SAP_BPDA_GRADIENT,))
  validate.check_choice('sap.sampler', sampler, ('exact', 'bernoulli'))
  if sampler == 'exact':
    fn = lambda key, x, site: defenses.sap(key, x, frac=frac, gradient=gradient,
                                           max_frac=max_frac)
  else:
    fn = lambda key, x, site: defenses.sap_bernoulli(key, x, frac=frac, gradient=gradient)
  stage = 'post_act' if placement == 'relu' else 'conv_out'
  return [SiteTransform('sap', stage, fn, stochastic=True, in_training=False, sites=sites)]


def _jump(kappa, surrogate=None, temperature=0.1, sites='*'):
  _check('jump.kappa', kappa, allow_zero=True)
  _check('jump.temperature', temperature, allow_zero=False)
  if surrogate is not None:
    validate.check_choice('jump.surrogate', surrogate, (None, 'relu', 'sigmoid'))
  kwargs = dict(kappa=kappa, surrogate=surrogate)
  if surrogate == 'sigmoid':
    kwargs['temperature'] = temperature
  fn = lambda key, x, site: defenses.jump_relu(x, **kwargs)
  return [SiteTransform('jump', 'activation', fn, stochastic=False, in_training=False,
                        sites=sites)]


def _rse(sigma_init=0.2, sigma_inner=0.1, sites='*'):
  _check('rse.sigma_init', sigma_init, allow_zero=True)
  _check('rse.sigma_inner', sigma_inner, allow_zero=True)
  def fn(key, x, site):
    sigma = sigma_init if site.is_model_input else sigma_inner
    return defenses.gaussian_noise(key, x, sigma=sigma)
  return [SiteTransform('rse', 'conv_in', fn, stochastic=True, in_training=True, sites=sites)]


def _noise(sigma, placement='input', sites='*'):
  _check('noise.sigma', sigma, allow_zero=True)
  validate.check_choice('noise.placement', placement, ('input', 'conv_in', 'act'))
  def fn(key, x, site):
    if placement == 'input' and not site.is_model_input:
      return x
    return defenses.gaussian_noise(key, x, sigma=sigma)
  stage = {'input': 'conv_in', 'conv_in': 'conv_in', 'act': 'post_act'}[placement]
  # Drawing a key at sites the transform skips is harmless: keys are per site.
  return [SiteTransform('noise', stage, fn, stochastic=True, in_training=True, sites=sites)]


DEFENSES: dict[str, Callable[..., list[SiteTransform]]] = {
    'none': lambda: [],
    'sap': _sap,
    'jump': _jump,
    'rse': _rse,
    'noise': _noise,
}


def make_transforms(parsed: Sequence[tuple[str, dict[str, Any]]], *,
                    field: str = 'defense') -> list[SiteTransform]:
  """Builds transforms from parsed (name, kwargs) pairs; kwargs may hold tracers."""
  transforms = []
  for name, kwargs in parsed:
    if name not in DEFENSES:
      raise ValueError(f'{field}: unknown defense {name!r}; valid names: '
                       f'{", ".join(DEFENSES)}')
    try:
      transforms += DEFENSES[name](**kwargs)
    except TypeError as e:
      raise ValueError(f'{field}: bad arguments for {name!r}: {e}') from None
  return transforms


def build_hook(spec: str, *, training: bool = False, field: str = 'defense') -> Retrofit | None:
  """Spec string -> model hook; None for 'none' (the plain model, bit for bit)."""
  transforms = make_transforms(config_utils.parse_spec(spec, field=field), field=field)
  hook = Retrofit(transforms, training=training)
  return hook if hook.transforms else None


@dataclasses.dataclass(frozen=True)
class DefenseSpec:
  """A defense spec string, parsed and built once (at config validation) and passed on."""
  text: str                # as written in the config, e.g. 'sap(frac=0.5)'
  hook: Retrofit | None    # None for 'none'

  @property
  def label(self) -> str:
    """The compact name the report shows, e.g. 'sap(frac=0.5)'."""
    return config_utils.spec_name(self.text)

  @property
  def stochastic(self) -> bool:
    return self.hook is not None and self.hook.stochastic


def parse_defense(text: str, *, field: str = 'defense') -> DefenseSpec:
  """Spec string -> DefenseSpec; raises ValueError naming `field` on a bad spec."""
  return DefenseSpec(text, build_hook(text, field=field))


def validate_for_model(defense: DefenseSpec | str, model: nn.Module, input_shape, *,
                       field='defense') -> None:
  """Checks a defense (parsed, or a spec string) against a model's sites before compute:
  every transform must match a site of its kind."""
  if isinstance(defense, str):
    defense = parse_defense(defense, field=field)
  spec = defense.text
  transforms = defense.hook.transforms if defense.hook is not None else ()
  sites = models.list_sites(model, input_shape)
  for t in transforms:
    kinds = {'activation': 'act', 'post_act': 'act'}.get(t.stage, t.stage)
    names = [n for n, k in sites if k == kinds]
    if not any(fnmatch.fnmatchcase(n, t.sites) for n in names):
      raise ValueError(f'{field}={spec!r}: {t.name} matches no {kinds} site of this model '
                       f'(sites={t.sites!r}); valid {kinds} sites: {", ".join(names)}')


def compose(base: Retrofit | None, extra: Retrofit | None) -> Retrofit | None:
  """One hook running `base`'s transforms (e.g. a model's pruning masks) before `extra`'s."""
  if base is None or extra is None:
    return base if extra is None else extra
  if not isinstance(base, Retrofit) or not isinstance(extra, Retrofit):
    raise TypeError('only Retrofit hooks compose; got '
                    f'{type(base).__name__} and {type(extra).__name__}')
  return Retrofit(base.transforms + extra.transforms, training=extra.training)


def with_defense(model: nn.Module, hook: Retrofit | None) -> nn.Module:
  """The model with a defense hook added after the hook it already has (its masks)."""
  return model.clone(hook=compose(model.hook, hook))


def make_logits_fn(model: nn.Module, variables, hook=None):
  """Returns logits_fn(x, key) -> logits for the (possibly defended) model in eval mode.

  x: float32[B, H, W, C] in [0, 1]; the key feeds the defense's randomness. A hook the
  model already carries (pruning masks) stays, and runs before the defense's.
  """
  defended = with_defense(model, hook)

  def logits_fn(x, key):
    return defended.apply(variables, x, train=False, rngs={'defense': key})

  return logits_fn

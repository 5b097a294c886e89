"""Attacks on a DQN agent's observations, and the defended agent's decision rule.

At every time step the attacker perturbs the observation the agent is about to act on, to
change its greedy action (the SAP paper's RL experiment: FGSM on the input frames of
pre-trained Atari agents, here MinAtar). The Q-network's Q-values are its logits:

  logits_fn(x, key) = Q(x) of the defended network   (advdef.retrofit.make_logits_fn)
  y = the clean greedy action, as the attacker sees it: argmax_a Q(x, a), or for a stochastic
      defense argmax_a of the mean Q over its `eot_samples` draws (attack keys)
  x_adv = attack(logits_fn, key, x, y, eps=lambda, loss=margin, eot_samples=...)

with the attacks of advdef.attacks (`fgsm`, the paper's; `pgd`) under their role signature,
and `random_sign`, the control: every cell moved by +-lambda at random, the same L-inf size.
The default loss is the margin max_{a != y} Q_a - Q_y, positive exactly when the greedy
action changed (`loss=ce` treats softmax(Q) as a policy, as Huang et al. 2017 did).

Threat model (continuous relaxation). MinAtar observations are binary, one channel per kind
of object. The attacker may set every cell to any value in [0, 1] within an L-inf ball of
radius lambda around the true observation, and the network sees those real values (it takes
float inputs). This is the attacker's strongest model at a given lambda: a perturbation that
only rounded to {0, 1} would have to flip whole cells (lambda >= 0.5 to do anything), so
small budgets could not be compared with the SAP paper's FGSM on pixels, which is this
relaxation on 8-bit frames. A discrete flip budget (at most k cells flipped, an L0 threat)
is the natural alternative for binary inputs; it is not built here.

Adaptive attacker. For stochastic defenses (SAP, RSE) the attacker uses EOT: every gradient
is the mean over `eot_samples` draws of the defense's randomness, from the attack's own
keys. For JumpReLU it differentiates through ReLU's gradient (BPDA, `surrogate=relu`; the
forward pass is the defense's own), as advdef's classifier suite does.

Decision rule (`make_decision_fn`). A stochastic defense acts on the mean Q-values over
`num_draws` fresh draws (decision keys, independent of the attack's); a deterministic one on
its Q-values. Ties go to the lowest action (argmax).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from advdef import attacks
from advdef import config_utils
from advdef import retrofit

# Observation attacks by name; fgsm and pgd are advdef.attacks', random_sign is the control.
NAMES = ('fgsm', 'pgd', 'random_sign')
# Set by the evaluation (the budget, the threat model, EOT), never by the attack spec.
_RESERVED = ('eps', 'norm', 'eot_samples', 'eot_average')


def random_sign(logits_fn, key: jax.Array, x: jax.Array, y: jax.Array, *, eps) -> jax.Array:
  """Every coordinate moved by +eps or -eps (fair coin), then clipped to [0, 1].

  The control for the gradient attacks: a perturbation of the same L-inf size that knows
  nothing about the network. logits_fn and y are unused (the attack role signature).
  """
  del logits_fn, y
  sign = jnp.where(jax.random.bernoulli(key, 0.5, x.shape), 1.0, -1.0).astype(x.dtype)
  return jnp.clip(x + jnp.asarray(eps, x.dtype) * sign, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class ObservationAttack:
  """An attack spec string, parsed and checked once at config validation."""
  text: str
  name: str
  kwargs: tuple[tuple[str, Any], ...]   # hashable: the compiled evaluation closes over it

  @property
  def label(self) -> str:
    return config_utils.spec_name(self.text)

  @property
  def fn(self) -> Callable[..., jax.Array]:
    return random_sign if self.name == 'random_sign' else attacks.get_attack(self.name)

  def hparams(self) -> dict[str, Any]:
    """The attack's keyword arguments: the spec's, with the margin loss by default."""
    kwargs = dict(self.kwargs)
    if self.name != 'random_sign':
      kwargs.setdefault('loss', 'margin')
    return kwargs


def parse_attack(text: str, *, field: str = 'eval.attacks') -> ObservationAttack:
  """'fgsm', 'pgd(steps=10)', 'random_sign' -> ObservationAttack.

  Raises:
    ValueError: naming `field`, for an unknown attack, a stack, an argument the evaluation
      sets itself, or arguments the attack rejects (checked by tracing it on a toy model).
  """
  parsed = config_utils.parse_spec(text, field=field)
  if len(parsed) != 1:
    raise ValueError(f'{field}={text!r}: one attack per entry, got {len(parsed)}')
  name, kwargs = parsed[0]
  if name not in NAMES:
    raise ValueError(f'{field}={text!r}: unknown observation attack {name!r}; valid names: '
                     f'{", ".join(NAMES)}')
  reserved = sorted(set(kwargs) & set(_RESERVED))
  if reserved:
    raise ValueError(f'{field}={text!r}: {", ".join(reserved)} are set by the evaluation '
                     '(eval.epsilons, L-inf, eval.eot_samples); remove them')
  attack = ObservationAttack(text, name, tuple(sorted(kwargs.items())))
  x = jax.ShapeDtypeStruct((2, 4, 4, 1), jnp.float32)
  y = jax.ShapeDtypeStruct((2,), jnp.int32)
  toy = lambda x, key: x.reshape((x.shape[0], -1))[:, :3]
  try:
    jax.eval_shape(lambda x, y: attack.fn(toy, jax.random.key(0), x, y, eps=0.1,
                                          **attack.hparams()), x, y)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{field}={text!r}: {e}') from None
  return attack


def attacker_defense(defense: retrofit.DefenseSpec) -> retrofit.DefenseSpec:
  """The defense as the adaptive attacker differentiates it: JumpReLU through ReLU's
  gradient (BPDA); SAP and RSE unchanged (their own gradient, averaged by EOT)."""
  if defense.hook is None:
    return defense
  parts, changed = [], False
  for name, kwargs in config_utils.parse_spec(defense.text):
    if name == 'jump' and kwargs.get('surrogate') is None:
      kwargs, changed = dict(kwargs, surrogate='relu'), True
    args = ', '.join(f'{k}={v!r}' if isinstance(v, str) else f'{k}={v}'
                     for k, v in kwargs.items())
    parts.append(f'{name}({args})' if args else name)
  return retrofit.parse_defense(' + '.join(parts)) if changed else defense


def mean_q(q_fn, x: jax.Array, key: jax.Array, num_draws: int) -> jax.Array:
  """float32[B, A]: the mean of q_fn(x, k) over `num_draws` keys split from `key`."""
  keys = jax.random.split(key, num_draws)
  return jnp.mean(jax.vmap(lambda k: q_fn(x, k))(keys), axis=0)


def make_decision_fn(network, defense: retrofit.DefenseSpec, *, num_draws: int):
  """Returns decide(variables, x, key) -> (action int32[B], q float32[B, A]).

  Deterministic defenses: argmax of their Q-values (the key is unused). Stochastic ones:
  argmax of the mean Q over `num_draws` draws from `key` (pass fresh, scoring-only keys).
  x may carry extra leading axes ([..., B, H, W, C]): every slice is decided with the same
  draws, in one instance of the network (compiled once).
  """
  if defense.stochastic and (not isinstance(num_draws, int) or num_draws < 1):
    raise ValueError(f'eval.num_draws={num_draws!r} must be a positive int')

  def decide_one(variables, x, key):
    q_fn = retrofit.make_logits_fn(network, variables, defense.hook)
    q = mean_q(q_fn, x, key, num_draws) if defense.stochastic else q_fn(x, key)
    return jnp.argmax(q, axis=-1).astype(jnp.int32), q

  def decide(variables, x, key):
    fn = decide_one
    for _ in range(x.ndim - 4):  # the key is not mapped: the same draws for every slice
      fn = jax.vmap(fn, in_axes=(None, 0, None))
    return fn(variables, x, key)

  return decide


def make_perturb_fn(network, defense: retrofit.DefenseSpec,
                    attack_list: Sequence[ObservationAttack], *, eot_samples: int):
  """Returns perturb(variables, x, key, eps, attack_index) -> x_adv float32[B, H, W, C].

  One function for every attack of `attack_list`, chosen by `attack_index` (an int32
  scalar, traced: `lax.switch`), so the evaluation compiles one program per defense, not
  one per (defense, attack): the label estimate is shared, and on XLA:CPU every instance of
  a stochastic defense in a program costs seconds of compiling (advdef README,
  Performance). x_adv is within eps of x in L-inf and in [0, 1]; eps may be traced. The
  attacker's randomness (its label estimate, EOT draws, random starts) comes from `key`.
  """
  if not attack_list:
    raise ValueError('make_perturb_fn needs at least one attack')
  seen = attacker_defense(defense)
  stochastic = seen.stochastic
  if stochastic and (not isinstance(eot_samples, int) or eot_samples < 1):
    raise ValueError(f'eval.eot_samples={eot_samples!r} must be a positive int')
  hparams = []
  for attack in attack_list:
    kwargs = attack.hparams()
    if stochastic and attack.name != 'random_sign':
      kwargs['eot_samples'] = eot_samples
    hparams.append(kwargs)

  def perturb(variables, x, key, eps, attack_index):
    q_fn = retrofit.make_logits_fn(network, variables, seen.hook)
    label_key, attack_key = jax.random.split(key)
    q = mean_q(q_fn, x, label_key, eot_samples) if stochastic else q_fn(x, label_key)
    y = jnp.argmax(q, axis=-1).astype(jnp.int32)
    branches = [functools.partial(lambda fn, kw, x: fn(q_fn, attack_key, x, y, eps=eps, **kw),
                                  attack.fn, kw) for attack, kw in zip(attack_list, hparams)]
    return lax.switch(attack_index, branches, x)

  return perturb

"""Config helpers: every field's default (`base_config`), argument strings, component specs.

Configs hold only primitives (big_vision style). Components that take hyperparameters are
written as spec strings, `name` or `name(key=value, ...)`, stacked with `+`:

  'none'   'sap(frac=0.5)'   'rse(sigma_init=0.2, sigma_inner=0.1) + jump(kappa=0.5)'
  'pgd(steps=40, restarts=1, loss=ce)'

Values are Python literals; a bare word is a string (`loss=ce`).
"""

from __future__ import annotations

import ast
import re
from typing import Any, Sequence

import ml_collections

from advdef import validate

_SPEC_RE = re.compile(r'^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$', re.S)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config argument string 'smoke,epochs=3' against typed defaults.

  A bare word sets a bool default to True. Unknown keys raise, listing the valid ones.
  """
  result = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return result
  for part in arg.split(','):
    part = part.strip()
    if not part:
      continue
    key, _, value = part.partition('=')
    if key not in defaults:
      raise ValueError(f'config argument {key!r} is unknown; valid: {", ".join(defaults)}')
    default = defaults[key]
    if not _:
      if not isinstance(default, bool):
        raise ValueError(f'config argument {key!r} needs a value ({key}=...)')
      result[key] = True
    elif isinstance(default, bool):
      result[key] = value.lower() in ('1', 'true', 'yes', 'y')
    else:
      result[key] = type(default)(value) if default is not None else value
  return result


def _literal(text: str) -> Any:
  text = text.strip()
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if re.fullmatch(r'[A-Za-z_][A-Za-z0-9_.*/\-]*', text):
      return text  # A bare word is a string: loss=ce, sites=stage1*.
    raise ValueError(f'cannot parse value {text!r}') from None


def split_top_level(text: str, sep: str) -> list[str]:
  """Splits on `sep` outside brackets and quotes: 'a(x=1, y=2), b' -> ['a(x=1, y=2)', ' b']."""
  parts, current, depth, quote = [], [], 0, None
  for ch in text:
    if quote:
      if ch == quote:
        quote = None
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    if ch == sep and depth == 0 and not quote:
      parts.append(''.join(current))
      current = []
    else:
      current.append(ch)
  parts.append(''.join(current))
  return parts


def parse_spec(spec: str, *, field: str = 'spec') -> list[tuple[str, dict[str, Any]]]:
  """Parses 'a(x=1) + b' into [('a', {'x': 1}), ('b', {})].

  Raises:
    ValueError naming `field` when the text is malformed.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f'{field}={spec!r}: expected a spec string such as "name(key=value)"')
  out = []
  for part in split_top_level(spec, '+'):
    m = _SPEC_RE.match(part)
    if not m:
      raise ValueError(f'{field}={spec!r}: cannot parse {part.strip()!r}; expected '
                       '"name" or "name(key=value, ...)"')
    name, args = m.group(1), m.group(2)
    kwargs = {}
    if args and args.strip():
      for item in split_top_level(args, ','):
        if not item.strip():
          continue
        key, eq, value = item.partition('=')
        if not eq or not key.strip().isidentifier():
          raise ValueError(f'{field}={spec!r}: argument {item.strip()!r} must be key=value')
        try:
          kwargs[key.strip()] = _literal(value)
        except ValueError as e:
          raise ValueError(f'{field}={spec!r}: {e}') from None
    out.append((name, kwargs))
  return out


def spec_name(spec: str) -> str:
  """A compact display name for a spec: whitespace removed."""
  return re.sub(r'\s+', '', spec)


def to_dict(config) -> dict:
  """ConfigDict -> plain nested dict of primitives (tuples become lists)."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  return _plain(config)


def _plain(value):
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def base_config() -> ml_collections.ConfigDict:
  """Every field an experiment reads, with defaults; configs/*.py override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(source='digits', name='digits', path='', data_dir='', download=True,
                test_fraction=0.2, split_seed=0, num_train=0, num_test=0,
                # A stratified fraction of the training split held out for choosing
                # hyperparameters; eval_split='validation' evaluates on it instead of test.
                validation_fraction=0.0, eval_split='test',
                fake_shape=(8, 8, 1), fake_num_classes=10, fake_num_train=256, fake_num_test=64)
  c.model = dict(name='small_cnn', normalize='dataset', kwargs=ml_collections.ConfigDict())
  c.train = dict(
      num_epochs=10, batch_size=128, optimizer='sgd', learning_rate=0.1, momentum=0.9,
      nesterov=False, weight_decay=5e-4, schedule='cosine', boundaries=(), decay_factor=0.1,
      warmup_epochs=0.0, label_smoothing=0.0, augment=dict(crop_padding=0, flip=False),
      defense='none',           # a training-time defense spec, e.g. RSE's noise
      recipe='standard',        # the loss: standard | pgd_at | fgsm_mix | trades | anp | bp
      init_from='',             # a trained run's workdir to start from (ANP fine-tunes one)
      checkpoint='',            # a trained run's workdir: skip training and evaluate it
      checkpoint_every_epochs=1, keep_checkpoints=3, log_every_steps=50, eval_every_epochs=1)
  c.eval = dict(
      # What runs after training, in order (advdef.evaluators); each skips itself when off.
      evaluators=('clean', 'attack_suite', 'defense_sweep', 'model_summary'),
      batch_size=256,
      num_examples=0,           # 0 = the whole test split
      defenses=('none',),
      num_draws=100,            # Monte-Carlo draws for stochastic defenses (SAP used 100)
      # Also score stochastic defenses with the mean of the first n of those draws, per n
      # (RSE's ensemble-size study); each n <= num_draws.
      ensemble_sizes=(),
      attacks=(),               # attack specs, see advdef.evaluators.attack_suite
      norm='linf',
      epsilons=(),
      adaptive=True,            # EOT for stochastic defenses, BPDA/transfer for JumpReLU
      eot_samples=10,
      single_draw_baseline=False,  # also attack stochastic defenses with 1 draw per step
      # Transfer (gray-box) rows from the undefended model: for the first gradient attack of
      # each kind ('first_of_kind') or for every gradient attack ('all').
      transfer_attacks='first_of_kind',
      num_attack_examples=0,    # 0 = same as num_examples
      # Minimum-perturbation attacks (C&W, DeepFool): robust accuracy at each of these
      # distortion tolerances (in the row's norm, [0, 1] pixel units), judged on fresh draws.
      tolerances=(),
      checks=True,
      # In-graph sweep of one defense hyperparameter (advdef.evaluators.defense_sweep);
      # defense='' = off.
      # values: the grid; fixed: the other hyperparameters, e.g. 'surrogate=relu'.
      sweep=dict(defense='', param='', values=(), fixed='', attack='pgd(steps=10)',
                 epsilon=0.1),
      # Latent-feature vulnerability (ANP-VS): the mean |z(x) - z(x_adv)| over the model's
      # activations, x_adv from `attack` at `epsilon` (white-box), and from the same attack
      # on the model of `source` (a trained run's workdir; black-box) when given.
      # attack='' = off. num_examples: 0 = num_attack_examples.
      vulnerability=dict(attack='', epsilon=0.0, source='', num_examples=0),
      export_pruned=True)      # masked models: export the physically pruned network
  c.report = dict(tensorboard=True)
  # Data parallelism, see advdef.parallel: batches split over num_devices (0 = all).
  c.parallel = dict(num_devices=0, distributed=False, coordinator_address='',
                    num_processes=0, process_id=-1)
  return c


def experiment_arg(arg, scales: Sequence[str], default: str, config: str
                   ) -> tuple[str, str, str]:
  """A reproduction config's argument '<experiment>,<scale>[,base=<workdir>]' -> (experiment,
  scale, base); the scale defaults to the last of `scales` ('full'), the experiment to
  `default`. config: the config's name, for errors."""
  words = [w.strip() for w in (arg or '').split(',') if w.strip()]
  positional = [w for w in words if '=' not in w]
  kv = parse_arg(','.join(w for w in words if '=' in w), base='')
  scale = next((w for w in positional if w in scales), scales[-1])
  names = [w for w in positional if w not in scales]
  if len(names) > 1:
    raise ValueError(f'{config}: one experiment per config, got {names}')
  return (names[0] if names else default), scale, kv.base


def cifar10_data(c: ml_collections.ConfigDict, source: str) -> None:
  """Points c.data at CIFAR-10: TFDS, or the partial npz beside the repo on dev machines."""
  validate.check_choice('source', source, ('tfds', 'npz'))
  if source == 'npz':
    c.data.update(source='npz', name='cifar10_partial', path='../shared/data/cifar10_partial.npz')
  else:
    c.data.update(source='tfds', name='cifar10')


def cifar10_smoke(c: ml_collections.ConfigDict, *, num_train=64, num_test=32,
                  batch_size=32) -> None:
  """Shrinks a CIFAR-10 config to a few steps on fake CIFAR-shaped data (tests and CI)."""
  c.data.update(source='fake', name='cifar10_shaped', fake_shape=(32, 32, 3),
                fake_num_train=num_train, fake_num_test=num_test)
  c.train.update(num_epochs=1, batch_size=batch_size, log_every_steps=1)
  c.eval.update(batch_size=batch_size, num_draws=2, eot_samples=2, num_attack_examples=8,
                epsilons=(8 / 255,))
  if c.eval.attacks:
    c.eval.attacks = ('pgd(steps=2)',)

"""Value checks, in one place: every config field and hyperparameter is checked here.

Errors are for people: each names the field (`train.batch_size`, `pgd.eps`, `sap.frac`) and
what it accepts. Two kinds of value are checked:

- config values (`check_choice`, `check_positive`, `check_probability`, `check_int`,
  `check_bool`): plain Python scalars read from an ml_collections config;
- hyperparameters of defenses and attacks (`check_hyperparameter`): Python, numpy or JAX
  values, possibly traced. Traced values (a grid under `vmap`, an `eps` under `jit`) are not
  checked: they have no value yet, and whoever builds the grid checks it concretely.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any

import numpy as np


def is_traced(value: Any) -> bool:
  """True for a value inside `jit`/`vmap`/`grad` tracing, which has no concrete value."""
  # A tracer exists only once JAX is imported; not importing it here keeps config files
  # (which import config_utils, which imports this) quick to load for flag errors.
  jax = sys.modules.get('jax')
  return jax is not None and isinstance(value, jax.core.Tracer)


def _is_int(value: Any) -> bool:
  # bool is an int subclass, but `num_train=True` is a mistake, not 1.
  return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_choice(field: str, value: Any, choices) -> None:
  """Raises unless `value` is one of `choices`, listing them."""
  if value not in choices:
    raise ValueError(f'{field}={value!r} is not valid; valid choices: '
                     f'{", ".join(map(str, choices))}')


def check_positive(field: str, value: Any, *, allow_zero: bool = False,
                   integer: bool = False) -> None:
  """Raises unless `value` is a finite Python number > 0 (>= 0 with allow_zero)."""
  ok_type = _is_int(value) if integer else (isinstance(value, numbers.Real)
                                            and not isinstance(value, (bool, np.bool_)))
  if not ok_type:
    kind = 'an integer' if integer else 'a number'
    raise ValueError(f'{field}={value!r} must be {kind}')
  if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
    bound = '>= 0' if allow_zero else '> 0'
    raise ValueError(f'{field}={value!r} must be finite and {bound}')


def check_int(field: str, value: Any, minimum: int = 0) -> int:
  """Raises unless `value` is a Python/numpy integer (not bool) >= minimum; returns int."""
  if not _is_int(value) or value < minimum:
    raise ValueError(f'{field}={value!r} must be an integer >= {minimum}')
  return int(value)


def check_probability(field: str, value: Any) -> None:
  """Raises unless `value` is a number in [0, 1]."""
  if (not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_))
      or not 0.0 <= value <= 1.0):
    raise ValueError(f'{field}={value!r} must be in [0, 1]')


def check_bool(field: str, value: Any) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f'{field}={value!r} must be True or False')


def check_hyperparameter(field: str, value: Any, *, minimum: float = 0.0, strict: bool = True,
                         maximum: float | None = None, scalar: bool = False) -> None:
  """Checks a defense or attack hyperparameter that may be traced.

  A concrete value (Python, numpy or JAX; every entry of an array unless `scalar`) must be a
  finite real number > minimum (>= minimum when not `strict`) and <= maximum. Traced values
  pass unchecked (see the module docstring).
  """
  if value is None:
    raise ValueError(f'{field} is required, got None')
  if is_traced(value):
    return
  try:
    arr = np.asarray(value)
  except (TypeError, ValueError):
    arr = None
  ok = (arr is not None and arr.dtype != np.bool_ and (np.issubdtype(arr.dtype, np.floating)
                                                       or np.issubdtype(arr.dtype, np.integer))
        and (arr.ndim == 0 or not scalar))
  if ok:
    v = arr.astype(np.float64)
    ok = bool(np.all(np.isfinite(v)) and np.all(v > minimum if strict else v >= minimum)
              and (maximum is None or np.all(v <= maximum)))
  if not ok:
    bound = f'{">" if strict else ">="} {minimum:g}'
    if maximum is not None:
      bound += f' and <= {maximum:g}'
    kind = 'a finite real scalar' if scalar else 'finite and real'
    raise ValueError(f'{field}={value!r} must be {kind} {bound}')

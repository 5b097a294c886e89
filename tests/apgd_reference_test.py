"""APGD's step-size rules against the reference implementation's (AutoAttack, autopgd_base.py).

The expected values are derived by hand from the reference's rules (see `gradient.apgd`):
the checkpoint schedule from its integer formula, the halving decisions from scripted loss
trajectories fed to `_apgd_run` through a fake `grad_fn`.
"""

import functools

import jax
from jax.experimental import io_callback
import jax.numpy as jnp
import numpy as np
import pytest

from advdef import attacks
from advdef.attacks import gradient

# ----------------------------------------------------------------------------------------
# The checkpoint schedule.
# ----------------------------------------------------------------------------------------

# Iterations (1-based: the checkpoint after the n-th step) and interval lengths, from the
# reference's n_iter_2 = max(int(0.22 n), 1), size_decr = max(int(0.03 n), 1),
# n_iter_min = max(int(0.06 n), 1) and k <- max(k - size_decr, n_iter_min).
_SCHEDULES = [
    # n = 1: k = 1 and stays 1.
    (1, [1], [1]),
    # n = 10: k = 2, then 1 (size_decr 1, n_iter_min 1).
    (10, [2, 3, 4, 5, 6, 7, 8, 9, 10], [2, 1, 1, 1, 1, 1, 1, 1, 1]),
    # n = 20: k = 4, 3, 2, then 1 (size_decr 1, n_iter_min 1).
    (20, [4, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
     [4, 3, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
    # n = 50: k = 11, then -1 each (size_decr int(1.5) = 1; n_iter_min 3 not reached);
    # the 6-step interval that would end at 51 does not fit.
    (50, [11, 21, 30, 38, 45], [11, 10, 9, 8, 7]),
    # n = 100: k = 22, then -3 each down to n_iter_min = 6; 105 does not fit.
    (100, [22, 41, 57, 70, 80, 87, 93, 99], [22, 19, 16, 13, 10, 7, 6, 6]),
]


@pytest.mark.parametrize('steps, ends, lengths', _SCHEDULES)
def test_checkpoint_schedule_matches_the_reference(steps, ends, lengths):
  is_checkpoint, interval = gradient._apgd_checkpoints(steps)
  np.testing.assert_array_equal(np.flatnonzero(is_checkpoint) + 1, ends)
  np.testing.assert_array_equal(interval[is_checkpoint], lengths)
  assert not interval[~is_checkpoint].any()


# ----------------------------------------------------------------------------------------
# The halving rule in isolation.
# ----------------------------------------------------------------------------------------


def test_halving_conditions():
  f = lambda *a: np.asarray(gradient._apgd_halving(*map(jnp.asarray, a)))
  inc = np.array([2.0, 3.0, 4.0, 4.0, 4.0, 4.0], np.float32)
  reduced = np.array([True, True, True, False, False, True])
  best = np.array([1.0, 1.0, 1.0, 1.0, 2.0, 1.0], np.float32)
  best_before = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 5.0], np.float32)
  np.testing.assert_array_equal(
      f(inc, 4.0, 0.75, reduced, best, best_before),
      [
          True,  # condition 1: 2 <= 3.
          True,  # condition 1 at equality: 3 <= 4 * 0.75 (the old `<` said no).
          False,  # 4 > 3, halved last time: condition 2 is off.
          True,  # condition 2: not halved last time, best 1 did not beat 1 (a tie).
          False,  # not halved last time, but the best improved (1 -> 2).
          False,  # halved last time: condition 2 is off even without improvement.
      ])
  # rho = 0.5 over 2 steps: one increase is at the threshold.
  np.testing.assert_array_equal(
      f(np.array([1.0, 2.0], np.float32), 2.0, 0.5, np.array([True, True]),
        np.zeros(2, np.float32), np.zeros(2, np.float32)), [True, False])


# ----------------------------------------------------------------------------------------
# End to end: scripted losses through `_apgd_run`.
# ----------------------------------------------------------------------------------------

_UNIT = 2.0**-10  # Positions below are offsets from x = 0.5 in these units.
_ETA0 = 16  # Initial step, in units (1/64).


def _scripted_run(scripts, momentum, steps=20):
  """Runs `_apgd_run` (jitted) on one-pixel examples whose loss at the j-th queried point
  is scripts[b, j] whatever the point, with gradient +1 everywhere (every step moves up by
  eta in L-inf). Returns the queried points, float offsets [steps + 1, B] in `_UNIT`s."""
  scripts = np.asarray(scripts, np.float32)
  batch = scripts.shape[0]
  x = jnp.full((batch, 1, 1, 1), 0.5, jnp.float32)
  y = jnp.zeros(batch, jnp.int32)
  queried = []

  def scripted_loss(x_query):
    queried.append(np.asarray(x_query).reshape(batch))
    return scripts[:, len(queried) - 1]

  def grad_fn(x_query, y_, key):
    del y_, key
    loss = io_callback(scripted_loss, jax.ShapeDtypeStruct((batch,), jnp.float32), x_query,
                       ordered=True)
    return loss, jnp.zeros((batch, 2), jnp.float32), jnp.ones_like(x_query)

  run = jax.jit(functools.partial(gradient._apgd_run, grad_fn, steps=steps, norm='linf',
                                  random_start=False))
  jax.block_until_ready(
      run(jax.random.key(0), x, y, jnp.float32(0.5), jnp.float32(_ETA0 * _UNIT),
          jnp.float32(0.75), jnp.float32(momentum)))
  assert len(queried) == steps + 1
  return (np.stack(queried) - 0.5) / _UNIT


def _ramp(start, first, last):
  return list(range(start, start + last - first + 1))


def test_scripted_halving_decisions():
  # steps = 20: checkpoints after steps 4, 7, 9, 10, ..., 20 (intervals 4, 3, 2, 1, ...);
  # condition 1 needs at most 3, 2, 1, 0 increases respectively (rho = 0.75).
  # Momentum 1 makes each step exactly x_cur + eta, so the queried points show eta and
  # the restarts. Each row of `scripts` is one scenario (losses at x^(0) .. x^(20)).
  scripts = [
      # 0. Count == k * rho at the first checkpoint: increases at steps 1-3 (the first
      #    against 0), none at step 4 (3 -> 3): 3 <= 3 halves (the old `<` did not). The
      #    best point is x^(3) (the tie at x^(4) does not replace it). Later the loss rises
      #    and improves every step: no more halving.
      [0, 1, 2, 3, 3] + _ramp(4, 5, 20),
      # 1. The "halved last time" flag starts set: 4 increases (no condition 1) and no
      #    improvement on the start point's 100 -- condition 2 would fire at the first
      #    checkpoint with the flag clear (the old code halved there); it does not. At the
      #    second checkpoint (3 increases, still no improvement) it does fire, and the
      #    restart goes back to x^(0).
      [100, 1, 2, 3, 4, 5, 6, 7] + _ramp(200, 8, 20),
      # 2. The first step is compared with 0, not with the start point's loss: -4 > -10
      #    but not > 0, so 3 increases in the first interval and the step halves (restart
      #    from x^(4), the current point). Compared with -10 it would be 4: no halving.
      [-10] + _ramp(-4, 1, 20),
      # 3. No loss reset after halving: rising and improving up to x^(9); x^(10) drops
      #    (0 increases over the 1-step interval: halve, restart from x^(9)); x^(11) = 7
      #    is above the discarded x^(10) = 5, so it counts as an increase (no halving),
      #    although it is below the best 9 (the old reset to the best loss halved again).
      list(range(10)) + [5, 7] + _ramp(20, 12, 20),
  ]
  got = _scripted_run(scripts, momentum=1.0)
  e = _ETA0
  expected = [
      # 0: 16 per step up to x^(4); restart from x^(3) = 48 with eta 8.
      [e * j for j in range(5)] + [48 + 8 * (j - 4) for j in range(5, 21)],
      # 1: 16 per step up to x^(7); restart from x^(0) = 0 with eta 8.
      [e * j for j in range(8)] + [8 * (j - 7) for j in range(8, 21)],
      # 2: 16 per step up to x^(4) = 64, then eta 8 from there.
      [e * j for j in range(5)] + [64 + 8 * (j - 4) for j in range(5, 21)],
      # 3: 16 per step up to x^(10); restart from x^(9) = 144 with eta 8, kept.
      [e * j for j in range(11)] + [144 + 8 * (j - 10) for j in range(11, 21)],
  ]
  np.testing.assert_array_equal(got.T, expected)


def test_scripted_restart_keeps_the_momentum_of_the_reference():
  # Scenario 2 with momentum 0.75: halving after step 4 restarts from x_best = x^(4) = 64
  # while x_prev stays x^(3) = 48 (the reference keeps its x_adv_old), so the next step
  # is 64 + 0.75 * 8 + 0.25 * (64 - 48) = 74, not 70 (momentum reset to zero).
  got = _scripted_run([[-10] + _ramp(-4, 1, 20)], momentum=0.75)
  np.testing.assert_array_equal(got[:7, 0], [0, 16, 32, 48, 64, 74, 82.5])


def test_apgd_still_succeeds_on_a_linear_model():
  # A smoke check of the public entry point with the new rules: a 2-class linear model
  # whose decision boundary is within eps of every example.
  rng = np.random.RandomState(0)
  w = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
  logits_fn = lambda x, key: x.reshape(x.shape[0], -1) @ w
  x = jnp.asarray(rng.uniform(0.4, 0.6, size=(8, 4, 4, 1)), jnp.float32)
  y = jnp.argmax(logits_fn(x, None), -1).astype(jnp.int32)
  x_adv = jax.jit(functools.partial(attacks.apgd, logits_fn, steps=20))(
      jax.random.key(0), x, y, eps=0.4)
  assert np.all(np.abs(np.asarray(x_adv - x)) <= 0.4)
  assert np.all(np.asarray(jnp.argmax(logits_fn(x_adv, None), -1)) != np.asarray(y))

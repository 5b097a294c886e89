"""Episodes of a (defended, attacked) agent with fixed seeds, and their statistics.

`make_episode_runner` compiles one program that plays `num_episodes` episodes at every
budget of a grid at once: the state is [L budgets, N episodes], every step perturbs each
observation (advdef.rl.observation_attacks), lets the agent decide on the perturbed one,
and steps the games until every episode has ended (`lax.while_loop`) or the time limit.

Keys. Episode e's game randomness (its reset and every step's) comes from
`fold_in(episode_key, e)` alone, so the same N episode seeds are played by every defense,
attack and budget (paired comparisons), whatever N is. At step t the attack uses
`fold_in(attack_key, t)` and the decision rule `fold_in(decision_key, t)`: three
independent streams, so no draw that scores the agent was seen by the attacker.

Per episode the runner reports its return, its length, and how many of its decisions the
perturbation changed (the decision on the clean observation, with the same decision keys,
against the one on the perturbed observation).

  run = make_episode_runner(env, decide, perturb, num_episodes=32)
  out = run(variables, jnp.array([0.05, 0.1]), 0, episode_key, attack_key, decision_key)
  out['returns']   # float32[2, 32]: attack 0 at each budget
  summary = summarize(np.asarray(out['returns'][1]))   # mean, 95% t-interval, ...
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from advdef.rl import envs

# decide(variables, x, key) -> (int32[B] actions, q);
# perturb(variables, x, key, eps, attack_index) -> x_adv.
DecideFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
PerturbFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def random_decision_fn(num_actions: int) -> DecideFn:
  """The uniform random policy, as a decision rule (the baseline every agent must beat)."""

  def decide(variables, x, key):
    del variables
    actions = jax.random.randint(key, (x.shape[0],), 0, num_actions).astype(jnp.int32)
    return actions, jnp.zeros((x.shape[0], num_actions), jnp.float32)

  return decide


def _episode_keys(episode_key: jax.Array, num_episodes: int) -> jax.Array:
  return jax.vmap(lambda e: jax.random.fold_in(episode_key, e))(jnp.arange(num_episodes))


def make_episode_runner(env: envs.Env, decide: DecideFn, perturb: PerturbFn | None, *,
                        num_episodes: int):
  """Returns run(variables, epsilons float32[L], attack_index, episode_key, attack_key,
  decision_key) -> {'returns': float32[L, N], 'lengths': int32[L, N], 'changed': int32[L, N]},
  jitted (attack_index and the epsilons are traced: one compiled program serves every
  attack and budget grid of the same length).

  perturb=None plays the clean observations (attack_index is then ignored).
  Episodes last at most env.max_steps steps (the game's time limit truncates them).
  """
  if not isinstance(num_episodes, int) or num_episodes < 1:
    raise ValueError(f'eval.num_episodes={num_episodes!r} must be a positive int')
  n = num_episodes

  def one_budget(variables, eps, attack_index, obs, attack_key, decision_key):
    """The N agents' actions at budget eps, and their actions on the clean observations."""
    if perturb is None:
      actions, _ = decide(variables, obs, decision_key)
      return actions, actions
    x = perturb(variables, obs, attack_key, eps, attack_index)
    # Both decided with the same draws (one network instance): only the perturbation can
    # make them differ.
    both, _ = decide(variables, jnp.stack([x, obs]), decision_key)
    return both[0], both[1]

  @jax.jit
  def run(variables, epsilons, attack_index, episode_key, attack_key, decision_key):
    num_budgets = epsilons.shape[0]
    keys = _episode_keys(episode_key, n)
    obs, state = envs.reset(env, jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys))
    tile = lambda a: jnp.broadcast_to(a, (num_budgets, *a.shape))
    zeros_f = jnp.zeros((num_budgets, n), jnp.float32)
    zeros_i = jnp.zeros((num_budgets, n), jnp.int32)
    carry = (jnp.zeros((), jnp.int32), jax.tree.map(tile, state), tile(obs), zeros_f, zeros_i,
             zeros_i, jnp.zeros((num_budgets, n), jnp.bool_))

    def cond(c):
      t, *_, done = c
      return (t < env.max_steps) & ~jnp.all(done)

    def body(c):
      t, state, obs, returns, lengths, changed, done = c
      actions, clean_actions = jax.vmap(one_budget, in_axes=(None, 0, None, 0, None, None))(
          variables, epsilons, attack_index, obs, jax.random.fold_in(attack_key, t),
          jax.random.fold_in(decision_key, t))
      env_keys = jax.vmap(lambda k: jax.random.fold_in(k, t + 1))(keys)
      out = jax.vmap(lambda s, a: envs.step(env, env_keys, s, a))(state, actions)
      active = ~done
      returns = returns + jnp.where(active, out.reward, 0.0)
      lengths = lengths + active.astype(jnp.int32)
      changed = changed + (active & (actions != clean_actions)).astype(jnp.int32)
      done = done | (active & (out.terminated | out.truncated))
      return t + 1, out.state, out.obs, returns, lengths, changed, done

    _, _, _, returns, lengths, changed, _ = lax.while_loop(cond, body, carry)
    return {'returns': returns, 'lengths': lengths, 'changed': changed}

  return run


def summarize(returns, lengths=None, changed=None) -> dict[str, Any]:
  """Mean episode return with a 95% Student-t interval over the episodes (host-side).

  The episodes are i.i.d. given the agent (independent seeds), so the t-interval over the N
  returns is the interval of the expected return; with N >= 32 it is also close to the
  normal one. Returns dict(mean_return, ci95 [lo, hi] (None when N = 1), std (ddof=1), n,
  mean_length, action_change_rate (changed decisions / decisions, when given)).
  """
  r = np.asarray(returns, np.float64).ravel()
  n = int(r.size)
  if n == 0:
    raise ValueError('summarize: no episodes')
  mean = float(r.mean())
  out: dict[str, Any] = {'mean_return': mean, 'n': n}
  if n > 1:
    from scipy import stats  # Lazy: only this host-side summary needs scipy.
    std = float(r.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    out.update(ci95=[mean - half, mean + half], std=std)
  else:
    out.update(ci95=None, std=None)
  if lengths is not None:
    steps = np.asarray(lengths, np.float64).ravel()
    out['mean_length'] = float(steps.mean())
    if changed is not None:
      total = float(steps.sum())
      out['action_change_rate'] = (float(np.asarray(changed, np.float64).sum()) / total
                                   if total else None)
  return out

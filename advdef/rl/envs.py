"""MinAtar games from gymnax, vectorized, for the DQN agent and its evaluation.

MinAtar (Young & Tian 2019) shrinks five Atari games to 10 x 10 grids with a few binary
channels (one per kind of object). gymnax (1.0.1) reimplements them in JAX, so reset and
step run inside `jit`, `vmap` and `lax.scan`: a whole training chunk or a whole batch of
evaluation episodes is one compiled program.

  env = envs.make('breakout')                         # Env: obs_shape (10, 10, 4), 3 actions
  keys = jax.random.split(key, 32)                     # one key per environment
  obs, state = envs.reset(env, keys)                  # float32[32, 10, 10, 4] in {0, 1}
  step = envs.step(env, step_keys, state, actions)    # Step(obs, state, reward, ...)

Auto-reset: gymnax's `step` resets an environment whose episode ended (terminated, or
truncated at `max_steps_in_episode`) in the same call, so `step.obs` is already the next
episode's first observation there; `step.next_obs` is the observation the transition really
led to (gymnax's `final_observation`), which the replay buffer stores for bootstrapping.

Sticky actions (MinAtar's default, probability 0.1; Machado et al. 2018): each step repeats
the previous executed action with that probability, so a greedy agent's episodes differ
from seed to seed.

Observations are float32 in {0, 1} (the attacks perturb them in [0, 1]; see
advdef.rl.observation_attacks). Any gymnax environment with binary observations of shape
[H, W, C] and discrete actions works through `from_gymnax` (the tests use a two-state chain).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from advdef import validate

# Config name -> gymnax id. The names are the config's `game=` values.
GAMES = {
    'asterix': 'Asterix-MinAtar',
    'breakout': 'Breakout-MinAtar',
    'freeway': 'Freeway-MinAtar',
    'seaquest': 'Seaquest-MinAtar',
    'space_invaders': 'SpaceInvaders-MinAtar',
}


@dataclasses.dataclass(frozen=True)
class Env:
  """A gymnax environment with its parameters; hashable, so jitted code may close over it."""
  name: str
  env: Any      # a gymnax Environment
  params: Any   # its EnvParams (max_steps_in_episode, game settings)
  sticky_action_prob: float = 0.0   # MinAtar's default is 0.1 (see the module docstring)

  @property
  def obs_shape(self) -> tuple[int, ...]:
    return tuple(self.env.obs_shape)

  @property
  def num_actions(self) -> int:
    return int(self.env.num_actions)

  @property
  def max_steps(self) -> int:
    return int(self.params.max_steps_in_episode)


@flax.struct.dataclass
class EnvState:
  """The environments' states: gymnax's, and the last executed action (sticky actions)."""
  inner: Any
  last_action: jax.Array   # int32[N]; 0 (no-op) at the start of an episode


@flax.struct.dataclass  # a pytree: returned from vmapped and looped functions
class Step:
  """One vectorized transition; every field has a leading [num_envs] axis."""
  obs: jax.Array          # float32[N, H, W, C]: the observation to act on next (auto-reset)
  state: EnvState         # the environments' states after the step (auto-reset)
  reward: jax.Array       # float32[N]
  terminated: jax.Array   # bool[N]: the episode ended in the game (no bootstrapping)
  truncated: jax.Array    # bool[N]: the episode hit max_steps_in_episode (bootstrap)
  next_obs: jax.Array     # float32[N, H, W, C]: where the transition led, before any reset


def make(game: str, *, sticky_action_prob: float = 0.1,
         max_episode_steps: int | None = None) -> Env:
  """The MinAtar game `game` (a GAMES name) with gymnax's default parameters.

  sticky_action_prob: the probability that a step repeats the previous action instead of
    the agent's (MinAtar's default, 0.1; gymnax leaves it out). Without it most MinAtar
    games are deterministic given the actions (SpaceInvaders entirely, Breakout up to the
    ball's two start positions), so a greedy agent would play the same episode on every
    seed and an interval over episodes would measure nothing.
  max_episode_steps: the time limit (truncation), default gymnax's (1000; Freeway 2500).

  Raises:
    ValueError: an unknown game (naming the valid ones), a bad probability or time limit.
  """
  validate.check_choice('rl.game', game, sorted(GAMES))
  validate.check_probability('rl.sticky_action_prob', sticky_action_prob)
  import gymnax  # Here, not at the top: it takes seconds, and config errors come first.
  env, params = gymnax.make(GAMES[game])
  if max_episode_steps is not None:
    validate.check_positive('eval.max_episode_steps', max_episode_steps, integer=True)
    params = params.replace(max_steps_in_episode=int(max_episode_steps))
  return Env(game, env, params, float(sticky_action_prob))


def from_gymnax(name: str, env: Any, params: Any, *, sticky_action_prob: float = 0.0) -> Env:
  """Wraps any gymnax environment (binary [H, W, C] observations, discrete actions)."""
  if len(tuple(env.obs_shape)) != 3:
    raise ValueError(f'{name}: observations must be [H, W, C], got shape {env.obs_shape}')
  validate.check_probability('sticky_action_prob', sticky_action_prob)
  return Env(name, env, params, float(sticky_action_prob))


def with_time_limit(env: Env, max_steps: int) -> Env:
  """The same game truncated after `max_steps` steps."""
  validate.check_positive('max_steps', max_steps, integer=True)
  return dataclasses.replace(env, params=env.params.replace(max_steps_in_episode=int(max_steps)))


def reset(env: Env, keys: jax.Array) -> tuple[jax.Array, EnvState]:
  """Resets one environment per key (keys: [N]): (float32[N, H, W, C], state)."""
  obs, inner = jax.vmap(lambda k: env.env.reset(k, env.params))(keys)
  return obs.astype(jnp.float32), EnvState(inner, jnp.zeros(keys.shape[:1], jnp.int32))


def step(env: Env, keys: jax.Array, state: EnvState, action: jax.Array) -> Step:
  """Steps every environment once with its own key (keys: [N]; action: int32[N]),
  auto-resetting the ones whose episode ends. With probability env.sticky_action_prob an
  environment repeats its last executed action instead (MinAtar's sticky actions)."""

  def one(key, inner, last, chosen):
    sticky_key, step_key = jax.random.split(key)
    executed = jnp.where(jax.random.uniform(sticky_key) < env.sticky_action_prob, last, chosen)
    obs, inner, reward, terminated, truncated, info = env.env.step(step_key, inner, executed,
                                                                   env.params)
    last = jnp.where(terminated | truncated, 0, executed).astype(jnp.int32)
    return obs, inner, last, reward, terminated, truncated, info['final_observation']

  obs, inner, last, reward, terminated, truncated, final = jax.vmap(one)(
      keys, state.inner, state.last_action, action.astype(jnp.int32))
  return Step(obs=obs.astype(jnp.float32), state=EnvState(inner, last),
              reward=reward.astype(jnp.float32), terminated=terminated.astype(jnp.bool_),
              truncated=truncated.astype(jnp.bool_), next_obs=final.astype(jnp.float32))

"""Double DQN with a target network and a uniform replay buffer, the whole loop under jit.

The agent (van Hasselt et al. 2016 on Mnih et al. 2015, with MinAtar's network): `num_envs`
environments step together; every iteration takes one epsilon-greedy action in each, stores
the `num_envs` transitions in the replay buffer, then (once `learning_starts` environment
steps are stored) makes `updates_per_iteration` Adam updates of the Huber TD loss on uniform
minibatches, with the double-DQN target

  y = r + gamma * (1 - terminated) * Q_target(s', argmax_a Q_online(s', a)),

and copies the online parameters into the target network every `target_update_every`
updates. Episodes cut by the time limit (truncated, not terminated) are bootstrapped from
the observation they really reached (advdef.rl.envs: `next_obs`).

`make_train_chunk` compiles `chunk_iterations` iterations as one `lax.scan` under `jax.jit`
(compiled once; the state is donated). All randomness is a function of (train key,
iteration): iteration i uses `fold_in(train_key, i)`, split into the named STREAMS, so a run
resumed from a checkpoint taken between chunks replays the uninterrupted run bit for bit.

  cfg = dqn.DQNConfig.from_config(config.rl)
  tx = dqn.make_optimizer(cfg)
  state = dqn.create_train_state(init_key, network, env, cfg, tx)
  chunk = dqn.make_train_chunk(network, env, cfg, tx)
  for _ in range(cfg.num_chunks):
    state, metrics = chunk(state, train_key)    # metrics: scalars of the chunk

Replay buffer: arrays in the state, so it is checkpointed with it (resume is exact).
Observations are binary (MinAtar), so they are stored bit-packed (uint8, 8 cells a byte):
a 100,000-transition buffer of 10x10x6 observations and their successors takes 15 MB.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from advdef import validate
from advdef.rl import envs
from advdef.rl import networks

# Named PRNG streams inside one iteration (frozen numbers: they make runs reproducible).
STREAMS = {'act': 0, 'env': 1, 'replay': 2}
LOSSES = ('huber', 'mse')


@dataclasses.dataclass(frozen=True)
class DQNConfig:
  """The agent's hyperparameters (config.rl minus the game and the network). Units:
  environment steps count transitions summed over the `num_envs` environments."""
  num_envs: int = 32
  total_env_steps: int = 1_000_000
  chunk_iterations: int = 250        # iterations (one step of every env each) per jit call
  buffer_size: int = 100_000         # transitions; a multiple of num_envs
  batch_size: int = 64
  learning_rate: float = 3e-4
  adam_eps: float = 1e-5
  max_grad_norm: float = 10.0
  gamma: float = 0.99
  epsilon_start: float = 1.0
  epsilon_end: float = 0.05
  epsilon_decay_env_steps: int = 200_000
  learning_starts: int = 10_000      # environment steps stored before the first update
  updates_per_iteration: int = 1
  target_update_every: int = 500     # updates
  double: bool = True
  loss: str = 'huber'

  @classmethod
  def from_config(cls, rl) -> DQNConfig:
    """Reads and checks the agent fields of config.rl; errors name `rl.<field>`."""
    names = [f.name for f in dataclasses.fields(cls)]
    cfg = cls(**{n: rl[n] for n in names})
    cfg.validate()
    return cfg

  def validate(self) -> None:
    for name in ('num_envs', 'total_env_steps', 'chunk_iterations', 'buffer_size',
                 'batch_size', 'updates_per_iteration', 'target_update_every'):
      validate.check_positive(f'rl.{name}', getattr(self, name), integer=True)
    for name in ('epsilon_decay_env_steps', 'learning_starts'):
      validate.check_positive(f'rl.{name}', getattr(self, name), integer=True, allow_zero=True)
    for name in ('learning_rate', 'adam_eps', 'max_grad_norm'):
      validate.check_positive(f'rl.{name}', getattr(self, name))
    for name in ('gamma', 'epsilon_start', 'epsilon_end'):
      validate.check_probability(f'rl.{name}', getattr(self, name))
    validate.check_bool('rl.double', self.double)
    validate.check_choice('rl.loss', self.loss, LOSSES)
    per_chunk = self.num_envs * self.chunk_iterations
    if self.total_env_steps % per_chunk:
      lower = max(per_chunk, self.total_env_steps // per_chunk * per_chunk)
      raise ValueError(
          f'rl.total_env_steps={self.total_env_steps} must be a multiple of rl.num_envs * '
          f'rl.chunk_iterations = {per_chunk} (e.g. {lower} or {lower + per_chunk})')
    if self.buffer_size % self.num_envs:
      raise ValueError(f'rl.buffer_size={self.buffer_size} must be a multiple of '
                       f'rl.num_envs={self.num_envs}')
    if self.batch_size > self.buffer_size:
      raise ValueError(f'rl.batch_size={self.batch_size} exceeds rl.buffer_size='
                       f'{self.buffer_size}')
    if self.learning_starts < self.batch_size:
      raise ValueError(f'rl.learning_starts={self.learning_starts} must be >= rl.batch_size='
                       f'{self.batch_size}: the first minibatch would repeat transitions')

  @property
  def num_chunks(self) -> int:
    return self.total_env_steps // (self.num_envs * self.chunk_iterations)

  @property
  def total_iterations(self) -> int:
    return self.num_chunks * self.chunk_iterations


@flax.struct.dataclass
class Replay:
  """A circular buffer of transitions; rows are written `num_envs` at a time."""
  obs: jax.Array         # uint8[capacity, packed]: bit-packed observations
  next_obs: jax.Array    # uint8[capacity, packed]
  action: jax.Array      # int32[capacity]
  reward: jax.Array      # float32[capacity]
  terminated: jax.Array  # float32[capacity]: 1.0 where the game ended (no bootstrap)
  position: jax.Array    # int32[]: the next row to write
  size: jax.Array        # int32[]: rows filled


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue; all arrays, so a checkpoint holds it whole."""
  step: jax.Array             # int32[]: iterations done
  updates: jax.Array          # int32[]: gradient updates done
  params: Any
  target_params: Any
  opt_state: Any
  replay: Replay
  env_state: Any              # the gymnax states of the num_envs environments
  obs: jax.Array              # float32[num_envs, H, W, C]: the observations to act on
  episode_return: jax.Array   # float32[num_envs]: return so far of the running episodes


def pack(obs: jax.Array) -> jax.Array:
  """float32[N, H, W, C] in {0, 1} -> uint8[N, ceil(H*W*C / 8)]."""
  return jnp.packbits(obs.reshape((obs.shape[0], -1)) > 0.5, axis=-1)


def unpack(packed: jax.Array, obs_shape) -> jax.Array:
  """The inverse of `pack`: uint8[N, P] -> float32[N, *obs_shape]."""
  size = math.prod(obs_shape)
  bits = jnp.unpackbits(packed, axis=-1, count=size)
  return bits.reshape((packed.shape[0], *obs_shape)).astype(jnp.float32)


def epsilon(cfg: DQNConfig, env_steps: jax.Array) -> jax.Array:
  """Exploration rate after `env_steps` environment steps: linear from start to end."""
  frac = jnp.clip(env_steps / max(cfg.epsilon_decay_env_steps, 1), 0.0, 1.0)
  if cfg.epsilon_decay_env_steps == 0:
    frac = jnp.ones_like(frac)
  return cfg.epsilon_start + frac * (cfg.epsilon_end - cfg.epsilon_start)


def make_optimizer(cfg: DQNConfig) -> optax.GradientTransformation:
  """Adam on the global-norm-clipped gradient."""
  return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                     optax.adam(cfg.learning_rate, eps=cfg.adam_eps))


def create_replay(cfg: DQNConfig, obs_shape) -> Replay:
  packed = (math.prod(obs_shape) + 7) // 8
  n = cfg.buffer_size
  return Replay(obs=jnp.zeros((n, packed), jnp.uint8), next_obs=jnp.zeros((n, packed), jnp.uint8),
                action=jnp.zeros((n,), jnp.int32), reward=jnp.zeros((n,), jnp.float32),
                terminated=jnp.zeros((n,), jnp.float32), position=jnp.zeros((), jnp.int32),
                size=jnp.zeros((), jnp.int32))


def add(replay: Replay, obs, next_obs, action, reward, terminated) -> Replay:
  """Writes one row block (the num_envs transitions of an iteration) at `position`."""
  n = action.shape[0]
  capacity = replay.action.shape[0]
  at = replay.position
  write = lambda buf, v: lax.dynamic_update_slice_in_dim(buf, v.astype(buf.dtype), at, axis=0)
  return Replay(obs=write(replay.obs, pack(obs)), next_obs=write(replay.next_obs, pack(next_obs)),
                action=write(replay.action, action), reward=write(replay.reward, reward),
                terminated=write(replay.terminated, terminated),
                position=(at + n) % capacity, size=jnp.minimum(replay.size + n, capacity))


def sample(replay: Replay, key: jax.Array, batch_size: int, obs_shape) -> dict[str, jax.Array]:
  """A uniform minibatch (with replacement) of the filled rows, observations unpacked."""
  idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(replay.size, 1))
  return {'obs': unpack(replay.obs[idx], obs_shape),
          'next_obs': unpack(replay.next_obs[idx], obs_shape),
          'action': replay.action[idx], 'reward': replay.reward[idx],
          'terminated': replay.terminated[idx]}


def create_train_state(key: jax.Array, network: nn.Module, env: envs.Env, cfg: DQNConfig,
                       tx: optax.GradientTransformation) -> TrainState:
  """A fresh agent: parameters from `key`'s 'params' half, environments reset from the other."""
  params_key, reset_key = jax.random.split(key)
  params = networks.init_variables(network, params_key, env.obs_shape)['params']
  obs, env_state = envs.reset(env, jax.random.split(reset_key, cfg.num_envs))
  return TrainState(step=jnp.zeros((), jnp.int32), updates=jnp.zeros((), jnp.int32),
                    # A copy: the chunk donates the state, and one buffer cannot be donated twice.
                    params=params, target_params=jax.tree.map(jnp.copy, params),
                    opt_state=tx.init(params),
                    replay=create_replay(cfg, env.obs_shape), env_state=env_state, obs=obs,
                    episode_return=jnp.zeros((cfg.num_envs,), jnp.float32))


def td_loss(network: nn.Module, cfg: DQNConfig, params, target_params,
            batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(mean TD loss, mean Q(s, a)) of a minibatch under the (double) DQN target."""
  b = batch['action'].shape[0]
  if cfg.double:  # One online pass over s and s': s' only picks the bootstrap action.
    q_all = network.apply({'params': params},
                          jnp.concatenate([batch['obs'], batch['next_obs']]), train=False)
    q, q_next_online = q_all[:b], lax.stop_gradient(q_all[b:])
  else:
    q = network.apply({'params': params}, batch['obs'], train=False)
  q_next_target = network.apply({'params': target_params}, batch['next_obs'], train=False)
  next_action = jnp.argmax(q_next_online if cfg.double else q_next_target, axis=-1)
  bootstrap = jnp.take_along_axis(q_next_target, next_action[:, None], axis=-1)[:, 0]
  target = lax.stop_gradient(batch['reward']
                             + cfg.gamma * (1.0 - batch['terminated']) * bootstrap)
  q_taken = jnp.take_along_axis(q, batch['action'][:, None], axis=-1)[:, 0]
  if cfg.loss == 'huber':
    loss = optax.huber_loss(q_taken, target, delta=1.0)
  else:
    loss = 0.5 * jnp.square(q_taken - target)
  return jnp.mean(loss), jnp.mean(q_taken)


def greedy_actions(network: nn.Module, params, obs: jax.Array) -> jax.Array:
  """int32[N]: argmax_a Q(obs, a) of the undefended network."""
  return jnp.argmax(network.apply({'params': params}, obs, train=False), axis=-1).astype(
      jnp.int32)


def _learn(network, env, cfg, tx, state: TrainState, replay: Replay, key):
  """`updates_per_iteration` updates: (params, target, opt_state, updates, loss sum, q sum)."""
  params, target, opt_state, updates = (state.params, state.target_params, state.opt_state,
                                        state.updates)
  loss_sum = q_sum = jnp.zeros((), jnp.float32)
  grad_fn = jax.value_and_grad(lambda p, t, b: td_loss(network, cfg, p, t, b), has_aux=True)
  for u in range(cfg.updates_per_iteration):  # static and small
    batch = sample(replay, jax.random.fold_in(key, u), cfg.batch_size, env.obs_shape)
    (loss, q_mean), grads = grad_fn(params, target, batch)
    step_updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, step_updates)
    updates = updates + 1
    target = optax.periodic_update(params, target, updates, cfg.target_update_every)
    loss_sum, q_sum = loss_sum + loss, q_sum + q_mean
  return params, target, opt_state, updates, loss_sum, q_sum


def train_iteration(network: nn.Module, env: envs.Env, cfg: DQNConfig,
                    tx: optax.GradientTransformation, state: TrainState, key: jax.Array
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One environment step of every env, then the updates; (state, per-iteration sums)."""
  act_key, env_key, replay_key = (jax.random.fold_in(key, STREAMS[s])
                                  for s in ('act', 'env', 'replay'))
  n = cfg.num_envs
  eps = epsilon(cfg, state.step * n)
  explore_key, random_key = jax.random.split(act_key)
  explore = jax.random.uniform(explore_key, (n,)) < eps
  random_action = jax.random.randint(random_key, (n,), 0, env.num_actions)
  action = jnp.where(explore, random_action, greedy_actions(network, state.params, state.obs))
  out = envs.step(env, jax.random.split(env_key, n), state.env_state, action)
  replay = add(state.replay, state.obs, out.next_obs, action, out.reward, out.terminated)
  returns = state.episode_return + out.reward
  done = out.terminated | out.truncated

  can_learn = (state.step + 1) * n >= cfg.learning_starts
  zero = jnp.zeros((), jnp.float32)
  params, target, opt_state, updates, loss_sum, q_sum = lax.cond(
      can_learn, lambda: _learn(network, env, cfg, tx, state, replay, replay_key),
      lambda: (state.params, state.target_params, state.opt_state, state.updates, zero, zero))
  new_state = TrainState(step=state.step + 1, updates=updates, params=params,
                         target_params=target, opt_state=opt_state, replay=replay,
                         env_state=out.state, obs=out.obs,
                         episode_return=jnp.where(done, 0.0, returns))
  sums = {'loss_sum': loss_sum, 'q_sum': q_sum,
          'num_updates': jnp.where(can_learn, cfg.updates_per_iteration, 0),
          'return_sum': jnp.sum(jnp.where(done, returns, 0.0)),
          'episodes': jnp.sum(done.astype(jnp.int32)), 'epsilon': eps}
  return new_state, sums


def make_train_chunk(network: nn.Module, env: envs.Env, cfg: DQNConfig,
                     tx: optax.GradientTransformation):
  """Returns chunk(state, train_key) -> (state, metrics), jitted once, state donated.

  metrics (float scalars of the chunk): loss and q_mean (NaN before learning starts),
  episode_return (mean over the episodes that ended in the chunk; NaN if none), episodes,
  epsilon (at the chunk's last iteration), updates, env_steps (at the chunk's end).
  """

  @functools.partial(jax.jit, donate_argnums=0)  # the state is updated in place
  def chunk(state: TrainState, train_key: jax.Array):
    def body(s, _):
      return train_iteration(network, env, cfg, tx, s, jax.random.fold_in(train_key, s.step))

    state, sums = lax.scan(body, state, None, length=cfg.chunk_iterations)
    n_up = jnp.sum(sums['num_updates']).astype(jnp.float32)
    n_ep = jnp.sum(sums['episodes']).astype(jnp.float32)
    nan = jnp.float32(jnp.nan)
    metrics = {
        'loss': jnp.where(n_up > 0, jnp.sum(sums['loss_sum']) / jnp.maximum(n_up, 1), nan),
        'q_mean': jnp.where(n_up > 0, jnp.sum(sums['q_sum']) / jnp.maximum(n_up, 1), nan),
        'episode_return': jnp.where(n_ep > 0, jnp.sum(sums['return_sum']) / jnp.maximum(n_ep, 1),
                                    nan),
        'episodes': n_ep, 'epsilon': sums['epsilon'][-1],
        'updates': state.updates.astype(jnp.float32),
        'env_steps': (state.step * cfg.num_envs).astype(jnp.float32)}
    return state, metrics

  return chunk

"""advdef.rl: the DQN agent learns, defenses retrofit onto its Q-network, the observation
attack changes its actions where random noise of the same size does not, training resumes
bit for bit, and the smoke config runs end to end through advdef.main."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import conftest
from flax import struct
from gymnax.environments import environment

from advdef import checkpointing
from advdef import models
from advdef import retrofit
from advdef.rl import dqn
from advdef.rl import envs
from advdef.rl import evaluate
from advdef.rl import experiment
from advdef.rl import networks
from advdef.rl import observation_attacks

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'configs' / 'minatar_dqn.py'


def _load_config_module():
  spec = importlib.util.spec_from_file_location('minatar_dqn', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ----------------------------------------------------------------------------------------
# A two-state chain: learning it needs bootstrapping (gamma = 0.9).
#   A --a0 (r=0)--> B;  A --a1 (r=0.5)--> end;  B --a1 (r=1)--> end;  B --a0 (r=0)--> end.
#   Q*(A) = (0.9, 0.5): greedy a0, which a learner without bootstrapping gets wrong;
#   Q*(B) = (0, 1): greedy a1.


@struct.dataclass
class ChainState(environment.EnvState):
  pos: jax.Array
  time: jax.Array


@struct.dataclass
class ChainParams(environment.EnvParams):
  max_steps_in_episode: int = 10


class TwoStepChain(environment.Environment):
  obs_shape = (10, 10, 2)

  @property
  def default_params(self):
    return ChainParams()

  @property
  def num_actions(self):
    return 2

  def get_obs(self, state, params=None, key=None):
    return jnp.broadcast_to(jax.nn.one_hot(state.pos, 2), self.obs_shape).astype(jnp.float32)

  def reset_env(self, key, params):
    state = ChainState(pos=jnp.zeros((), jnp.int32), time=jnp.zeros((), jnp.int32))
    return self.get_obs(state), state

  def step_env(self, key, state, action, params):
    in_a = state.pos == 0
    reward = jnp.where(in_a, jnp.where(action == 1, 0.5, 0.0),
                       jnp.where(action == 1, 1.0, 0.0)).astype(jnp.float32)
    terminated = ~in_a | (action == 1)
    new = ChainState(pos=jnp.ones((), jnp.int32), time=state.time + 1)
    return self.get_obs(new), new, reward, terminated, {}

  def is_terminated(self, state, params):
    return state.pos == 1


CHAIN_CFG = dqn.DQNConfig(num_envs=8, total_env_steps=8 * 50 * 6, chunk_iterations=50,
                          buffer_size=800, batch_size=32, learning_rate=3e-3, gamma=0.9,
                          epsilon_start=1.0, epsilon_end=0.3, epsilon_decay_env_steps=800,
                          learning_starts=64, target_update_every=25)


@pytest.fixture(scope='module')
def chain():
  """(env, network, tx, chunk fn): one compiled chunk shared by the tests below."""
  env = envs.from_gymnax('chain', TwoStepChain(), ChainParams())
  net = networks.create_q_network(env.num_actions, conv_features=(4,), hidden=32)
  tx = dqn.make_optimizer(CHAIN_CFG)
  return env, net, tx, dqn.make_train_chunk(net, env, CHAIN_CFG, tx)


def test_dqn_learns_the_chain_by_bootstrapping(chain):
  env, net, tx, chunk = chain
  state = dqn.create_train_state(jax.random.key(0), net, env, CHAIN_CFG, tx)
  losses = []
  for _ in range(CHAIN_CFG.num_chunks):
    state, metrics = chunk(state, jax.random.key(1))
    losses.append(float(metrics['loss']))
  obs_a, obs_b = (jnp.broadcast_to(jax.nn.one_hot(p, 2), (1, 10, 10, 2)) for p in (0, 1))
  q_a, q_b = (np.asarray(net.apply({'params': state.params}, o))[0] for o in (obs_a, obs_b))
  # Greedy in A is the bootstrapped action (0.9 > 0.5), in B the rewarded one.
  assert q_a.argmax() == 0 and q_b.argmax() == 1, (q_a, q_b)
  np.testing.assert_allclose(q_a, [0.9, 0.5], atol=0.1)
  np.testing.assert_allclose(q_b, [0.0, 1.0], atol=0.1)
  assert losses[-1] < losses[1]  # chunk 0 ends right after learning starts


def test_training_resumes_bit_for_bit(chain, tmp_path):
  env, net, tx, chunk = chain
  fresh = lambda: dqn.create_train_state(jax.random.key(7), net, env, CHAIN_CFG, tx)
  key = jax.random.key(3)
  state = fresh()
  for _ in range(2):
    state, _ = chunk(state, key)
  uninterrupted = jax.device_get(state)

  with checkpointing.Checkpointer(tmp_path / 'checkpoints', fingerprint={'t': 1}) as ckpt:
    first, _ = chunk(fresh(), key)
    ckpt.save(1, first, force=True)
  del first
  with checkpointing.Checkpointer(tmp_path / 'checkpoints', fingerprint={'t': 1}) as ckpt:
    # A target built from another key: everything must come from the checkpoint.
    step, restored = ckpt.restore_latest(
        target=dqn.create_train_state(jax.random.key(99), net, env, CHAIN_CFG, tx))
  assert step == 1
  resumed, _ = chunk(restored, key)
  resumed = jax.device_get(resumed)
  leaves_u, tree_u = jax.tree_util.tree_flatten(uninterrupted)
  leaves_r, tree_r = jax.tree_util.tree_flatten(resumed)
  assert tree_u == tree_r
  for a, b in zip(leaves_u, leaves_r):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_replay_buffer_packs_and_wraps():
  cfg = dqn.DQNConfig(num_envs=2, total_env_steps=2 * 250, buffer_size=4, batch_size=2,
                      learning_starts=2)
  replay = dqn.create_replay(cfg, (10, 10, 3))
  obs = (jax.random.uniform(jax.random.key(0), (3, 2, 10, 10, 3)) > 0.5).astype(jnp.float32)
  add = jax.jit(dqn.add)
  for i in range(3):
    replay = add(replay, obs[i], 1.0 - obs[i], jnp.array([i, i]), jnp.array([1.0, 2.0]),
                 jnp.array([0.0, 1.0]))
  assert int(replay.size) == 4 and int(replay.position) == 2
  # Rows 0-1 were overwritten by the third block; rows 2-3 hold the second.
  np.testing.assert_array_equal(dqn.unpack(replay.obs[:2], (10, 10, 3)), obs[2])
  np.testing.assert_array_equal(dqn.unpack(replay.next_obs[2:], (10, 10, 3)), 1.0 - obs[1])
  np.testing.assert_array_equal(replay.action, [2, 2, 1, 1])


def test_agent_config_errors_name_the_field():
  with pytest.raises(ValueError, match='rl.total_env_steps=1000 must be a multiple'):
    dqn.DQNConfig(num_envs=16, total_env_steps=1000).validate()
  with pytest.raises(ValueError, match=r'rl.loss=.*valid choices: huber, mse'):
    dqn.DQNConfig(total_env_steps=32 * 250, loss='l1').validate()


# ----------------------------------------------------------------------------------------
# The Q-network's sites and the defenses retrofitted through them.


@pytest.fixture(scope='module')
def qnet():
  net = networks.create_q_network(4)
  variables = jax.jit(lambda k: networks.init_variables(net, k, (10, 10, 6)))(jax.random.key(0))
  x = (jax.random.uniform(jax.random.key(1), (8, 10, 10, 6)) > 0.7).astype(jnp.float32)
  return net, variables, x


def test_q_network_sites(qnet):
  net, _, _ = qnet
  assert models.list_sites(net, (10, 10, 6)) == [
      ('conv1_in', 'conv_in'), ('conv1_out', 'conv_out'), ('act1', 'act'),
      ('fc1_in', 'dense_in'), ('act2', 'act'), ('fc2_in', 'dense_in')]


def test_patch_conv_equals_the_convolution():
  lhs = jax.random.normal(jax.random.key(0), (3, 10, 10, 5))
  rhs = jax.random.normal(jax.random.key(1), (3, 3, 5, 7))
  for padding in ('VALID', 'SAME'):
    want = jax.lax.conv_general_dilated(lhs, rhs, (1, 1), padding,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    got = jax.jit(networks.patch_conv, static_argnums=(2, 3))(lhs, rhs, (1, 1), padding)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_retrofit_specs_on_the_q_network(qnet):
  net, variables, x = qnet
  plain = jax.jit(net.apply)(variables, x)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  compiled = {}

  def q(spec, key):  # one compiled program per spec (eager SAP compiles op by op: slow)
    if spec not in compiled:
      compiled[spec] = jax.jit(retrofit.make_logits_fn(net, variables,
                                                       retrofit.parse_defense(spec).hook))
    return compiled[spec](x, key)
  np.testing.assert_array_equal(q('none', k1), plain)                    # bit for bit
  np.testing.assert_array_equal(q('jump(kappa=0.0)', k1), plain)         # kappa 0 = ReLU
  assert not np.allclose(q('jump(kappa=0.5)', k1), plain)
  for spec in ('sap(frac=1.0)', 'rse(sigma_init=0.2, sigma_inner=0.1)',
               'rse(sigma_init=0.1, sigma_inner=0.1) + jump(kappa=0.1)'):
    np.testing.assert_array_equal(q(spec, k1), q(spec, k1))              # a key's draw
    assert not np.allclose(q(spec, k1), q(spec, k2)), spec               # stochastic
    assert not np.allclose(q(spec, k1), plain), spec
  for spec in ('sap(frac=1.0)', 'jump(kappa=0.5)', 'rse(sigma_init=0.2, sigma_inner=0.1)'):
    retrofit.validate_for_model(spec, net, (10, 10, 6))


def test_decision_rule_is_the_mean_q_over_draws(qnet):
  net, variables, x = qnet
  sap = retrofit.parse_defense('sap(frac=1.0)')
  decide = observation_attacks.make_decision_fn(net, sap, num_draws=4)
  key = jax.random.key(5)
  # Extra leading axes are decided with the same draws: [x, x] gives the same actions twice.
  both, q = jax.jit(decide)(variables, jnp.stack([x, x]), key)
  np.testing.assert_array_equal(both[0], both[1])
  q_fn = jax.jit(retrofit.make_logits_fn(net, variables, sap.hook))
  manual = jnp.mean(jnp.stack([q_fn(x, k) for k in jax.random.split(key, 4)]), axis=0)
  np.testing.assert_allclose(q[0], manual, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(both[0], jnp.argmax(manual, -1))


# ----------------------------------------------------------------------------------------
# The observation attack.


def test_fgsm_changes_actions_where_random_signs_of_the_same_size_do_not(qnet):
  """On 256 observations of a fixed network, FGSM (margin loss against the clean greedy
  action) at lambda = 0.05 changes most greedy actions; random +-lambda signs of the same
  L-inf size change few. Measured: 256/256 vs about 2/256; the bounds leave wide room (a
  binomial with p = 0.1 exceeds 64/256 with probability < 1e-10)."""
  net, variables, _ = qnet
  x = (jax.random.uniform(jax.random.key(11), (256, 10, 10, 6)) > 0.8).astype(jnp.float32)
  none = retrofit.parse_defense('none')
  decide = observation_attacks.make_decision_fn(net, none, num_draws=1)
  attack_list = [observation_attacks.parse_attack(a) for a in ('fgsm', 'random_sign')]
  perturb = jax.jit(observation_attacks.make_perturb_fn(net, none, attack_list, eot_samples=1))
  decide = jax.jit(decide)
  clean, _ = decide(variables, x, jax.random.key(0))
  eps = 0.05
  changed = {}
  for index, attack in enumerate(attack_list):
    x_adv = perturb(variables, x, jax.random.key(4), eps, index)
    assert float(jnp.max(jnp.abs(x_adv - x))) <= eps + 1e-7
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    changed[attack.name] = int(jnp.sum(decide(variables, x_adv, jax.random.key(0))[0] != clean))
  assert changed['fgsm'] >= 192, changed
  assert changed['random_sign'] <= 64, changed


def test_attack_specs_are_checked():
  assert observation_attacks.parse_attack('pgd(steps=3)').hparams()['loss'] == 'margin'
  with pytest.raises(ValueError, match='unknown observation attack'):
    observation_attacks.parse_attack('square')
  with pytest.raises(ValueError, match='set by the evaluation'):
    observation_attacks.parse_attack('fgsm(eps=0.1)')
  jump = retrofit.parse_defense('jump(kappa=0.5)')
  assert observation_attacks.attacker_defense(jump).text == "jump(kappa=0.5, surrogate='relu')"


def test_summary_interval():
  s = evaluate.summarize(np.array([1.0, 2.0, 3.0, 4.0]), np.array([10, 10, 10, 10]),
                         np.array([1, 2, 3, 4]))
  assert s['mean_return'] == 2.5 and s['n'] == 4
  # t(0.975, 3) = 3.182; std = 1.291; half width = 3.182 * 1.291 / 2 = 2.054.
  np.testing.assert_allclose(s['ci95'], [2.5 - 2.0540, 2.5 + 2.0540], atol=1e-3)
  assert s['action_change_rate'] == 0.25


# ----------------------------------------------------------------------------------------
# The config and the run.


def test_config_variants_validate_and_docstring_starts_with_the_command():
  module = _load_config_module()
  assert module.__doc__.startswith('python -m advdef.main --config=configs/minatar_dqn.py')
  assert set(module.GAMES) == set(envs.GAMES)
  for arg in (None, 'game=breakout', 'game=space_invaders', 'smoke', 'game=asterix,smoke'):
    config = module.get_config(arg)
    parsed = experiment.validate_config(config)
    assert experiment.is_rl_config(config)
    assert len(parsed.defenses) == 4 and parsed.epsilons[0] == 0.0
  with pytest.raises(ValueError, match='valid games: breakout, space_invaders'):
    module.get_config('game=pong')


@pytest.mark.slow
def test_smoke_config_end_to_end_through_main(tmp_path):
  workdir = tmp_path / 'run'
  # Compiling dominates a smoke run; XLA's optimizations halve it (same values).
  env = conftest.subprocess_env(JAX_DISABLE_MOST_OPTIMIZATIONS='true')
  cmd = [sys.executable, '-m', 'advdef.main', '--config=configs/minatar_dqn.py:smoke',
         f'--workdir={workdir}']
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((workdir / 'report.json').read_text())
  config = _load_config_module().get_config('smoke')
  assert report['task'] == 'rl' and report['game'] == 'breakout'
  assert report['training']['env_steps'] == config.rl.total_env_steps
  assert report['random_policy']['n'] == config.eval.num_episodes
  rows = {(r['defense'], r['attack'], r['epsilon']) for r in report['rows']}
  labels = [retrofit.parse_defense(d).label for d in config.eval.defenses]
  want = {(d, 'none', 0.0) for d in labels} | {
      (d, observation_attacks.parse_attack(a).label, e) for d in labels
      for a in config.eval.attacks for e in config.eval.epsilons if e > 0}
  assert rows == want
  for r in report['rows']:
    assert r['n'] == config.eval.num_episodes and r['ci95'][0] <= r['mean_return'] <= r['ci95'][1]
  for name in ('report.md', 'return_vs_epsilon.png', 'training_curves.png', 'metrics.jsonl'):
    assert (workdir / name).exists(), name
  # A rerun resumes: nothing left to train, every result read back, the same rows.
  metrics_before = (workdir / 'metrics.jsonl').read_text()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  again = json.loads((workdir / 'report.json').read_text())
  assert again['rows'] == report['rows']
  assert again['training']['resumed_from_env_steps'] == config.rl.total_env_steps
  assert (workdir / 'metrics.jsonl').read_text() == metrics_before
  # A bad config is one line and exit code 2, before any compute.
  proc = subprocess.run(cmd + ['--config.eval.attacks=("square",)'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith('advdef: error: eval.attacks[0]=')

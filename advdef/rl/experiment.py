"""One RL run end to end: validate the config, train the DQN agent (or resume, or load a
trained one), attack it through its observations under every defense, write the report.

  python -m advdef.main --config=configs/minatar_dqn.py:game=breakout --workdir=/tmp/breakout

  prepared = prepare(config, workdir)   # everything that can fail on bad input, no compute
  report = run(config, workdir, prepared=prepared)

Training (advdef.rl.dqn) runs in jitted chunks of `rl.chunk_iterations` iterations; after
each chunk the metrics go to metrics.jsonl / TensorBoard (step = environment steps), and
every `rl.checkpoint_every_chunks` chunks (and at the end) the whole training state (agent,
optimizer, replay buffer, environments) is checkpointed. Rerunning the command resumes from
the newest readable checkpoint and ends bit for bit where an uninterrupted run ends.

Evaluation: the trained agent under each `eval.defenses` spec (retrofitted at test time, as
the SAP paper did with its pre-trained agents), clean and under each `eval.attacks` at every
lambda of `eval.epsilons` (advdef.rl.evaluate), plus the random policy on the same episode
seeds. Each finished (defense, attack) result is saved at once in
<workdir>/eval_results/rl-*.json, keyed by everything it depends on, so a rerun skips it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from advdef import checkpointing
from advdef import compilation
from advdef import config_utils
from advdef import files
from advdef import metric_writers
from advdef import retrofit
from advdef import rng
from advdef import training
from advdef import validate
from advdef import version
from advdef.rl import dqn
from advdef.rl import envs
from advdef.rl import evaluate
from advdef.rl import networks
from advdef.rl import observation_attacks
from advdef.rl import report as rl_report

TASK = 'rl'
# The evaluation's PRNG streams, folded into rng.run_key(seed, 'eval'); frozen numbers.
EVAL_STREAMS = {'episodes': 0, 'attack': 1, 'decision': 2}
RESULTS_DIR = 'eval_results'
# The training return reported in the summary: the episodes ended in the last chunks.
_FINAL_CHUNKS = 10


def is_rl_config(config) -> bool:
  """True for configs this module runs (`task='rl'`); advdef.main dispatches on it."""
  return config.get('task') == TASK


@dataclasses.dataclass(frozen=True)
class Parsed:
  """The config's values, checked once and parsed (spec strings) by `validate_config`."""
  game: str
  agent: dqn.DQNConfig
  defenses: tuple[retrofit.DefenseSpec, ...]
  attacks: tuple[observation_attacks.ObservationAttack, ...]
  epsilons: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Prepared:
  parsed: Parsed
  env: envs.Env        # training: the game's own time limit
  eval_env: envs.Env   # evaluation: eval.max_episode_steps
  network: networks.QNetwork


def validate_config(config) -> Parsed:
  """Fails fast, naming the field and its valid values; returns the parsed config."""
  if not is_rl_config(config):
    raise ValueError(f"task={config.get('task')!r}: advdef.rl runs configs with task='rl'")
  rl, ev = config.rl, config.eval
  validate.check_int('seed', config.seed)
  validate.check_choice('rl.game', rl.game, sorted(envs.GAMES))
  validate.check_probability('rl.sticky_action_prob', rl.sticky_action_prob)
  agent = dqn.DQNConfig.from_config(rl)
  for name in ('checkpoint_every_chunks', 'keep_checkpoints'):
    validate.check_positive(f'rl.{name}', rl[name], integer=True)
  if rl.checkpoint and not os.path.exists(rl.checkpoint):
    raise ValueError(f'rl.checkpoint={rl.checkpoint!r} does not exist; give the workdir of a '
                     'trained run, or leave it empty to train')
  defenses = tuple(retrofit.parse_defense(d, field=f'eval.defenses[{i}]')
                   for i, d in enumerate(ev.defenses))
  if not defenses:
    raise ValueError("eval.defenses is empty; give at least 'none'")
  attack_specs = tuple(observation_attacks.parse_attack(a, field=f'eval.attacks[{i}]')
                       for i, a in enumerate(ev.attacks))
  labels = [a.label for a in attack_specs]
  if len(set(labels)) != len(labels):
    raise ValueError(f'eval.attacks={tuple(ev.attacks)!r} lists an attack twice')
  epsilons = tuple(float(e) for e in ev.epsilons)
  for e in epsilons:
    validate.check_hyperparameter('eval.epsilons', e, strict=False, maximum=1.0, scalar=True)
  if list(epsilons) != sorted(set(epsilons)):
    raise ValueError(f'eval.epsilons={tuple(ev.epsilons)!r} must be increasing, without repeats')
  for name in ('num_episodes', 'num_draws', 'eot_samples', 'max_episode_steps'):
    validate.check_positive(f'eval.{name}', ev[name], integer=True)
  validate.check_bool('eval.random_policy', ev.random_policy)
  validate.check_bool('report.tensorboard', config.report.tensorboard)
  return Parsed(game=rl.game, agent=agent, defenses=defenses, attacks=attack_specs,
                epsilons=epsilons)


def fingerprint(config, env: envs.Env) -> dict[str, Any]:
  """What a checkpoint belongs to: a workdir of another game or agent shape is refused."""
  rl = config.rl
  return {'task': TASK, 'game': rl.game, 'sticky_action_prob': rl.sticky_action_prob,
          'obs_shape': list(env.obs_shape),
          'num_actions': env.num_actions, 'network': config_utils.to_dict(rl.network),
          'num_envs': rl.num_envs, 'buffer_size': rl.buffer_size}


def prepare(config, workdir: str | None = None) -> Prepared:
  """Config, game, network, every defense against the network's sites, and the workdir's
  checkpoints: everything that can fail on bad input, before any training compute."""
  parsed = validate_config(config)
  env = envs.make(parsed.game, sticky_action_prob=config.rl.sticky_action_prob)
  eval_env = envs.with_time_limit(env, config.eval.max_episode_steps)
  network = networks.create_q_network(env.num_actions,
                                      conv_features=tuple(config.rl.network.conv_features),
                                      hidden=config.rl.network.hidden)
  for i, defense in enumerate(parsed.defenses):
    retrofit.validate_for_model(defense, network, env.obs_shape, field=f'eval.defenses[{i}]')
  ckpt_dir = os.path.join(workdir or '', 'checkpoints')
  if workdir and os.path.isdir(ckpt_dir) and not config.rl.checkpoint:
    with checkpointing.Checkpointer(ckpt_dir, fingerprint=fingerprint(config, env)) as ckpt:
      ckpt.check_compatible()
  return Prepared(parsed=parsed, env=env, eval_env=eval_env, network=network)


def run(config, workdir: str, *, progress: bool = True,
        prepared: Prepared | None = None) -> dict[str, Any]:
  """Trains (or resumes / loads), evaluates, and writes report.json, report.md and plots."""
  t0 = time.time()
  prepared = prepared or prepare(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  with compilation.CompileTimer() as timer:
    writer = metric_writers.MetricWriter(workdir, tensorboard=config.report.tensorboard)
    writer.write_hparams(config_utils.to_dict(config))
    try:
      if config.rl.checkpoint:
        params = load_params(config.rl.checkpoint, config, prepared)
        summary = {'loaded_from': config.rl.checkpoint}
      else:
        params, summary = train(config, workdir, prepared, writer=writer, progress=progress)
    finally:
      writer.close()
    t1 = time.time()
    report = rl_report.new_report(config=config_utils.to_dict(config), game=prepared.parsed.game)
    report['training'] = summary
    evaluate_agent(config, prepared, params, report, workdir=workdir)
  wall = time.time() - t0
  report['wall_seconds'] = wall
  report['timing'] = dict(timer.summary(), wall_seconds=wall, train_seconds=t1 - t0,
                          evaluate_seconds=time.time() - t1)
  paths = rl_report.write_report(workdir, report, metric_writers.read_metrics(workdir))
  logging.info('Wrote %s', ', '.join(map(str, paths)))
  return report


def train(config, workdir: str, prepared: Prepared, *, writer=None, progress: bool = False
          ) -> tuple[Any, dict[str, Any]]:
  """Trains the agent per config.rl, resuming from the workdir's newest checkpoint.

  Returns (the online network's params, a summary: env steps, updates, wall seconds, the
  training return of the last chunks).
  """
  cfg, env, network = prepared.parsed.agent, prepared.env, prepared.network
  tx = dqn.make_optimizer(cfg)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    keep=config.rl.keep_checkpoints,
                                    fingerprint=fingerprint(config, env))
  ckpt.check_compatible()
  state = dqn.create_train_state(rng.run_key(config.seed, 'init'), network, env, cfg, tx)
  start, state = ckpt.restore_latest(target=state)
  start = int(start or 0)  # checkpoints are keyed by environment steps
  per_chunk = cfg.num_envs * cfg.chunk_iterations
  if start % per_chunk:
    raise ValueError(f'checkpoint at env step {start} in {workdir} is not at a chunk boundary '
                     f'of {per_chunk} env steps; it was written with another rl.num_envs or '
                     'rl.chunk_iterations: rerun with those, or use a new --workdir')
  if start:
    logging.info('Resumed from env step %d in %s', start, workdir)
  if writer is not None:
    writer.truncate_after(start)
  chunk_fn = dqn.make_train_chunk(network, env, cfg, tx)
  train_key = rng.run_key(config.seed, 'train')
  total = cfg.num_chunks * per_chunk
  bar = metric_writers.ProgressBar(total=cfg.num_chunks, initial=start // per_chunk,
                                   desc='train chunks', enabled=progress)
  t0 = time.time()
  env_steps = start
  try:
    while env_steps < total:
      state, metrics = chunk_fn(state, train_key)
      env_steps += per_chunk
      scalars = {f'train/{k}': float(v) for k, v in jax.device_get(metrics).items()}
      if scalars['train/updates'] > 0 and not math.isfinite(scalars['train/loss']):
        raise training.NonFiniteLossError(training.non_finite_message(
            scalars['train/loss'], env_steps - per_chunk, env_steps, ckpt.latest_step()))
      # NaN marks a quantity the chunk did not have (no update yet, no episode ended).
      scalars = {k: v for k, v in scalars.items() if math.isfinite(v)}
      scalars['train/seconds'] = time.time() - t0
      if writer is not None:
        writer.write_scalars(env_steps, scalars)
      bar.update(1, **{name: f'{scalars[k]:.3g}' for name, k in (
          ('ret', 'train/episode_return'), ('loss', 'train/loss')) if k in scalars})
      chunk = env_steps // per_chunk
      if chunk % config.rl.checkpoint_every_chunks == 0 or env_steps == total:
        ckpt.save(env_steps, state, force=True)
  finally:
    bar.close()
    ckpt.wait()
    ckpt.close()
  summary = {'env_steps': total, 'updates': int(state.updates), 'resumed_from_env_steps': start,
             'wall_seconds': time.time() - t0}
  rows = metric_writers.read_metrics(workdir) if writer is not None else []
  summary.update(_final_training_return(rows))
  return state.params, summary


def _final_training_return(rows) -> dict[str, Any]:
  """The epsilon-greedy training return over the episodes of the last chunks, weighted."""
  rows = [r for r in rows if r.get('train/episodes')][-_FINAL_CHUNKS:]
  episodes = sum(r['train/episodes'] for r in rows)
  if not episodes:
    return {}
  total = sum(r['train/episode_return'] * r['train/episodes'] for r in rows)
  return {'final_train_return': total / episodes, 'final_train_episodes': int(episodes),
          'final_train_epsilon': rows[-1].get('train/epsilon')}


def load_params(path: str, config, prepared: Prepared):
  """The online params of a trained run (its workdir or checkpoint directory)."""
  shapes = jax.eval_shape(lambda: networks.init_variables(
      prepared.network, jax.random.key(0), prepared.env.obs_shape))
  restored = checkpointing.restore_variables(
      path, {'params': shapes['params']}, expected_fingerprint=fingerprint(config, prepared.env))
  return restored['params']


def _eval_keys(seed: int) -> dict[str, jax.Array]:
  base = rng.run_key(seed, 'eval')
  return {name: jax.random.fold_in(base, i) for name, i in EVAL_STREAMS.items()}


def _params_digest(params) -> str:
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(params):
    a = np.asarray(leaf)
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _result_path(workdir, config, digest: str, what: dict[str, Any]) -> str:
  """eval_results/rl-<hash>.json: the hash of everything the result depends on."""
  text = json.dumps(files.to_jsonable({
      'advdef': version.__version__, 'jax': jax.__version__, 'seed': config.seed,
      'game': config.rl.game, 'network': config_utils.to_dict(config.rl.network),
      'eval': config_utils.to_dict(config.eval), 'params': digest, 'what': what}),
      sort_keys=True)
  return os.path.join(workdir, RESULTS_DIR, f'rl-{hashlib.sha256(text.encode()).hexdigest()[:20]}.json')


def _cached(workdir, config, digest, what, compute):
  """compute() -> list of rows, stored at once; a rerun with the same inputs reads it back."""
  if workdir is None:
    return compute()
  path = _result_path(workdir, config, digest, what)
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      return json.load(f)['rows']
  rows = files.to_jsonable(compute())
  files.write_json_atomic(path, {'what': what, 'rows': rows})
  return rows


def _rows(defense, attack_label, epsilons, out, seconds, extra) -> list[dict[str, Any]]:
  rows = []
  for i, eps in enumerate(epsilons):
    s = evaluate.summarize(out['returns'][i], out['lengths'][i], out['changed'][i])
    rows.append({'defense': defense.label, 'attack': attack_label, 'epsilon': float(eps),
                 **s, **extra, 'seconds': seconds / len(epsilons)})
  return rows


def _threat(defense: retrofit.DefenseSpec, attack, eot: int) -> str:
  if attack.name == 'random_sign':
    return 'random control'
  seen = observation_attacks.attacker_defense(defense)
  return ' + '.join(['white-box'] + (['BPDA (ReLU gradient)'] if seen is not defense else [])
                    + ([f'EOT-{eot}'] if eot > 1 else []))


def evaluate_agent(config, prepared: Prepared, params, report: dict[str, Any], *,
                   workdir: str | None = None) -> None:
  """Fills report['random_policy'], report['rows'] and report['notes'] (see module doc).

  Per defense two programs are compiled: the clean episodes, and the attacked ones (every
  attack and budget; the attack is chosen by a traced index).
  """
  parsed, ev, env, network = prepared.parsed, config.eval, prepared.eval_env, prepared.network
  variables = {'params': params}
  keys = _eval_keys(config.seed)
  digest = _params_digest(params)
  n = ev.num_episodes
  run_keys = (keys['episodes'], keys['attack'], keys['decision'])

  def play(runner, epsilons, attack_index=0):
    t0 = time.time()
    out = jax.device_get(runner(variables, jnp.asarray(epsilons, jnp.float32),
                                jnp.int32(attack_index), *run_keys))
    return out, time.time() - t0

  if ev.random_policy:
    def random_rows():
      runner = evaluate.make_episode_runner(
          env, evaluate.random_decision_fn(env.num_actions), None, num_episodes=n)
      out, _ = play(runner, [0.0])
      return [evaluate.summarize(out['returns'][0], out['lengths'][0])]
    report['random_policy'] = _cached(workdir, config, digest, {'random_policy': True},
                                      random_rows)[0]
  attacked_eps = [e for e in parsed.epsilons if e > 0]
  for defense in parsed.defenses:
    decide = observation_attacks.make_decision_fn(network, defense, num_draws=ev.num_draws)
    base = {'stochastic': defense.stochastic,
            'num_draws': ev.num_draws if defense.stochastic else 1}

    def clean_rows(decide=decide, base=base, defense=defense):
      runner = evaluate.make_episode_runner(env, decide, None, num_episodes=n)
      out, seconds = play(runner, [0.0])
      return _rows(defense, 'none', [0.0], out, seconds, dict(base, threat='clean'))

    report['rows'] += _cached(workdir, config, digest, {'defense': defense.text,
                                                       'attack': 'none'}, clean_rows)
    if not (attacked_eps and parsed.attacks):
      continue
    runner = None  # built (and compiled) only when some attack is not cached
    for index, attack in enumerate(parsed.attacks):
      stochastic = observation_attacks.attacker_defense(defense).stochastic
      eot = ev.eot_samples if stochastic and attack.name != 'random_sign' else 1

      def attack_rows(decide=decide, base=base, defense=defense, attack=attack, eot=eot,
                      index=index):
        nonlocal runner
        if runner is None:
          perturb = observation_attacks.make_perturb_fn(network, defense, parsed.attacks,
                                                        eot_samples=ev.eot_samples)
          runner = evaluate.make_episode_runner(env, decide, perturb, num_episodes=n)
        out, seconds = play(runner, attacked_eps, index)
        return _rows(defense, attack.label, attacked_eps, out, seconds,
                     dict(base, eot_samples=eot, threat=_threat(defense, attack, eot)))

      report['rows'] += _cached(workdir, config, digest,
                                {'defense': defense.text, 'attack': attack.text,
                                 'attacks': [a.text for a in parsed.attacks],
                                 'epsilons': attacked_eps}, attack_rows)
      logging.info('evaluated %s under %s', defense.label, attack.label)
  report['notes'] += [
      'Defenses are retrofitted at test time onto the one trained agent (the SAP paper '
      'protocol for its pre-trained Atari agents); the agent was trained undefended.',
      'Observations are binary; the attacker perturbs them continuously in [0, 1] within the '
      'L-inf ball of radius lambda (advdef.rl.observation_attacks) at every step, against the '
      "agent's clean greedy action (margin loss unless the attack spec sets one).",
      f'Stochastic defenses decide on the mean Q over {ev.num_draws} fresh draws (decision '
      f'keys), and are attacked with EOT over {ev.eot_samples} draws (attack keys): independent '
      'streams. Every row plays the same episode seeds.',
  ]

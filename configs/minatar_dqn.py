"""python -m advdef.main --config=configs/minatar_dqn.py:game=breakout --workdir=/tmp/minatar_breakout

SAP's reinforcement-learning experiment at MinAtar scale (issue 16; papers.md §1.6): a
double-DQN agent (MinAtar's network: conv3x3 16, fc128) trained on a MinAtar game (gymnax,
inside jit), then played for `eval.num_episodes` fixed-seed episodes undefended and with
SAP, JumpReLU and RSE noise retrofitted onto its Q-network at test time, clean and with its
observation attacked at every step (FGSM as in the paper, PGD, and a random-sign control of
the same L-inf size) at each budget lambda in `eval.epsilons`. The report gives the mean
episode return with its 95% t-interval per (defense, attack, lambda) and the random policy's
return on the same seeds: report.json, report.md, return_vs_epsilon.png, training_curves.png.

Arguments (configs/minatar_dqn.py:ARG): `game=` one of breakout, space_invaders, asterix,
freeway, seaquest (breakout and space_invaders are the measured ones); `smoke` (800
environment steps and 2 episodes of at most 20 steps, for tests and CI).

Agent: double DQN, MinAtar's sticky actions (0.1) in training and evaluation, 16 envs, one
Adam update (batch 64, lr 5e-4) per 16 env steps, target copy every 250 updates, epsilon 1 ->
0.05 over 100k env steps, 480k env steps = 29,688 updates. Fewer updates per env step than
MinAtar's own DQN (1 per step, batch 32): on 2 CPU cores an update (~10 ms) is the cost, an
env step is not. Chosen on training returns only.

Defenses (retrofitted at test time onto the one trained agent, as the SAP paper did): SAP-100;
JumpReLU at kappa = 0.1, chosen before any evaluation from the trained Breakout agent's
activations on its replay buffer (positive activations: median 0.18 at act1, 0.92 at act2;
kappa 0.5 would zero 70% of act1's); RSE's noise with the RSE paper's sigmas, but without its
noisy training (the agent is trained undefended), which costs it its clean return.
Evaluation: 32 fixed-seed episodes per row (the same seeds in every row), FGSM (the paper's),
PGD-5 and a random-sign control, margin loss on Q against the clean greedy action; SAP and RSE
decide on the mean Q of 8 fresh draws and are attacked with EOT-4, JumpReLU with BPDA.

Measured 2026-11-28 on 2 AMD EPYC cores shared with another long job (load 5-8), both games
trained at the same time (so each had about half the CPU the other job left), jax 0.10.2:

| | Breakout | SpaceInvaders |
|---|---|---|
| training loop, 480k env steps | 539 s (9.0 min; 394 s alone in an earlier run) | 621 s (10.3 min) |
| training return, last 10 chunks (eps 0.05) | 6.2 | 27.5 |
| greedy return, 32 episodes [95% CI] | 8.75 [6.45, 11.05] | 53.4 [41.9, 64.9] |
| random policy, same seeds | 0.41 [0.17, 0.65] | 4.66 [3.27, 6.04] |
| whole run (train, attack, report) | 21.9 min (evaluation 12.8, 5.1 of it compiling) | 37.8 min (evaluation 27.4, 8.0 compiling) |

Breakout, mean return at lambda = 0.01 / 0.03 / 0.1 under FGSM: undefended 8.03 /
3.66 / 0.91, SAP 7.81 / 4.00 / 0.97, JumpReLU 5.78 / 5.34 / 1.00, RSE 1.03 / 0.97 / 0.47
(clean: 8.75, 8.12, 8.47, 0.94); the random-sign control at 0.03 leaves 8.03 (16% of the
decisions changed, against 73% for FGSM). report.md has every row and interval.
SpaceInvaders at 0.01 / 0.03 / 0.1 under FGSM: undefended 38.4 / 18.5 / 0.38, SAP 39.3 /
21.9 / 7.97, JumpReLU 24.7 / 21.8 / 3.31, RSE 9.38 / 11.4 / 7.09 (clean: 53.4, 35.0, 30.3,
8.38); under PGD-5 SAP keeps 30.2 / 18.5 / 3.03 against 30.2 / 12.4 / 2.09 undefended; random
signs at 0.1 leave the undefended agent 32.1. Its evaluation is the long part: ~400-step
episodes, and SAP's exact sampler under EOT at every step.
"""

import ml_collections

from advdef import config_utils

# advdef.rl.envs.GAMES (not imported here: it loads JAX, and config errors come first).
GAMES = ('breakout', 'space_invaders', 'asterix', 'freeway', 'seaquest')


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, game='breakout', smoke=False)
  if arg.game not in GAMES:
    raise ValueError(f'config argument game={arg.game!r} is not a MinAtar game; valid games: '
                     f'{", ".join(GAMES)}')
  c = ml_collections.ConfigDict()
  c.task = 'rl'        # advdef.main runs this config with advdef.rl.experiment
  c.seed = 0
  c.rl = dict(
      game=arg.game,
      sticky_action_prob=0.1,   # MinAtar's default (gymnax leaves it out); train and eval
      network=dict(conv_features=(16,), hidden=128),
      # One iteration = one step of each of num_envs environments, then
      # updates_per_iteration Adam updates on minibatches of batch_size transitions.
      num_envs=16, total_env_steps=480_000, chunk_iterations=250,
      buffer_size=100_000, batch_size=64, learning_rate=5e-4, adam_eps=1e-5,
      max_grad_norm=10.0, gamma=0.99, epsilon_start=1.0, epsilon_end=0.05,
      epsilon_decay_env_steps=100_000, learning_starts=5_000, updates_per_iteration=1,
      target_update_every=250, double=True, loss='huber',
      checkpoint_every_chunks=20, keep_checkpoints=2,
      checkpoint='')   # a trained run's workdir: skip training and evaluate its agent
  c.eval = dict(
      defenses=('none', 'sap(frac=1.0)', 'jump(kappa=0.1)',
                'rse(sigma_init=0.2, sigma_inner=0.1)'),
      # FGSM (the paper's), PGD, and the random-sign control; the margin loss on Q-values
      # against the clean greedy action unless the spec sets `loss=`.
      attacks=('fgsm', 'pgd(steps=5)', 'random_sign'),
      epsilons=(0.0, 0.01, 0.03, 0.1, 0.3),   # lambda: L-inf on observations in [0, 1]
      num_episodes=32,
      num_draws=8,           # the stochastic defenses' decision rule: mean Q over draws
      eot_samples=4,         # the attacker's EOT draws per gradient (SAP, RSE)
      max_episode_steps=1000,
      random_policy=True)
  c.report = dict(tensorboard=True)
  if arg.smoke:
    c.rl.update(num_envs=4, total_env_steps=800, chunk_iterations=50, buffer_size=400,
                batch_size=16, learning_starts=100, epsilon_decay_env_steps=400,
                target_update_every=20, checkpoint_every_chunks=2)
    c.eval.update(attacks=('fgsm', 'pgd(steps=2)', 'random_sign'), epsilons=(0.0, 0.1),
                  num_episodes=2, num_draws=2, eot_samples=2, max_episode_steps=20)
    c.report.tensorboard = False
  return c

"""Reinforcement learning: SAP's RL experiment at MinAtar scale (issue 16).

A double-DQN agent on MinAtar games (gymnax, inside jit), whose Q-network has the named
defense sites of advdef.models, so SAP, JumpReLU, RSE noise and their stacks retrofit onto
it by spec string; FGSM / PGD on its observations at every time step; the mean episode
return vs the budget lambda under each defense, with 95% intervals over fixed episode seeds.

Modules, lowest first:
  envs                 MinAtar games from gymnax, vectorized reset / step with auto-reset
  networks             the Q-network (MinAtar's conv16-fc128) with sites; patch_conv
  dqn                  replay buffer, double-DQN loss, the jitted lax.scan training chunk
  observation_attacks  per-step attacks (relaxation in [0, 1], EOT, BPDA) and the decision rule
  evaluate             episodes with fixed seeds at a grid of budgets; mean return, t-interval
  report               report.json / report.md / return_vs_epsilon.png
  experiment           the run: prepare, train with checkpoints and resume, evaluate, report

Run it with `python -m advdef.main --config=configs/minatar_dqn.py:game=breakout
--workdir=DIR` (advdef.main dispatches configs with task='rl' here).
"""

"""ANP-VS against its baselines on MNIST with LeNet-5-Caffe at CPU scale (~19 min on 2 cores).

  python scripts/anp_mnist_cpu.py --root=/tmp/anp_mnist [--data=../shared/data/mnist10k.npz]

Runs `python -m advdef.main` with configs/mnist_anp.py:cpu on mnist10k (8,000 train / 2,000
test), in order:
  standard  the clean base model (20 epochs)
  at        adversarial training from scratch, (CE_clean + 2 CE_adv) / 3 (8 epochs)
  bp        Beta-Bernoulli pruning with clean training, from the base (8 epochs)
  anp_vs    ANP-VS from the base (8 epochs)
then evaluates every model with white-box PGD-40 (eps 0.3, step 0.01) and the black-box
PGD-40 transferred from the AT model (the paper's source is a separately trained AT model;
here AT itself is the source, so AT has no black-box figure), and writes the ANP-VS table
(clean, white-box, black-box accuracy, vulnerabilities, memory %, FLOPs speed-up, sparsity %)
to ROOT/anp_comparison.md and .json. A stage whose workdir already holds a report is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIG = 'configs/mnist_anp.py'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_stage(root, name, arg, overrides=(), *, data):
  workdir = os.path.join(root, name)
  report = os.path.join(workdir, 'report.json')
  if os.path.exists(report):
    print(f'[{name}] reusing {report}', flush=True)
    return workdir, None
  cmd = [sys.executable, '-m', 'advdef.main', f'--config={CONFIG}:{arg}',
         f'--workdir={workdir}', f'--config.data.path={data}', *overrides]
  print(f'[{name}] {" ".join(cmd[2:])}', flush=True)
  t0 = time.time()
  subprocess.run(cmd, check=True, cwd=REPO)
  seconds = time.time() - t0
  print(f'[{name}] done in {seconds / 60:.1f} min', flush=True)
  return workdir, seconds


def row_of(name, workdir, seconds):
  with open(os.path.join(workdir, 'report.json')) as f:
    report = json.load(f)
  clean = next(r for r in report['rows'] if r['attack'] == 'none' and r['defense'] == 'none')
  pgd = [r for r in report['rows'] if r['attack'].startswith('pgd') and r['defense'] == 'none']
  summary = report['model_summary']
  vuln = summary.get('vulnerability', {})
  return {
      'model': name,
      'clean': clean['accuracy'],
      'white_box': pgd[0]['accuracy'] if pgd else None,
      'black_box': vuln.get('black_box_accuracy'),
      'white_box_vulnerability': vuln.get('white_box_vulnerability'),
      'black_box_vulnerability': vuln.get('black_box_vulnerability'),
      'memory_percent': summary.get('memory_percent'),
      'flops_speedup': summary.get('flops_speedup'),
      'sparsity_percent': summary.get('sparsity_percent'),
      'pruned_export_speedup': summary.get('pruned_export', {}).get('measured_speedup'),
      'train_minutes': None if seconds is None else seconds / 60,
      'n_clean': clean['n'], 'n_attack': pgd[0]['n'] if pgd else None,
  }


def _fmt(v, spec):
  return 'n/a' if v is None else format(v, spec)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--root', default='/tmp/anp_mnist')
  parser.add_argument('--data', default='../shared/data/mnist10k.npz',
                      help='mnist10k.npz (relative paths are from the repository root)')
  args = parser.parse_args()
  os.makedirs(args.root, exist_ok=True)
  data = args.data
  t0 = time.time()
  common = 'source=npz,cpu'
  base, base_s = run_stage(args.root, 'standard', f'recipe=standard,{common}', data=data)
  at, at_s = run_stage(args.root, 'at', f'recipe=at,{common}', data=data)
  source = [f'--config.eval.vulnerability.source={at}']
  bp, bp_s = run_stage(args.root, 'bp', f'recipe=bp,{common},base={base}', source, data=data)
  anp, anp_s = run_stage(args.root, 'anp_vs', f'recipe=anp_vs,{common},base={base}', source,
                         data=data)
  # The base model's own report has no black-box figures (AT did not exist yet): evaluate
  # its checkpoint again with AT as the source.
  std_eval, _ = run_stage(args.root, 'standard_eval', f'recipe=standard,{common}',
                          source + [f'--config.train.checkpoint={base}'], data=data)
  rows = [row_of('Standard', std_eval, base_s), row_of('AT', at, at_s),
          row_of('BP', bp, bp_s), row_of('ANP-VS', anp, anp_s)]
  total = (time.time() - t0) / 60

  lines = ['# ANP-VS vs baselines, MNIST (mnist10k: 8,000 / 2,000), LeNet-5-Caffe, CPU schedule',
           '', f'Total wall time of this invocation: {total:.1f} min.', '',
           '| model | clean | white-box PGD-40 | black-box PGD-40 (from AT) | WB vuln | BB vuln '
           '| memory % | FLOPs x | sparsity % | pruned export speed-up | train min |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f"| {r['model']} | {_fmt(r['clean'], '.2%')} | {_fmt(r['white_box'], '.2%')} | "
        f"{_fmt(r['black_box'], '.2%')} | {_fmt(r['white_box_vulnerability'], '.4f')} | "
        f"{_fmt(r['black_box_vulnerability'], '.4f')} | {_fmt(r['memory_percent'], '.2f')} | "
        f"{_fmt(r['flops_speedup'], '.2f')} | {_fmt(r['sparsity_percent'], '.2f')} | "
        f"{_fmt(r['pruned_export_speedup'], '.2f')} | {_fmt(r['train_minutes'], '.1f')} |")
  anp_row, at_row = rows[3], rows[1]
  lines += ['', f"ANP-VS sparsity {anp_row['sparsity_percent']:.1f}% (goal >= 70%); clean "
            f"accuracy {anp_row['clean'] - at_row['clean']:+.2%} vs AT (goal within 1.5 points)."]
  text = '\n'.join(lines) + '\n'
  with open(os.path.join(args.root, 'anp_comparison.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(args.root, 'anp_comparison.json'), 'w') as f:
    json.dump({'rows': rows, 'total_minutes': total}, f, indent=2)
  print(text)


if __name__ == '__main__':
  main()

"""Reproduces a paper's experiments with advdef and writes its section of RESULTS.md.

  python scripts/reproduce.py --paper=sap --scale=cpu --root=/tmp/repro
  python scripts/reproduce.py --paper=sap --scale=cpu --root=/tmp/repro --list

Runs every experiment of configs/repro_<paper>.py at the scale (smoke: seconds, for CI;
cpu: real images on 2 CPU cores; full: the paper's setting, for a GPU) as
`python -m advdef.main`, each in ROOT/<paper>/<experiment> with its log in run.log there,
one progress line per run. A rerun skips the finished runs (those with report.json) and
resumes an interrupted one. Then it writes the paper's section of RESULTS.md (--results;
between `<!-- paper:<paper> begin -->` and `<!-- paper:<paper> end -->`, other sections
untouched) and its plots in results/<paper>/ beside that file. --render-only rewrites the
section from the finished runs without running anything. See advdef/reproduce/.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--paper', required=True, help='sap | rse (jumprelu, anp: not built yet)')
  parser.add_argument('--scale', default='cpu', help='smoke | cpu | full (default cpu)')
  parser.add_argument('--root', help='the directory of the runs (ROOT/<paper>/<experiment>)')
  parser.add_argument('--results', default=os.path.join(REPO, 'RESULTS.md'),
                      help='the document to write the section into (default: RESULTS.md at '
                      'the repository root)')
  parser.add_argument('--list', action='store_true', help='list the experiments, their '
                      'estimated time and commands, and exit')
  parser.add_argument('--render-only', action='store_true',
                      help='write the section from the finished runs; run nothing')
  parser.add_argument('--verbose', action='store_true', help="show the runs' output")
  args = parser.parse_args(argv)
  from advdef import reproduce
  from advdef.reproduce import frame
  try:
    paper = reproduce.get_paper(args.paper)
    if not args.root:
      if not args.list:
        raise ValueError('--root is required (where the runs live)')
      args.root = os.path.join('/tmp', 'advdef_repro')
    runs = frame.plan(paper, args.scale, args.root)
  except ValueError as e:
    print(f'reproduce: error: {e}', file=sys.stderr)
    return 2
  if args.list:
    frame.describe(runs)
    return 0
  if not args.render_only:
    frame.run_all(runs, verbose=args.verbose)
  paths = frame.write_results(runs, args.results)
  print(f'[{paper.name} {args.scale}] wrote {", ".join(paths)}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())

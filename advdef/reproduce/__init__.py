"""Paper reproductions: experiments run through advdef's own configs, and RESULTS.md.

`python scripts/reproduce.py --paper=sap --scale=cpu --root=DIR` runs a paper's experiments
(one config per experiment, configs/repro_<paper>.py) as `python -m advdef.main`
subprocesses, each in DIR/<paper>/<experiment>, skipping those already finished, and writes
the paper's section of RESULTS.md (between `<!-- paper:<paper> begin -->` and
`<!-- paper:<paper> end -->`) with its plots in results/<paper>/.

  frame      the runner and its progress, the RESULTS.md sections, the verdict rules and the
             readers of finished runs (reports, per-example results)
  estimates  the run-time estimates: per-pass costs per network and platform
  sap        the SAP paper's section (Dhillon et al., ICLR 2018)
  rse        the RSE paper's section (Liu et al., ECCV 2018)
  jumprelu   the JumpReLU paper's section (Erichson et al., ICPRAM 2020)
  anp        the ANP-VS paper's section (Madaan et al., ICML 2020)

A new paper is a config (configs/repro_<paper>.py with `experiments(scale)` and
`get_config`), a section renderer `render(runs) -> Section`, and an entry in PAPERS.
"""

from __future__ import annotations

from advdef.reproduce import anp
from advdef.reproduce import frame
from advdef.reproduce import jumprelu
from advdef.reproduce import rse
from advdef.reproduce import sap

PAPERS: dict[str, frame.Paper] = {
    'sap': frame.Paper(name='sap', title='SAP (Dhillon et al., ICLR 2018)',
                       config='configs/repro_sap.py', render=sap.render),
    'rse': frame.Paper(name='rse', title='RSE (Liu et al., ECCV 2018)',
                       config='configs/repro_rse.py', render=rse.render),
    'jumprelu': frame.Paper(name='jumprelu', title='JumpReLU (Erichson et al., ICPRAM 2020)',
                            config='configs/repro_jumprelu.py', render=jumprelu.render),
    'anp': frame.Paper(name='anp', title='ANP-VS (Madaan et al., ICML 2020)',
                       config='configs/repro_anp.py', render=anp.render),
}
# Papers whose reproduction is planned but not built yet (they answer 'not built yet').
PLANNED: tuple[str, ...] = ()


def get_paper(name: str) -> frame.Paper:
  """The paper's entry; ValueError (one line) for a planned or unknown paper."""
  if name in PAPERS:
    return PAPERS[name]
  if name in PLANNED:
    raise ValueError(f'--paper={name}: not built yet (planned; built: {", ".join(PAPERS)})')
  raise ValueError(f'--paper={name}: unknown; valid: {", ".join((*PAPERS, *PLANNED))}')

"""advdef: adversarial defenses (SAP, ANP-VS, JumpReLU, RSE) and their honest evaluation in JAX/Flax.

Importing the package has no side effects: it does not touch jax.config or devices.
"""

from advdef.version import __version__


def load_run(workdir):
  """Loads a finished or in-progress run for notebook use; see advdef.runs.load_run."""
  from advdef import runs  # Imported here so `import advdef` stays cheap.
  return runs.load_run(workdir)

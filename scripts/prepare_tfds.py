"""Prepares (downloads and writes) a TFDS data set in array_record format, once.

advdef reads TFDS data with `tfds.data_source`, which needs random-access array_record
files and no TensorFlow. Writing them the first time does need TensorFlow (TFDS's image
builders read the raw files with tf.io.gfile and encode images with TF) and network:

  pip install tensorflow-cpu
  python scripts/prepare_tfds.py --name=cifar10 --data_dir=$HOME/tensorflow_datasets

Afterwards set data.source='tfds', data.name=<name>, data.data_dir=<dir> (TensorFlow may
be uninstalled again; the directory can be copied to offline machines).
"""

import argparse
import importlib.util
import os
import sys

# Lets the script run from a checkout without installing advdef.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from advdef import data  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--name', required=True, choices=data.TFDS_NAMES)
  parser.add_argument('--data_dir', default='',
                      help="TFDS data directory ('' = TFDS's default, ~/tensorflow_datasets)")
  args = parser.parse_args(argv)

  # Check the preparation-only dependencies first, so a long download is not wasted.
  missing = [m for m in ('tensorflow', 'importlib_resources') if not importlib.util.find_spec(m)]
  if missing:
    packages = ['tensorflow-cpu' if m == 'tensorflow' else m for m in missing]
    print(f'Preparing a TFDS data set needs {missing}: pip install {" ".join(packages)}',
          file=sys.stderr)
    return 1

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(args.name, data_dir=args.data_dir or None, file_format='array_record')
  builder.download_and_prepare(file_format='array_record')

  # Read back the way advdef does, so a success message means advdef can load it.
  sources = tfds.data_source(args.name, split=['train', 'test'],
                             data_dir=args.data_dir or None, download=False,
                             builder_kwargs={'file_format': 'array_record'})
  sizes = ', '.join(f'{s}={len(src)}' for s, src in zip(('train', 'test'), sources))
  print(f'Prepared {args.name} in {builder.data_dir} ({sizes}). Use: data.source=tfds '
        f'data.name={args.name} data.data_dir={args.data_dir or "(default)"}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

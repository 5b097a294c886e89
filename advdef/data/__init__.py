"""Data sets and the device-resident input pipeline.

This package holds two things; every public name is re-exported here, so callers write
`from advdef import data as data_lib` and `data_lib.load_dataset(...)`.

1. Loading (advdef.data.sources; the TFDS reader and its error messages in
   advdef.data.tfds_source). `load_dataset(data_config)` returns `Splits`: uint8 NHWC
   train/test images, int32 labels and a `DatasetInfo` (class count, image shape,
   per-channel mean/std that the models use to normalize). The fields of the `data` config
   section and their defaults are those of `advdef.config_utils.base_config` (`DEFAULTS`).
   Sources (`data.source`):

   * 'digits': scikit-learn's bundled 8x8 handwritten digits (1,797 images, offline),
     with a fixed stratified 1,437 / 360 train/test split (test fraction 0.2, seed 0;
     `data.test_fraction` and `data.split_seed` do not change it).
   * 'npz': a local `.npz` file at `data.path`, either one pool (`images`, `labels`) split
     stratified by `data.test_fraction` / `data.split_seed`, or presplit
     (`train_images`, `train_labels`, `test_images`, `test_labels`).
   * 'tfds': a TFDS data set (`TFDS_NAMES`) read with `tfds.data_source` (array_record,
     random access; reading needs no TensorFlow, preparing it once does; see
     scripts/prepare_tfds.py).
   * 'fake': deterministic random images for tests of other modules (learnable: each
     class has its own prototype image).

   `data.num_train` / `data.num_test` (0 = all) then keep a deterministic, stratified
   subset (seeded by `data.split_seed`) of each split. The split and subset orderings use
   a small integer hash of (seed, index), not a library RNG, so they are identical on
   every machine and numpy version.

2. The input pipeline (advdef.data.pipeline), pure functions meant to run inside `jax.jit`
   with the whole data set resident on the device: `epoch_permutation`, `train_batch`
   (gather + augment), `augment`, `to_float`, `steps_per_epoch`, and `eval_batches`
   (fixed-shape, masked).

Images stay uint8 until a batch is formed; models receive float32 in [0, 1] and
normalize themselves with `DatasetInfo.mean` / `std`.
"""

from advdef.data.pipeline import augment
from advdef.data.pipeline import epoch_permutation
from advdef.data.pipeline import eval_batches
from advdef.data.pipeline import steps_per_epoch
from advdef.data.pipeline import to_float
from advdef.data.pipeline import train_batch
from advdef.data.sources import DEFAULTS
from advdef.data.sources import DIGITS_SPLIT_SEED
from advdef.data.sources import DIGITS_TEST_FRACTION
from advdef.data.sources import DatasetInfo
from advdef.data.sources import SOURCES
from advdef.data.sources import Splits
from advdef.data.sources import TFDS_NAMES
from advdef.data.sources import channel_stats
from advdef.data.sources import load_dataset
from advdef.data.sources import stratified_order
from advdef.data.sources import validate_data_config
from advdef.data.tfds_source import DataUnavailableError

__all__ = [
    'DEFAULTS', 'DIGITS_SPLIT_SEED', 'DIGITS_TEST_FRACTION', 'DataUnavailableError',
    'DatasetInfo', 'SOURCES', 'Splits', 'TFDS_NAMES', 'augment', 'channel_stats',
    'epoch_permutation', 'eval_batches', 'load_dataset', 'steps_per_epoch', 'stratified_order',
    'to_float', 'train_batch', 'validate_data_config',
]

"""A 2-D CNN ensemble on scikit-learn's digits (real 8x8 handwritten digits, embedded: no download).

  python experiments/train.py --config=experiments/configs/digits.py --workdir=/tmp/jaxdiff/digits

Two 3x3 conv layers of 32 channels with 2x max-pooling, flatten head; 16 members, 30 epochs on
the 1,438 / 359 split of data.seed=42 (`jaxdiff.data.sources.digits_source`).
Expected: test accuracy 98.4% +- 0.3% (mean +- std over the 16 members; 97.6% after 10 epochs);
4.6 min wall (2.1 min CPU) measured on a shared 2-core CPU, about 4.5 s per epoch and 35 s of
final scoring.
"""

import ml_collections

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.data.name = "digits"
  c.model = ml_collections.ConfigDict(dict(name="cnn", width=32, depth=2, kernel_size=3, stride=1,
                                           pool=True, head="flatten"))
  c.batch_size = 64
  c.num_epochs = 30
  return c

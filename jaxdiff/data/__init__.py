"""Datasets for jaxdiff: a registry of loaders (`DATASETS`, name -> loader with its kind) for
MNIST-1D and scikit-learn's digits (embedded), tfds image datasets, Hugging Face datasets and user
arrays/npz.

Also holds label noise (with the mask of flipped labels) and what each member sees inside the
jitted step: its epoch order, its training subset and the per-member CIFAR augmentation (random
crop with 4-pixel padding and horizontal flip).

  dataset.py    Dataset (and its fingerprint), DataError, validate_arrays, normalize
  sources.py    the loaders: one function per data source
  hf.py         the Hugging Face datasets loader (Dataset/DatasetDict in memory or save_to_disk)
  registry.py   DATASETS (name -> Source(loader, kinds, normalize)) and load_dataset
  noise.py      label noise
  batches.py    epoch_permutations, subset_masks, augment_images (in the step)
"""

from jaxdiff.data.batches import augment_images
from jaxdiff.data.batches import epoch_permutations
from jaxdiff.data.batches import subset_masks
from jaxdiff.data.dataset import DataError
from jaxdiff.data.dataset import Dataset
from jaxdiff.data.dataset import KINDS
from jaxdiff.data.dataset import normalize
from jaxdiff.data.dataset import validate_arrays
from jaxdiff.data.noise import add_label_noise
from jaxdiff.data.registry import DATASETS
from jaxdiff.data.registry import load_dataset
from jaxdiff.data.registry import Source
from jaxdiff.data.registry import source_of
from jaxdiff.data.sources import load_mnist1d
from jaxdiff.data.sources import load_tfds
from jaxdiff.data.sources import Loaded
from jaxdiff.data.sources import TFDS_DATASETS

__all__ = ["augment_images", "epoch_permutations", "subset_masks", "DataError", "Dataset",
           "KINDS", "normalize", "validate_arrays", "add_label_noise", "DATASETS",
           "load_dataset", "Source", "source_of", "load_mnist1d", "load_tfds", "Loaded",
           "TFDS_DATASETS"]

"""A tiny study for tests and quick trials: 3 small architectures x 6 runs, 3 epochs, 400 examples.

  python experiments/study.py --config=experiments/configs/study_tiny.py --workdir=/tmp/jaxdiff/tiny

Expected: about a minute on a 2-core CPU (mostly compilation); the numbers mean little. Six runs
is the fewest the fingerprint's out-of-fold calibration accepts (3 fit runs per architecture).
"""

import ml_collections

from experiments.configs import study


def get_config() -> ml_collections.ConfigDict:
  c = study.get_config()
  t = c.train
  t.data.num_samples = 500  # 400 / 100
  t.num_runs = 6
  t.num_epochs = 3
  t.batch_size = 50
  t.checkpoint_every = 0  # at the end only
  t.progress = False
  t.scores = ml_collections.ConfigDict(dict(chunk_size=0, grand=False, minibatch=False,
                                            vog=False, representation=False))
  # Dense models only: they compile in a fraction of a convolution's time on a CPU.
  c.archs = ml_collections.ConfigDict(dict(
      linear=dict(name="linear"),
      mlp=dict(name="mlp", width=32, depth=2),
      mlp_deep=dict(name="mlp", width=32, depth=4)))
  c.arch_order = ("linear", "mlp", "mlp_deep")
  c.analysis.num_draws = 5
  c.analysis.methods = ("pearson", "spearman")
  c.fingerprint.ks = (1, 10, 100)
  c.fingerprint.random_repeats = 2
  c.pruning.arch = "mlp"
  c.pruning.fractions = (0.5,)
  c.pruning.num_seeds = 6  # = num_runs: the full-data ensemble reuses the mlp compilation
  c.pruning.num_epochs = 3
  return c

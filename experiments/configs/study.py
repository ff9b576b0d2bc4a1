"""The study of Kwok et al. (arXiv 2401.01867) on MNIST-1D, sized for a 2-core CPU.

  python experiments/study.py --config=experiments/configs/study.py --workdir=/tmp/jaxdiff/study

Six architectures (MLP, CNN, wide CNN, deep CNN, ResNet-8 with and without skip connections) x
16 runs of 15 epochs on MNIST-1D (4,000 / 1,000), every difficulty score jaxdiff records except
VoG, then the analysis, the fingerprint, and the pruning experiment (CNN ensembles of 4 seeds
retrained on 16 pruned training sets). Rerunning the same command resumes.

Expected runtime: 9 minutes, measured on a quiet 2-core CPU on 2026-12-02 (training 7 min, of
which the two ResNets 3.4; analysis 0.3; fingerprint 0.3; pruning 1.4); 18 minutes measured
earlier on a shared CPU. The report of that run is results/study_mnist1d/report.md. Test accuracy:
MLP 64%, CNNs 88-91%, ResNets 94-96%.
"""

import ml_collections

from experiments.configs import default

RUNS = 16
EPOCHS = 15


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  t = default.get_config()  # MNIST-1D, Adam lr 1e-2, batch 100 (the MNIST-1D paper's setup)
  t.num_runs = RUNS
  t.num_epochs = EPOCHS
  t.checkpoint_every = 5
  # VoG needs input gradients of every example at every epoch: the most expensive score on a CPU.
  t.scores = ml_collections.ConfigDict(dict(chunk_size=0, grand=True, minibatch=True,
                                            vog=False, representation=True))
  c.train = t
  c.archs = ml_collections.ConfigDict(dict(
      mlp=dict(name="mlp", width=100, depth=2),
      cnn=dict(name="cnn", width=32, depth=3, kernel_size=5, stride=2, pool=False,
               head="flatten"),
      cnn_wide=dict(name="cnn", width=64, depth=3, kernel_size=5, stride=2, pool=False,
                    head="flatten"),
      cnn_deep=dict(name="cnn", width=32, depth=5, kernel_size=5, stride=2, pool=False,
                    head="flatten"),
      resnet=dict(name="resnet", depth=8, width=16, skip=True),
      resnet_noskip=dict(name="resnet", depth=8, width=16, skip=False)))
  c.arch_order = ("mlp", "cnn", "cnn_wide", "cnn_deep", "resnet", "resnet_noskip")
  c.compilation_cache = True  # <workdir>/jax_cache: same-shape pruned ensembles compile once
  c.analysis = ml_collections.ConfigDict(dict(
      scores=(),              # () = every usable recorded score
      primary_score="",       # "" = first of study.PRIMARY_PREFERENCE recorded (el2n, aum, ...)
      num_draws=20, kendall_draws=1, fractions=(0.1, 0.3, 0.5), alpha=0.05,
      num_permutations=0, methods=("pearson", "spearman", "kendall"), num_workers=2, seed=0))
  c.fingerprint = ml_collections.ConfigDict(dict(
      enabled=True, score="",  # "" = the primary score
      ks=(1, 3, 10, 30, 100, 300, 1000), methods=("pvalue", "random"), test="anova",
      alpha=0.05, fit_fraction=0.5, seed=0, random_repeats=5, fingerprint_k=10, holdout_k=10,
      fit_runs_k=10, cv_folds=5))
  c.pruning = ml_collections.ConfigDict(dict(
      enabled=True, arch="cnn", score="",  # "" = the primary score
      fractions=(0.1, 0.3, 0.5), methods=("single", "mean", "random"),
      keep=("hardest", "easiest"), single_run=0,
      num_seeds=4, num_epochs=EPOCHS, seed=1000,  # fresh seeds, not the scoring runs'
      # Pruned ensembles need test accuracy only: skip the costly scores.
      scores=dict(grand=False, minibatch=False, vog=False, representation=False)))
  return c

"""The paper's setting: CIFAR-10, ResNet-20, ResNet-32, a wide ResNet-20 and VGG-16, on a GPU/TPU.

  tfds build cifar10   # once, with TensorFlow installed (pip install -e '.[tfds-prepare]')
  python experiments/study.py --config=experiments/configs/study_cifar10.py \\
      --workdir=/data/jaxdiff/study_cifar10

Kwok et al. (arXiv 2401.01867) train CIFAR ResNets and VGG with SGD (lr 0.1, momentum 0.9, weight
decay 1e-4, batch 128, lr x0.1 at 50% and 75% of training) and crop+flip augmentation; so does this
config, for 160 epochs (He et al. 2016's schedule), 16 runs per architecture (the runs axis is
sharded over all visible devices: keep num_runs divisible by the device count).

Expected runtime (an estimate from FLOP counts, not measured here: this config cannot run on the
CPU it was written on): forward+backward per image ResNet-20 ~0.12 GFLOP, ResNet-32 ~0.2,
wide ResNet-20 (width 64, 16x ResNet-20) ~2, VGG-16 ~0.95; with the per-epoch scoring pass over the
50,000 training images, ~30 GPU-hours on one A100/H100-class GPU for the four ensembles, plus ~6 h
for the pruning ensembles (ResNet-20, 4 seeds x 16 training sets); about 8x less on 8 GPUs or a
TPU v4-16. `--config.train.num_runs=8 --config.train.num_epochs=80` quarters it.
"""

import ml_collections

from experiments.configs import study


def get_config() -> ml_collections.ConfigDict:
  c = study.get_config()
  t = c.train
  t.data = ml_collections.ConfigDict(dict(
      name="cifar10", data_dir="", num_train=0, label_noise=0.0, noise_seed=0))
  t.num_runs = 16
  t.num_epochs = 160
  t.batch_size = 128
  t.augment = True
  t.optim = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4, schedule="step",
      milestones=(0.5, 0.75), decay_factor=0.1, warmup_epochs=0, member_lr_scale=()))
  t.checkpoint_every = 5
  t.member_strategy = "auto"  # vmap on accelerators
  t.scores = ml_collections.ConfigDict(dict(chunk_size=0, grand=True, minibatch=True,
                                            vog="auto", representation=True))
  c.archs = ml_collections.ConfigDict(dict(
      resnet20=dict(name="resnet", depth=20, width=16, skip=True),
      resnet32=dict(name="resnet", depth=32, width=16, skip=True),
      resnet20_wide=dict(name="resnet", depth=20, width=64, skip=True),
      vgg16=dict(name="vgg", depth=16, width_mult=1.0, batch_norm=True)))
  c.arch_order = ("resnet20", "resnet32", "resnet20_wide", "vgg16")
  c.fingerprint.ks = (1, 3, 10, 30, 100, 300, 1000, 10000)
  c.pruning.arch = "resnet20"
  c.pruning.num_epochs = 160
  c.pruning.num_seeds = 4
  return c

"""Default config: an ensemble of MLPs on MNIST-1D.

  python experiments/train.py --config=experiments/configs/default.py --workdir=/tmp/jaxdiff/mlp

Expected: ~1 min on a 2-core CPU (46 s measured); test accuracy around the MNIST-1D paper's MLP
figure (68%).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                 # member i's keys are fold_in(key(seed), first_member + i)
  c.num_runs = 16
  c.first_member = 0
  c.arch_label = ""          # name used in reports ("" = derived from the model config)
  c.data = ml_collections.ConfigDict(dict(
      name="mnist1d", num_samples=5000, train_split=0.8, seed=42,  # 4,000 / 1,000
      data_dir="", path="", num_train=0, label_noise=0.0, noise_seed=0))
  c.model = ml_collections.ConfigDict(dict(name="mlp", width=100, depth=2))
  c.optim = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-2, momentum=0.9, nesterov=False, weight_decay=0.0,
      schedule="constant", milestones=(0.5, 0.75), decay_factor=0.1, warmup_epochs=0,
      member_lr_scale=()))   # optional per-member lr multipliers, one per member
  c.subset_fraction = 1.0    # <1: each member trains on its own random subset (C-scores);
                             # a tuple assigns fractions to members cyclically
  c.batch_size = 100
  c.num_epochs = 100
  c.augment = False          # CIFAR crop+flip, images only
  c.checkpoint_every = 10    # epochs
  c.member_strategy = "auto"  # auto | vmap | loop
  c.epoch_loop = "auto"      # auto | scan | python
  c.member_chunk = 0         # vmapped members run in chunks of this many per device, one chunk's
                             # epoch after another (0 = auto: 8 on CPU, all on accelerators)
  c.num_devices = 0          # shard the runs axis over this many devices (0 = all)
  c.cpu_devices = 0          # CPU only: split it into this many JAX devices at startup
                             # (0 = one per core, 1 = no split; ensemble.split_cpu)
  c.progress = True
  c.scores = ml_collections.ConfigDict(dict(
      chunk_size=0, grand=True, grand_method="ghost", minibatch=True,
      vog=ml_collections.FieldReference("auto", field_type=object),  # True | False | "auto"
      representation=True, knn_k=30, num_prototypes=0, snapshot_epochs=(), save_history=False))
  return c

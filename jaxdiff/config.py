"""The one table of jaxdiff's training-config defaults, and the check of a config against it.

`defaults()` is what `experiments/configs/default.py` returns; the optimiser
(`ensemble.make_optimizer`), the recorder (`recording.DEFAULTS`) and the training loop read their
defaults from here, and `check_fields` refuses a field that the table does not know.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

import ml_collections

# Sections whose fields depend on a choice (the architecture, the dataset): not checked here
# (models.build_model and data.load_dataset check them).
OPEN_SECTIONS = ("model", "data")

OPTIM = dict(name="adam", lr=1e-2, momentum=0.9, nesterov=False, weight_decay=0.0,
             schedule="constant", milestones=(0.5, 0.75), decay_factor=0.1, warmup_epochs=0,
             member_lr_scale=())  # optional per-member lr multipliers, one per member

SCORES = dict(
    chunk_size=0,            # examples per jitted scoring call (0 = auto, point.auto_chunk_size)
    grand=True,              # GraNd at the end of training (and at snapshot_epochs)
    grand_method="ghost",    # exact per-example norms; "vmap" is the reference
    minibatch=True,          # forgetting / learning time over the members' own minibatches
    vog="auto",              # VoG input-gradient variance: True | False | "auto" (if < 2 GB)
    representation=True,     # prediction depth (k-NN probes) and prototypes at the end
    knn_k=30,
    knn_reference=0,         # prediction depth's probes on this many training examples sampled
                             # per member (approximate, faster; 0 = all, exact)
    num_prototypes=0,        # k-means clusters for proto_selfsup (0 = number of classes)
    snapshot_epochs=(),      # extra el2n/grand/loss snapshots "<name>_e<epoch>" (Paul et al.)
    save_history=False,      # per-epoch logits in <workdir>/history/epoch_XXXX.npz
)


def defaults() -> ml_collections.ConfigDict:
  """The default config: 16 MLPs (40-100-100-10) on MNIST-1D, Adam 1e-2, 100 epochs."""
  c = ml_collections.ConfigDict()
  c.seed = 0                 # member i's keys are fold_in(key(seed), first_member + i)
  c.num_runs = 16
  c.first_member = 0
  c.arch_label = ""          # name used in reports ("" = derived from the model config)
  c.data = ml_collections.ConfigDict(dict(
      name="mnist1d", num_samples=5000, train_split=0.8, seed=42,  # 4,000 / 1,000
      data_dir="", path="", num_train=0, label_noise=0.0, noise_seed=0,
      kind="",               # npz/arrays: "signal" [N, L] or "image" [N, H, W, C] ("" = by rank)
      # hf (Hugging Face datasets, data/hf.py): the input and label columns, the splits of a
      # DatasetDict (hf_test_split="" = evaluate on the training split)
      hf_image_column="image", hf_label_column="label", hf_train_split="train",
      hf_test_split="test",
      # Standardise inputs with training-set statistics: None = the dataset's own default.
      normalize=ml_collections.FieldReference(None, field_type=object)))
  c.model = ml_collections.ConfigDict(dict(name="mlp", width=100, depth=2))
  c.optim = ml_collections.ConfigDict(dict(OPTIM))
  c.subset_fraction = 1.0    # <1: each member trains on its own random subset (C-scores);
                             # a tuple assigns fractions to members cyclically
  c.batch_size = 100
  c.num_epochs = 100
  c.augment = False          # CIFAR crop+flip, images only
  c.checkpoint_every = 10    # epochs
  c.member_strategy = "auto"  # auto | vmap | loop
  c.epoch_loop = "auto"      # auto | scan | python
  c.member_chunk = 0         # vmapped members run in chunks of exactly this many (the last padded),
                             # so member i equals a 1-member run (0 = auto: 8 on CPU, all of a
                             # device's members on accelerators)
  c.memory_budget_bytes = 0  # member_chunk=0: chunks sized to fit this many bytes per device from
                             # XLA's memory analysis (0 = the device's free memory on accelerators)
  c.num_devices = 0          # shard the runs axis over this many devices (0 = all)
  c.cpu_devices = 0          # CPU only: split it into this many JAX devices at startup
                             # (0 = one per core, 1 = no split; ensemble.split_cpu)
  c.progress = True
  scores = dict(SCORES)
  scores["vog"] = ml_collections.FieldReference("auto", field_type=object)  # True|False|"auto"
  c.scores = ml_collections.ConfigDict(scores)
  return c


def unknown_fields(config: Mapping[str, Any]) -> list[str]:
  """Messages for the fields of `config` that the defaults table does not know (open sections
  aside), each with the closest valid names; [] if none."""
  table = defaults()
  out = []

  def walk(node, ref, prefix):
    valid = sorted(ref.keys())
    for key in node.keys():
      path = f"{prefix}{key}"
      if key not in ref:
        close = difflib.get_close_matches(key, valid, n=3)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        section = prefix[:-1] or "config"
        out.append(f"unknown {section} option(s) {[key]}{hint}; valid: {valid}")
      elif _is_section(ref[key]) and _is_section(node[key]) and path not in OPEN_SECTIONS:
        walk(node[key], ref[key], path + ".")
  walk(config, table, "")
  return out


def _is_section(value) -> bool:
  return isinstance(value, (Mapping, ml_collections.ConfigDict))

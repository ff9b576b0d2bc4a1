"""Input gradients of the label's probability (or logit), the ingredient of VoG.

`input_grad_py` returns d target / d x for every member and example, in jitted chunks.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.scores import point

TARGETS = ("p_y", "logit")


def input_grad_py(apply_fn: point.ApplyFn, variables: Any, x: Any, y: Any, chunk_size: int = 1024,
                  target: str = "p_y") -> np.ndarray:
  """Gradient of the label's softmax probability w.r.t. the input, per member and example.

  VoG (Agarwal, D'souza & Hooker 2022, "Estimating Example Difficulty using Variance of Gradients")
  is the variance of this gradient across checkpoints (see `trajectory.VoGAccumulator`). The
  authors' toy code differentiates the softmax probability p_y (`target="p_y"`, the default); the
  paper's text and ImageNet code differentiate the pre-softmax logit z_y (`target="logit"`).

  Examples do not interact in evaluation mode, so one backward pass of sum_i target_i over a chunk
  gives every per-example gradient.

  Args:
    apply_fn: `(member_variables, x [B, ...]) -> (logits [B, C], out)` in evaluation mode.
    variables: stacked variables, every leaf `[R, ...]`.
    x: float inputs `[N, ...]`.
    y: int labels `[N]`.
    chunk_size: examples per jitted call.
    target: "p_y" (softmax probability of the label) or "logit" (its logit).

  Returns:
    float32 `[R, N, *x.shape[1:]]`.
  """
  return _run(apply_fn, variables, x, y, chunk_size, target, False)


def point_scores_and_input_grad(apply_fn: point.ApplyFn, variables: Any, x: Any, y: Any,
                                chunk_size: int = 1024, target: str = "p_y"
                                ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """`compute_point_scores(..., return_logits=True)` and `input_grad_py` from one forward pass.

  The per-epoch recording needs both; sharing the forward pass saves one forward over the
  training set per epoch.

  Returns:
    (point scores `{name: float32 [R, N]}`, logits float32 `[R, N, C]`, input gradients float32
    `[R, N, *x.shape[1:]]`), equal to the two separate functions' results.

  Args: as `input_grad_py`.
  """
  return _run(apply_fn, variables, x, y, chunk_size, target, True)


def _run(apply_fn, variables, x, y, chunk_size, target, with_scores):
  if target not in TARGETS:
    raise ValueError(f"unknown input-gradient target {target!r}; valid targets: {list(TARGETS)}")
  x, y = point.check_examples(x, y)
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"input gradients need float inputs; x has dtype {x.dtype}")
  point.num_members(variables)
  point.check_labels_vs_classes(apply_fn, variables, x, y)
  kernel = lambda v, xc, yc: _chunk(apply_fn, v, xc, yc, target, with_scores)
  return point.run_chunked(kernel, variables, [x.astype(np.float32), y.astype(np.int32)],
                           chunk_size)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _chunk(apply_fn, variables, x, y, target, with_scores=False):
  def member(v):
    def total(xx):
      logits, _ = apply_fn(v, xx)
      logits = logits.astype(jnp.float32)
      t = jax.nn.softmax(logits, axis=-1) if target == "p_y" else logits
      return jnp.sum(jnp.take_along_axis(t, y[:, None], axis=-1)), logits
    grad, logits = jax.grad(total, has_aux=True)(x)
    return (point.point_scores(logits, y), logits, grad) if with_scores else grad
  return jax.vmap(member)(variables)

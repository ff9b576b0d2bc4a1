"""Training-trajectory scores accumulated online: O(R*N) state, no history kept.

`EpochAccumulator` (point scores at recorded evaluations), `MinibatchForgetting` (correctness of
each example as its member saw it in a training minibatch) and `VoGAccumulator` (input gradients).
"""

from __future__ import annotations

import functools

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Point scores `EpochAccumulator.update` needs.
EPOCH_INPUTS = ("loss", "p_y", "correct", "margin_logit", "margin_prob")


def _check_step(state: Mapping[str, Any], step: int) -> int:
  if not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"step must be a non-negative int, got {step!r}")
  if int(state["count"]) > 0 and step <= int(state["last_step"]):
    raise ValueError(f"steps must increase strictly: got step {step} after "
                     f"{int(state['last_step'])}")
  return int(step)


def _times(first: np.ndarray, never: np.ndarray, last_step: int) -> tuple[np.ndarray, np.ndarray]:
  """Step times with never-events as `last_step + 1` and as +inf."""
  first = first.astype(np.float64)
  return (np.where(never, last_step + 1, first).astype(np.float32),
          np.where(never, np.inf, first).astype(np.float32))


class EpochAccumulator:
  """Online trajectory scores over recorded evaluations (e.g. the end of every epoch).

  Usage::

    state = EpochAccumulator.init(R, N)
    for epoch ...:
      state = EpochAccumulator.update(state, point_scores_RN, step=epoch)
    scores = EpochAccumulator.finalize(state)

  The state is a dict of numpy arrays (`np.savez`-able for checkpoints); `update` does O(R*N) work
  and keeps no history. Steps are whatever the caller records (epoch numbers, global steps), and
  must increase strictly. With T recorded steps s_1 < ... < s_T and per-step values v_t:

    mean_loss:      (1/T) sum_t loss_t.
    mean_p_y:       cartography confidence (1/T) sum_t p_y,t (Swayamdipta et al. 2020, "Dataset
                    Cartography").
    variability:    cartography variability sqrt((1/T) sum_t (p_y,t - mean_p_y)^2): the population
                    std (ddof=0) as in the paper's formula and its code (`np.std`); Welford update.
    mean_correct:   (1/T) sum_t correct_t (cartography "correctness").
    aum:            (1/T) sum_t margin_logit_t, the area under the margin (Pleiss et al. 2020); the
                    paper averages margins of minibatch passes, here of the recorded evaluations.
    aum_prob:       the same on probabilities, (1/T) sum_t margin_prob_t.
    forgetting_events:     number of t with correct_{t-1} = 1 and correct_t = 0 (Toneva et al. 2019,
                    "An Empirical Study of Example Forgetting"); the first record has no
                    predecessor. Never-learned examples (never correct at a recorded step) get
                    T // 2 + 1: a learned example is forgotten at most T // 2 times (each event
                    needs a correct record before it, and the first record cannot be one), so
                    never-learned examples rank as the hardest, as in Toneva et al.'s sorting,
                    with a finite value that the statistics can use. The value depends on T
                    alone, the same for every member, so a member's scores do not depend on the
                    other members (member identity, merging blocks of runs, resuming).
    forgetting_events_inf: as above but +inf for never-learned examples, Toneva et al.'s convention
                    when sorting (never-learned examples count as forgotten infinitely often);
                    left out by the analysis, which needs finite values.
    never_learned:  1.0 if never correct at a recorded step, else 0.0.
    learning_time:  first recorded step at which correct; never learned -> s_T + 1.
    learning_time_inf:     as above, never learned -> +inf.
    consistent_learning_time: first recorded step s_t such that the example is correct at s_t and at
                    every later recorded step; not correct at s_T -> s_T + 1.
    consistent_learning_time_inf: as above, never consistently learned -> +inf.
    unforgettable:  1.0 if learned (ever correct) and never forgotten (0 forgetting events), the
                    unforgettable examples of Toneva et al.; else 0.0.

  All outputs are float32 `[R, N]`, in their natural orientation (see `jaxdiff.scores.orient`).
  """

  @staticmethod
  def init(num_runs: int, num_examples: int) -> dict[str, np.ndarray]:
    """Empty state for `num_runs` members and `num_examples` examples."""
    if num_runs < 1 or num_examples < 1:
      raise ValueError(f"need num_runs >= 1 and num_examples >= 1, got {num_runs}, {num_examples}")
    shape = (int(num_runs), int(num_examples))
    zeros = lambda dtype: np.zeros(shape, dtype)
    return {
        "count": np.array(0, np.int64), "last_step": np.array(-1, np.int64),
        "sum_loss": zeros(np.float64), "sum_correct": zeros(np.float64),
        "sum_margin_logit": zeros(np.float64), "sum_margin_prob": zeros(np.float64),
        "mean_p_y": zeros(np.float64), "m2_p_y": zeros(np.float64),
        "prev_correct": zeros(bool), "forgetting": zeros(np.int32),
        "first_correct": np.full(shape, -1, np.int64),
        # Start step of the current run of correct records; -1 while incorrect.
        "streak_start": np.full(shape, -1, np.int64),
    }

  @staticmethod
  def update(state: dict[str, np.ndarray], point: Mapping[str, Any],
             step: int) -> dict[str, np.ndarray]:
    """Adds one recorded evaluation.

    Args:
      state: from `init` or a previous `update` (updated in place and returned).
      point: at least `EPOCH_INPUTS` -> `[R, N]` (numpy or jax), e.g. `compute_point_scores(...)`.
      step: recorded step (epoch or global step), > every previous one.

    Returns:
      The updated state.
    """
    missing = [k for k in EPOCH_INPUTS if k not in point]
    if missing:
      raise ValueError(f"point scores lack {missing}; EpochAccumulator needs {list(EPOCH_INPUTS)}")
    shape = state["prev_correct"].shape
    vals = {k: np.asarray(point[k], np.float64) for k in EPOCH_INPUTS}
    for k, v in vals.items():
      if v.shape != shape:
        raise ValueError(f"point score {k!r} has shape {v.shape}, expected [R, N] = {shape}")
    step = _check_step(state, step)
    state["count"] = np.array(int(state["count"]) + 1, np.int64)
    n = float(state["count"])
    state["sum_loss"] += vals["loss"]
    state["sum_correct"] += vals["correct"]
    state["sum_margin_logit"] += vals["margin_logit"]
    state["sum_margin_prob"] += vals["margin_prob"]
    delta = vals["p_y"] - state["mean_p_y"]
    state["mean_p_y"] += delta / n
    state["m2_p_y"] += delta * (vals["p_y"] - state["mean_p_y"])
    correct = vals["correct"] > 0.5
    prev = state["prev_correct"]  # all False before the first record: no event, new streaks
    state["forgetting"] += (prev & ~correct).astype(np.int32)
    state["first_correct"] = np.where(correct & (state["first_correct"] < 0), step,
                                      state["first_correct"])
    state["streak_start"] = np.where(correct, np.where(prev, state["streak_start"], step), -1)
    state["prev_correct"] = correct
    state["last_step"] = np.array(step, np.int64)
    return state

  @staticmethod
  def finalize(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Returns every trajectory score (see the class docstring) as float32 `[R, N]`."""
    n = int(state["count"])
    if n == 0:
      raise ValueError("EpochAccumulator.finalize: no step was recorded (call update first)")
    last = int(state["last_step"])
    never = state["first_correct"] < 0
    forgetting = state["forgetting"].astype(np.float32)
    learning_time, learning_time_inf = _times(state["first_correct"], never, last)
    unstable = state["streak_start"] < 0
    consistent, consistent_inf = _times(state["streak_start"], unstable, last)
    f32 = lambda a: np.asarray(a, np.float32)
    never_value = n // 2 + 1  # above any count a learned example can reach in n records
    return {
        "mean_loss": f32(state["sum_loss"] / n),
        "mean_p_y": f32(state["mean_p_y"]),
        "variability": f32(np.sqrt(np.maximum(state["m2_p_y"], 0.0) / n)),
        "mean_correct": f32(state["sum_correct"] / n),
        "aum": f32(state["sum_margin_logit"] / n),
        "aum_prob": f32(state["sum_margin_prob"] / n),
        "forgetting_events": np.where(never, never_value, forgetting).astype(np.float32),
        "forgetting_events_inf": np.where(never, np.inf, forgetting).astype(np.float32),
        "never_learned": f32(never),
        "learning_time": learning_time,
        "learning_time_inf": learning_time_inf,
        "consistent_learning_time": consistent,
        "consistent_learning_time_inf": consistent_inf,
        "unforgettable": f32(~never & (state["forgetting"] == 0)),
    }


def _minibatch_update_fn(state, idx, correct, step):
  def member(prev, forgetting, first, streak, presentations, ids, c):
    c = c.astype(bool)
    p = prev[ids]
    forgetting = forgetting.at[ids].add(((p == 1) & ~c).astype(forgetting.dtype))
    f = first[ids]
    first = first.at[ids].set(jnp.where(c & (f < 0), step, f))
    streak = streak.at[ids].set(jnp.where(c, jnp.where(p == 1, streak[ids], step), -1))
    prev = prev.at[ids].set(c.astype(prev.dtype))
    presentations = presentations.at[ids].add(1)
    return prev, forgetting, first, streak, presentations

  keys = ("prev", "forgetting", "first_correct", "streak_start", "presentations")
  out = jax.vmap(member)(*(state[k] for k in keys), idx, correct)
  new = dict(zip(keys, out))
  new["last_step"] = jnp.maximum(state["last_step"], step)
  return new


_minibatch_update = jax.jit(_minibatch_update_fn, donate_argnums=(0,))


@functools.partial(jax.jit, donate_argnums=(0,))
def _minibatch_update_steps(state, idx, correct, step0):
  def body(st, inp):
    s, ids, c = inp
    return _minibatch_update_fn(st, ids, c, step0 + s), None
  steps = jnp.arange(idx.shape[1], dtype=jnp.int32)
  return jax.lax.scan(body, state, (steps, jnp.swapaxes(idx, 0, 1),
                                    jnp.swapaxes(correct, 0, 1)))[0]


def _check_ids(state, idx, correct, dims: str):
  """(idx int32, correct) on device after checking they are both `[R, *dims]`."""
  r = state["prev"].shape[0]
  ndim = 1 + len(dims.split(","))
  if np.ndim(idx) != ndim or np.shape(idx) != np.shape(correct) or np.shape(idx)[0] != r:
    raise ValueError(f"idx and correct must both be [R={r}, {dims}]; got {np.shape(idx)} and "
                     f"{np.shape(correct)}")
  return jnp.asarray(idx, jnp.int32), jnp.asarray(correct)


class MinibatchForgetting:
  """Forgetting and learning times at minibatch resolution (Toneva et al. 2019's own protocol).

  Each training step, every member reports the ids of the examples in its minibatch and whether it
  classified each correctly (in the forward pass of that step, as Toneva et al. record it). A
  forgetting event is a presentation at which the example is misclassified after being correctly
  classified at its previous presentation to the same member. State lives on device (jnp `[R, N]`);
  `update` is one jitted scatter (vmapped over members) with the state donated, so write
  `state = MinibatchForgetting.update(state, ...)` and do not reuse the old state. It is also pure
  jnp, so `MinibatchForgetting.update_fn` can be called inside the caller's own jitted step.

  Requirements: ids in [0, N); within one step an id appears at most once per member (scatter order
  of duplicates is unspecified); steps increase.

  `finalize` gives, as float32 `[R, N]` (the same definitions as `EpochAccumulator` with
  "presentations" in place of "recorded steps"; times are the caller's step numbers):
    mb_forgetting_events (never learned -> P_r // 2 + 1, P_r the most presentations of any example
    to member r: above any count of that member's learned examples, so never-learned examples rank
    hardest; it depends on member r's own minibatches only, so a member's scores do not depend on
    the other members), mb_forgetting_events_inf (never learned -> +inf), mb_never_learned,
    mb_learning_time (never -> last step + 1), mb_learning_time_inf,
    mb_consistent_learning_time (correct at this and every later presentation; else last step + 1),
    mb_consistent_learning_time_inf, mb_unforgettable, mb_presentations (how often it was seen;
    a never-presented example counts as never learned).
  """

  update_fn = staticmethod(_minibatch_update_fn)

  @staticmethod
  def init(num_runs: int, num_examples: int) -> dict[str, jax.Array]:
    if num_runs < 1 or num_examples < 1:
      raise ValueError(f"need num_runs >= 1 and num_examples >= 1, got {num_runs}, {num_examples}")
    shape = (int(num_runs), int(num_examples))
    return {
        "prev": jnp.full(shape, -1, jnp.int8),  # -1 never presented, 0 wrong, 1 right last time
        "forgetting": jnp.zeros(shape, jnp.int32),
        "first_correct": jnp.full(shape, -1, jnp.int32),
        "streak_start": jnp.full(shape, -1, jnp.int32),
        "presentations": jnp.zeros(shape, jnp.int32),
        "last_step": jnp.array(-1, jnp.int32),
    }

  @staticmethod
  def update(state: dict[str, jax.Array], idx: Any, correct: Any,
             step: Any) -> dict[str, jax.Array]:
    """Records one training step.

    Args:
      state: from `init` or the previous `update` (donated).
      idx: int `[R, B]`, the example ids each member saw at this step.
      correct: `[R, B]` bool or 0/1, whether each was classified correctly.
      step: int (Python or traced) training step, >= 0 and increasing.

    Returns:
      The new state.
    """
    return _minibatch_update(state, *_check_ids(state, idx, correct, "B"),
                             jnp.asarray(step, jnp.int32))

  @staticmethod
  def update_steps(state: dict[str, jax.Array], idx: Any, correct: Any,
                   step0: int) -> dict[str, jax.Array]:
    """Records S consecutive steps in one jitted scan (an epoch: one call, not S).

    Args:
      state: from `init` or the previous update (donated).
      idx: int `[R, S, B]`, the example ids each member saw at steps step0 .. step0 + S - 1.
      correct: `[R, S, B]` bool or 0/1.
      step0: int, the first step's number.

    Returns:
      The new state, equal to S calls of `update`.
    """
    return _minibatch_update_steps(state, *_check_ids(state, idx, correct, "S, B"),
                                   jnp.asarray(step0, jnp.int32))

  @staticmethod
  def finalize(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    s = {k: np.asarray(v) for k, v in state.items()}
    last = int(s["last_step"])
    never = s["first_correct"] < 0
    forgetting = s["forgetting"].astype(np.float32)
    learning_time, learning_time_inf = _times(s["first_correct"], never, last)
    unstable = s["streak_start"] < 0
    consistent, consistent_inf = _times(s["streak_start"], unstable, last)
    never_value = s["presentations"].max(axis=1, keepdims=True) // 2 + 1  # [R, 1], per member
    return {
        "mb_forgetting_events": np.where(never, never_value, forgetting).astype(np.float32),
        "mb_forgetting_events_inf": np.where(never, np.inf, forgetting).astype(np.float32),
        "mb_never_learned": never.astype(np.float32),
        "mb_learning_time": learning_time,
        "mb_learning_time_inf": learning_time_inf,
        "mb_consistent_learning_time": consistent,
        "mb_consistent_learning_time_inf": consistent_inf,
        "mb_unforgettable": (~never & (s["forgetting"] == 0)).astype(np.float32),
        "mb_presentations": s["presentations"].astype(np.float32),
    }


class VoGAccumulator:
  """Variance of input gradients across checkpoints (VoG; Agarwal, D'souza & Hooker 2022).

  With S_t = d p_y / d x (see `input_grad.input_grad_py`) at K checkpoints, per example:
    mu = (1/K) sum_t S_t,  VoG_p = sqrt((1/K) sum_t (S_t - mu)_p^2) per input pixel p,
    vog_raw = mean_p VoG_p,
    vog = (vog_raw - mean_class) / std_class, with the mean and (population) std of vog_raw over the
          examples of the same (training) label, per member, as in the paper and the authors' code.
  The pixel std uses 1/K (the authors' code) and is accumulated online (Welford; state
  `[R, N, *x.shape[1:]]` float64 mean and M2, i.e. 16 bytes per input value per member).
  Departures: a class whose vog_raw has zero std gets vog = 0 (the paper divides by zero).
  For colour images the authors' ImageNet code first averages gradients over channels; pass
  `channel_mean=True` to `update` (channels last) to do the same.
  """

  @staticmethod
  def init(num_runs: int, num_examples: int) -> dict[str, np.ndarray]:
    """Empty state; the gradient shape is taken from the first update."""
    if num_runs < 1 or num_examples < 1:
      raise ValueError(f"need num_runs >= 1 and num_examples >= 1, got {num_runs}, {num_examples}")
    empty = np.zeros((int(num_runs), int(num_examples), 0))
    return {"count": np.array(0, np.int64), "mean": empty, "m2": empty.copy()}

  @staticmethod
  def update(state: dict[str, np.ndarray], grads: Any, channel_mean: bool = False) -> dict:
    """Adds the input gradients `[R, N, ...]` of one checkpoint (state updated in place)."""
    g = np.asarray(grads, np.float64)
    if channel_mean:
      g = g.mean(axis=-1)
    g = g.reshape(g.shape[:2] + (-1,)) if g.ndim > 2 else g[..., None]
    if int(state["count"]) == 0:
      if g.shape[:2] != state["mean"].shape[:2]:
        raise ValueError(f"gradients have shape {np.shape(grads)}; expected [R, N, ...] with "
                         f"R, N = {state['mean'].shape[:2]}")
      state["mean"] = np.zeros_like(g)
      state["m2"] = np.zeros_like(g)
    elif g.shape != state["mean"].shape:
      raise ValueError(f"gradients flatten to {g.shape} but earlier checkpoints gave "
                       f"{state['mean'].shape} (same input shape and channel_mean every time)")
    state["count"] = np.array(int(state["count"]) + 1, np.int64)
    delta = g - state["mean"]
    state["mean"] += delta / float(state["count"])
    state["m2"] += delta * (g - state["mean"])
    return state

  @staticmethod
  def finalize(state: Mapping[str, np.ndarray], labels: Any) -> dict[str, np.ndarray]:
    """Returns {"vog": class-normalised, "vog_raw": unnormalised}, float32 `[R, N]`.

    Args:
      state: accumulated over at least one checkpoint (K = 1 gives zero variance).
      labels: int `[N]` training labels (class normalisation groups).
    """
    k = int(state["count"])
    if k == 0:
      raise ValueError("VoGAccumulator.finalize: no checkpoint was added (call update first)")
    raw = np.sqrt(np.maximum(state["m2"], 0.0) / k).mean(axis=-1)  # [R, N]
    labels = np.asarray(labels)
    if labels.shape != raw.shape[1:]:
      raise ValueError(f"labels have shape {labels.shape}, expected ({raw.shape[1]},)")
    centred, std = _class_centre(raw, labels)
    vog = np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)
    return {"vog": vog.astype(np.float32), "vog_raw": raw.astype(np.float32)}


def _class_centre(values: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per member, `values [R, N]` minus their class mean, and the class (population) std `[R, N]`."""
  r = values.shape[0]
  _, inverse = np.unique(labels, return_inverse=True)
  num = int(inverse.max()) + 1
  groups = (inverse[None, :] + num * np.arange(r)[:, None]).ravel()  # (member, class) bins
  counts = np.bincount(inverse, minlength=num)[None, :]
  per_class = lambda w: np.bincount(groups, weights=w.ravel(), minlength=r * num).reshape(r, num)
  centred = values - (per_class(values) / counts)[:, inverse]
  std = np.sqrt(per_class(centred**2) / counts)[:, inverse]
  return centred, std

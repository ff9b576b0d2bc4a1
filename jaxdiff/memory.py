"""Member chunks sized from memory: what XLA plans for a compiled chunk program against what a
device has free.

  free_bytes(devices)                  the least free memory of `devices` (None where unreported)
  program_need(compiled, resident)     bytes one run of a compiled program adds to the device
  chunk_for_budget(fixed, per_member, budget, num_members)   members per chunk that fit
  chunk_from_programs(lower, num_members, budget)            the same, measured from XLA's plans

The engine (`ensemble.Engine.chunk_size`) uses these on accelerators with `member_chunk=0`: a
chunk program's memory is affine in its members (each member's state, gradients and activations,
plus the shared training set and code), so two small compiles (1 and 2 members) give its
fixed and per-member bytes, and the chunk is the most members whose program fits the budget.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax

# Fraction of the budget a chunk's program may plan for: XLA:GPU's allocator fragments, and
# libraries (cuDNN, cuBLAS) take workspaces outside the compiled plan.
SAFETY = 0.8


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
  """How a device's members were chunked from memory (logged by the engine, kept for tests).

  Attributes:
    chunk: members per chunk.
    fixed_bytes: bytes of the chunk program that do not grow with its members.
    per_member_bytes: bytes each member of a chunk adds to its program.
    held_per_member_bytes: output bytes per member, held until the device's chunks are joined.
    budget_bytes: the budget the chunk was sized against (before `SAFETY`).
  """
  chunk: int
  fixed_bytes: int
  per_member_bytes: int
  held_per_member_bytes: int
  budget_bytes: int


def free_bytes(devices: Sequence[Any]) -> int | None:
  """The least free memory (`bytes_limit - bytes_in_use`) over `devices`; None if any of them
  does not report it (XLA:CPU's `memory_stats()` is None)."""
  free = []
  for d in devices:
    stats = d.memory_stats() or {}
    if "bytes_limit" not in stats or "bytes_in_use" not in stats:
      return None
    free.append(int(stats["bytes_limit"]) - int(stats["bytes_in_use"]))
  return min(free) if free else None


def program_need(compiled: Any, resident_bytes: int = 0) -> tuple[int, int]:
  """Bytes a run of `compiled` adds to a device, and its output bytes.

  `Compiled.memory_analysis()`: arguments + outputs - the donated arguments reused as outputs +
  temporaries + generated code, less `resident_bytes` of arguments that already live on the
  device (the training set, passed to every chunk).

  Returns:
    `(need, output)` in bytes.
  """
  m = compiled.memory_analysis()
  need = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes + m.generated_code_size_in_bytes - resident_bytes)
  return int(need), int(m.output_size_in_bytes)


def chunk_for_budget(fixed_bytes: int, per_member_bytes: int, budget_bytes: int,
                     num_members: int, held_per_member_bytes: int = 0, max_chunk: int = 0,
                     safety: float = SAFETY) -> int:
  """Members per chunk: the most whose program fits `safety * budget_bytes`, then evened out.

  A device's `num_members` members run in `k = ceil(num_members / c)` chunks of the same size;
  the chunk is then `ceil(num_members / k)`, so the last chunk's padding is as small as it can be
  (64 members that fit 40 at a time run as 2 chunks of 32, not 40 + a padded 24).

  Args:
    fixed_bytes: bytes of the chunk program that do not depend on its members.
    per_member_bytes: bytes each member adds (> 0).
    budget_bytes: bytes the device has for the program (> 0).
    num_members: the device's members (> 0).
    held_per_member_bytes: bytes per member held across chunks (each chunk's outputs until they
      are joined, and the joined block): `2 * num_members` of them are reserved first.
    max_chunk: at most this many (0 = `num_members`).
    safety: fraction of the budget to plan for.
  Returns:
    the chunk size, in `[1, min(num_members, max_chunk)]`; 1 if even one member does not fit
    (logged: the run may then run out of memory).
  """
  if budget_bytes <= 0 or per_member_bytes <= 0 or num_members <= 0:
    raise ValueError(f"chunk_for_budget: budget_bytes={budget_bytes}, per_member_bytes="
                     f"{per_member_bytes}, num_members={num_members}: each must be positive")
  cap = min(num_members, max_chunk) if max_chunk else num_members
  usable = safety * budget_bytes - fixed_bytes - 2 * num_members * held_per_member_bytes
  fit = int(usable // per_member_bytes)
  if fit < 1:
    logging.warning("one member's chunk needs %.1f MiB (+ %.1f MiB held), more than %.0f%% of "
                    "the %.1f MiB budget: running 1 member per chunk", (fixed_bytes
                    + per_member_bytes) / 2**20, 2 * num_members * held_per_member_bytes / 2**20,
                    100 * safety, budget_bytes / 2**20)
    return 1
  c = min(fit, cap)
  k = -(-num_members // c)
  return -(-num_members // k)


def chunk_from_programs(lower: Callable[[int], tuple[Any, int]], num_members: int,
                        budget_bytes: int, max_chunk: int = 0, safety: float = SAFETY
                        ) -> ChunkPlan:
  """The chunk size from XLA's plans of the chunk program at 1 and 2 members.

  Args:
    lower: `chunk -> (compiled program for `chunk` members, resident argument bytes)`.
    num_members: the device's members.
    budget_bytes: bytes the device has free.
    max_chunk, safety: as in `chunk_for_budget`.
  Returns:
    the ChunkPlan.
  """
  if num_members == 1:
    need, out = program_need(*lower(1))
    return ChunkPlan(1, need, 0, out, budget_bytes)
  (n1, o1), (n2, o2) = (program_need(*lower(c)) for c in (1, 2))
  per, held = max(n2 - n1, 1), max(o2 - o1, 0)
  fixed = max(n1 - per, 0)
  chunk = chunk_for_budget(fixed, per, budget_bytes, num_members, held, max_chunk, safety)
  return ChunkPlan(chunk, fixed, per, held, budget_bytes)


def shape_chunk(args: Sequence[Any], chunked: Sequence[bool], chunk: int) -> tuple:
  """`args` as `jax.ShapeDtypeStruct`s, the leading axis of the `chunked` ones set to `chunk`
  (the arguments of a chunk program, for `jit(f).lower`, without allocating them)."""
  def spec(a, lead):
    a = jax.numpy.asarray(a) if not hasattr(a, "shape") else a
    shape = ((chunk,) + tuple(a.shape[1:])) if lead else tuple(a.shape)
    return jax.ShapeDtypeStruct(shape, a.dtype)
  return tuple(jax.tree_util.tree_map(lambda a, lead=lead: spec(a, lead), arg)
               for arg, lead in zip(args, chunked))


def tree_bytes(tree: Any) -> int:
  """Bytes of a pytree's array leaves."""
  return sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree)
             if hasattr(a, "dtype"))

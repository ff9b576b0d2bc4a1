"""A user's own Flax module in the engine: import strings, factories, and the adapter that gives
any `flax.linen.Module` jaxdiff's `(logits, out)` contract.

`config.model.name = "package.module:factory"` names a factory called as
`factory(model_config, num_classes, input_shape) -> nn.Module` (`model_config`: the model
section's fields other than jaxdiff's own `RESERVED`: `name`, `layers`, `inputs`); from Python,
`train.train_and_evaluate(config, workdir, model=...)` takes a Module or such a factory. The
module may return bare logits `[B, C]` or `(logits, {"layers": [...], "pre_logits": ...})`; for
bare logits `model.layers` names the submodules (paths such as `"RNN_0"` or `"block/Dense_1"`,
in depth order) whose outputs Flax's `capture_intermediates` records as the layers of
prediction depth and prototypes (the last one is the penultimate feature).

Mutable collections besides `batch_stats` (a counter, a running mean in "stats") are updated in
training steps and kept, packed into the engine's one member-state slot (`UserModel`). A module
of several inputs `__call__(signal, meta, train=...)` names them in `model.inputs`
(`("signal:40", "meta:3")`): the engine's x `[N, D]` is their concatenation, flattened
(`pack_inputs` builds it), and the adapter splits it back.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PYTHON_PREFIX = "python:"  # model.name of a model passed as a Python object
# Model-section fields jaxdiff reads itself (not passed to the factory).
RESERVED = ("name", "layers", "inputs")
# Where a packed collection sits in the packed `batch_stats` tree (`UserModel`): beside the
# module's own batch statistics, whose paths stay those of the module (GraNd's norm layers
# look their statistics up by module path).
PACKED_PREFIX = "collection:"
INPUT_FORM = ("'name:d1xd2...' strings (e.g. ('signal:40', 'meta:3')) or (name, shape) pairs, "
              "in the order of the module's arguments")


class ModelError(ValueError):
  """A user model that cannot be built, run or vmapped over members."""


def is_user_name(name: Any) -> bool:
  """True for an import string `"pkg.mod:factory"` or a `"python:<label>"` model name."""
  return isinstance(name, str) and (":" in name)


def resolve(name: str, builtins: Sequence[str]) -> Callable[..., Any]:
  """The object an import string `"package.module:attr"` names (`attr` may be dotted).

  Raises:
    ModelError naming the string, what failed, and the built-in names.
  """
  valid = f"built-in models: {', '.join(builtins)}; or an import string 'package.module:factory'"
  if name.startswith(PYTHON_PREFIX):
    raise ModelError(f"model.name={name!r} was a Python object passed to "
                     "train_and_evaluate(model=...); pass the same model again (or use an import "
                     f"string). {valid}")
  mod_name, _, attr = name.partition(":")
  if not mod_name or not attr:
    raise ModelError(f"model.name={name!r} is not an import string 'package.module:factory'; "
                     f"{valid}")
  try:
    obj = importlib.import_module(mod_name)
  except ImportError as e:
    raise ModelError(f"model.name={name!r}: module {mod_name!r} not found ({e}); is it on "
                     f"PYTHONPATH? {valid}") from e
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise ModelError(f"model.name={name!r}: module {mod_name!r} has no attribute {attr!r}; "
                       f"{valid}")
    obj = getattr(obj, part)
  if not callable(obj) and not isinstance(obj, nn.Module):
    raise ModelError(f"model.name={name!r} is a {type(obj).__name__}, not a Module or a factory "
                     "returning one")
  return obj


def label(model: Any) -> str:
  """`"python:<qualified name>"` of a Module (its class) or a factory."""
  target = type(model) if isinstance(model, nn.Module) else model
  qual = getattr(target, "__qualname__", type(target).__name__)
  return f"{PYTHON_PREFIX}{getattr(target, '__module__', '?')}.{qual}"


def parse_inputs(spec: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
  """`model.inputs` as `((name, shape), ...)`; `()` for a module of one input.

  Args:
    spec: None/""/() (one input); a sequence of "name:d1xd2..." strings or (name, shape) pairs
      (shape an int or a sequence of ints); or one string of such entries joined by commas
      (`"signal:40,meta:3"`, a string field overridden on the command line).
  Raises:
    ModelError naming the bad value and the expected form.
  """
  if spec is None or (isinstance(spec, (str, tuple, list)) and not spec):
    return ()
  entries = [e.strip() for e in spec.split(",")] if isinstance(spec, str) else spec
  if not isinstance(entries, Sequence):
    raise ModelError(f"model.inputs={spec!r}: need a sequence of {INPUT_FORM}")
  out = []
  for entry in entries:
    try:
      if isinstance(entry, str):
        name, sep, dims = entry.partition(":")
        shape = tuple(int(d) for d in dims.split("x")) if sep and dims else None
      else:
        name, shape = entry
        shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(d) for d in shape)
    except (TypeError, ValueError):
      shape = None
    if (shape is None or not isinstance(name, str) or not name.strip() or not shape
        or min(shape) < 1):
      raise ModelError(f"model.inputs: bad entry {entry!r} in {spec!r}; need {INPUT_FORM}, "
                       "each dimension a positive int")
    out.append((name.strip(), shape))
  names = [n for n, _ in out]
  if len(set(names)) != len(names):
    raise ModelError(f"model.inputs={spec!r} repeats a name; names must differ")
  return tuple(out)


def inputs_spec(inputs: Sequence[tuple[str, tuple[int, ...]]]) -> tuple[str, ...]:
  """`((name, shape), ...)` as the "name:d1xd2" strings of `model.inputs`."""
  return tuple(f"{n}:{'x'.join(str(d) for d in shape)}" for n, shape in inputs)


def pack_inputs(arrays: Mapping[str, Any], names: Sequence[str] | None = None
                ) -> tuple[np.ndarray, tuple[str, ...]]:
  """Several per-example inputs as the one array the engine trains on, and their `model.inputs`.

  Example::

    x, spec = user_models.pack_inputs({"signal": signal, "meta": meta})  # [N, 40], [N, 3]
    # x: [N, 43]; spec: ("signal:40", "meta:3"); config.model.inputs = spec

  Args:
    arrays: `{name: [N, ...]}`, the same N in each.
    names: their order, as the module's `__call__` takes them (default: the mapping's order).
  Returns:
    (x float32 `[N, D]`: each input flattened, concatenated in order, D = the sum of their
    sizes; the spec tuple of "name:d1xd2..." strings).
  Raises:
    ModelError naming a missing name or arrays of different N.
  """
  names = list(arrays) if names is None else [str(n) for n in names]
  missing = [n for n in names if n not in arrays]
  if missing or not names:
    raise ModelError(f"pack_inputs: names {missing or names} not among the arrays "
                     f"{sorted(arrays)}")
  parts = [np.asarray(arrays[n]) for n in names]
  sizes = {n: a.shape[0] if a.ndim else None for n, a in zip(names, parts)}
  if len(set(sizes.values())) != 1 or None in sizes.values():
    raise ModelError(f"pack_inputs: the arrays need the same leading N; got {sizes}")
  x = np.concatenate([a.reshape(a.shape[0], -1).astype(np.float32) for a in parts], axis=1)
  return x, inputs_spec([(n, a.shape[1:] or (1,)) for n, a in zip(names, parts)])


def build(config: Mapping[str, Any], num_classes: int, example_x: np.ndarray,
          model: Any = None, need_features: bool = False) -> UserModel:
  """A user model in the adapter, checked on `example_x` (as vmapped members) before any work.

  Args:
    config: the model section: `name` (an import string, or the label of `model`), `layers`
      (module paths for bare-logits models, optional), `inputs` (a module of several inputs,
      `parse_inputs`; optional) and the factory's own fields.
    num_classes: classes of the data.
    example_x: `[B, ...]` a few training inputs (shapes and dtype; B >= 1).
    model: a Module or factory given from Python (then `config["name"]` is only its label).
    need_features: representation scores are on: the model must give layers.
  Raises:
    ModelError naming the model: not a Module, a wrong output shape, no features, not vmappable,
    inputs that do not add up to the data's, collections that cannot be kept as member state.
  """
  name = str(config.get("name"))
  obj = model if model is not None else resolve(name, ())
  input_shape = tuple(int(d) for d in np.shape(example_x)[1:])
  inputs = parse_inputs(config.get("inputs", None))
  size = int(np.prod(input_shape, dtype=np.int64))
  total = sum(int(np.prod(s, dtype=np.int64)) for _, s in inputs)
  if inputs and total != size:
    raise ModelError(f"model {name!r}: model.inputs={inputs_spec(inputs)} holds {total} values "
                     f"per example, the data {size} (inputs {input_shape}); the spec's sizes "
                     "must add up to the data's (user_models.pack_inputs builds both)")
  if isinstance(obj, nn.Module):
    module = obj
  else:
    fields = {k: v for k, v in dict(config).items() if k not in RESERVED}
    try:
      module = obj(fields, num_classes, input_shape)
    except ModelError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (the user's factory)
      raise ModelError(f"model {name!r}: factory({fields}, {num_classes}, {input_shape}) failed: "
                       f"{type(e).__name__}: {e}") from e
    if not isinstance(module, nn.Module):
      raise ModelError(f"model {name!r}: the factory returned a {type(module).__name__}, not a "
                       "flax.linen.Module")
  layers = config.get("layers", None)
  layers = () if layers in (None, "", ()) else (
      (layers,) if isinstance(layers, str) else tuple(str(l) for l in layers))
  adapter = UserModel(module=module, name=name, layers=layers,
                      train_arg=_train_arg(module), inputs=inputs)
  adapter = dataclasses.replace(adapter, collections=adapter.extra_collections(example_x))
  adapter.check(example_x, num_classes, need_features)
  return adapter


def _train_arg(module: nn.Module) -> str | None:
  """Which keyword of `module.__call__` switches training mode: "train", "deterministic" (its
  negation, as `nn.Dropout`), or None."""
  try:
    params = inspect.signature(module.__call__).parameters
  except (TypeError, ValueError):
    return None
  for arg in ("train", "training", "deterministic"):
    if arg in params:
      return arg
  return None


@dataclasses.dataclass(frozen=True)
class UserModel:
  """A user's module seen through jaxdiff's contract: `init(key, x, train=False)` and
  `apply(variables, x, train=..., mutable=..., rngs=...) -> (logits, out)`, `out["layers"]` and
  `out["pre_logits"]` from the module's own aux or from `capture_intermediates` of the paths
  `layers`.

  Inputs: x `[B, ...]`; with `inputs`, x is flattened to `[B, D]` and split, in order, into
  `[B, *shape]` pieces passed positionally, `module(*pieces, train=...)`.

  Variables: a module whose collections are 'params' and 'batch_stats' keeps its own layout.
  A module with other collections (`collections`; 'intermediates' is dropped, as Flax's own
  `capture_intermediates` output) has them packed into "batch_stats", the one slot the engine
  keeps per member, updates in training steps and checkpoints::

    {"params": ..., "batch_stats": {**module's "batch_stats", "collection:stats": module's
                                    "stats", ...}}

  `apply` unpacks them; when the engine asks for `mutable=["batch_stats"]` (training) every
  packed collection is mutable and the updates come back packed, as a Flax loop calling
  `apply(..., mutable=[every non-params collection])` keeps them. In evaluation they are
  mutable too and the updates dropped (a module that also writes them there runs). `apply` also
  takes the module's own layout (`pack` / `unpack` convert), e.g. variables trained elsewhere
  given to `posthoc.score_members`.

  Attributes:
    module: the user's `flax.linen.Module`.
    name: the model's name in messages (import string or `python:` label).
    layers: module paths whose `__call__` outputs are the layers (bare-logits models).
    train_arg: the module's training keyword ("train", "training", "deterministic") or None.
    inputs: `((name, shape), ...)` of a module of several inputs (`model.inputs`), or ().
    collections: the module's collections packed into "batch_stats" (besides its own batch
      statistics), or () for the module's own layout.
  """
  module: nn.Module
  name: str
  layers: tuple[str, ...] = ()
  train_arg: str | None = None
  inputs: tuple[tuple[str, tuple[int, ...]], ...] = ()
  collections: tuple[str, ...] = ()
  # The engine passes a "dropout" stream to the training step of models that set this.
  needs_rngs = True

  def _kwargs(self, train: bool) -> dict:
    if self.train_arg is None:
      return {}
    return {self.train_arg: (not train) if self.train_arg == "deterministic" else train}

  def split(self, x) -> tuple:
    """The module's positional inputs: `(x,)`, or x `[B, ...]` split into `inputs`' pieces."""
    if not self.inputs:
      return (x,)
    flat = x.reshape(x.shape[0], -1)
    pieces, start = [], 0
    for _, shape in self.inputs:
      size = int(np.prod(shape, dtype=np.int64))
      pieces.append(flat[:, start:start + size].reshape((x.shape[0],) + tuple(shape)))
      start += size
    return tuple(pieces)

  def pack(self, variables: Mapping[str, Any]) -> dict:
    """The module's own variables (or updates) in the engine's layout (see the class)."""
    own = ("batch_stats", "intermediates") + self.collections
    out = {k: v for k, v in variables.items() if k not in own}
    packed = dict(variables.get("batch_stats", {}))
    for c in self.collections:
      if c in variables:
        packed[PACKED_PREFIX + c] = variables[c]
    if packed:
      out["batch_stats"] = packed
    return out

  def unpack(self, variables: Mapping[str, Any]) -> dict:
    """The engine's layout as the module's own (the inverse of `pack`); the module's own layout
    passes unchanged."""
    if (not self.collections or "batch_stats" not in variables
        or any(c in variables for c in self.collections)):
      return dict(variables)
    packed = variables["batch_stats"]
    out = {k: v for k, v in variables.items() if k != "batch_stats"}
    own = {k: v for k, v in packed.items() if not k.startswith(PACKED_PREFIX)}
    if own:
      out["batch_stats"] = own
    for c in self.collections:
      if PACKED_PREFIX + c in packed:
        out[c] = packed[PACKED_PREFIX + c]
    return out

  def init(self, key, x, train: bool = False):
    return self.pack(self.module.init(key, *self.split(x), **self._kwargs(train)))

  def apply(self, variables, x, train: bool = False, mutable=False, rngs=None):
    """`(logits, out)`, or `((logits, out), updated collections)` when `mutable` is given."""
    kw = self._kwargs(train)
    if rngs:
      kw["rngs"] = rngs
    extra = list(mutable) if mutable else []
    if self.collections:
      variables = self.unpack(variables)
      extra = [c for c in extra if c != "batch_stats"] + [
          c for c in ("batch_stats",) + self.collections if c in variables]
    if self.layers:
      wanted = set(self.layers)
      kw["capture_intermediates"] = (
          lambda mdl, method: method == "__call__" and "/".join(mdl.path) in wanted)
      extra = extra + ["intermediates"]
    if extra:
      res, upd = self.module.apply(variables, *self.split(x), mutable=extra, **kw)
      upd = dict(upd)
      captured = upd.pop("intermediates", {})
    else:
      res, upd, captured = self.module.apply(variables, *self.split(x), **kw), {}, {}
    out = self._outputs(res, captured)
    if not mutable:
      return out
    if self.collections:
      upd = self.pack(upd) if "batch_stats" in mutable else {
          k: v for k, v in upd.items() if k in mutable}
    return out, upd

  def _outputs(self, res, captured):
    if isinstance(res, tuple) and len(res) == 2 and isinstance(res[1], Mapping):
      logits, aux = res
      if not self.layers and "layers" in aux:
        layers = list(aux["layers"])
        return logits, {**aux, "pre_logits": aux.get("pre_logits", layers[-1] if layers else None)}
    elif isinstance(res, tuple):
      raise ModelError(f"model {self.name!r} returns a tuple of {len(res)}; return logits "
                       "[B, classes] or (logits, {'layers': [...], 'pre_logits': ...})")
    else:
      logits = res
    if not self.layers:
      return logits, {"layers": [], "pre_logits": None}
    layers = []
    for path in self.layers:
      node = captured
      for part in path.split("/"):
        node = node.get(part, {}) if isinstance(node, Mapping) else {}
      calls = node.get("__call__") if isinstance(node, Mapping) else None
      if not calls:
        raise ModelError(f"model {self.name!r}: model.layers names {path!r}, which is not a "
                         "submodule called in the forward pass (paths like 'Dense_0' or "
                         "'block/Dense_1', relative to the model)")
      if len(calls) != 1:
        raise ModelError(f"model {self.name!r}: the layer {path!r} is called {len(calls)} times "
                         "per forward pass; name a module called once")
      layers.append(calls[0])
    return logits, {"layers": layers, "pre_logits": layers[-1]}

  def _trace(self, fn, *args):
    """`jax.eval_shape(fn, *args)`, the user's module's failures as one-line ModelErrors."""
    try:
      return jax.eval_shape(fn, *args)
    except ModelError:
      raise
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
            jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError,
            jax.errors.UnexpectedTracerError) as e:
      raise ModelError(
          f"model {self.name!r} cannot be vmapped over members (a Python side effect on traced "
          "values, or a shape that depends on the member's parameters or key?): "
          f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
    except Exception as e:  # pylint: disable=broad-except  (the user's module)
      x = args[-1]
      shapes = (f"inputs {tuple(x.shape[1:])} of {x.dtype}" if not self.inputs else
                f"inputs {inputs_spec(self.inputs)} (split from {tuple(x.shape[1:])} {x.dtype})")
      raise ModelError(f"model {self.name!r} fails on {shapes} vmapped over members: "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e

  def extra_collections(self, example_x) -> tuple[str, ...]:
    """The module's variable collections besides 'params', 'batch_stats' and 'intermediates'
    (sorted), from an abstract init on `example_x` `[B, ...]`: those `collections` packs.

    Raises:
      ModelError naming the model when it cannot be initialised, or when a batch-statistics
      entry's name starts with `PACKED_PREFIX` (it would collide with a packed collection).
    """
    x = jnp.asarray(np.asarray(example_x)[:1])
    v = self._trace(lambda key, x: self.module.init(key, *self.split(x), **self._kwargs(False)),
                    jax.random.key(0), x)
    extra = tuple(sorted(set(v) - {"params", "batch_stats", "intermediates"}))
    clash = [k for k in v.get("batch_stats", {}) if k.startswith(PACKED_PREFIX)]
    if extra and clash:
      raise ModelError(f"model {self.name!r}: batch_stats entries {clash} start with "
                       f"{PACKED_PREFIX!r}, which marks the packed collections {list(extra)}; "
                       "rename those submodules")
    return extra

  def check(self, example_x, num_classes: int, need_features: bool) -> None:
    """Traces two members (vmapped, abstractly): init, a training forward pass with batch
    statistics (every mutable collection) and dropout, an evaluation pass; checks the logits'
    shape, that a training step keeps the mutable collections' shapes and, when
    `need_features`, the layers.

    Raises:
      ModelError naming the model and what to change.
    """
    x = jnp.asarray(np.asarray(example_x)[:2])
    keys = jax.random.split(jax.random.key(0), 2)

    def one(key, x):  # x traced too: a model that reads its input in Python fails here
      v = self.init(key, x)
      (logits, out), upd = self.apply(v, x, train=True, mutable=["batch_stats"],
                                      rngs={"dropout": key})
      ev, ev_out = self.apply(v, x)
      return v, upd, logits, ev, out["layers"], ev_out["layers"]

    v, upd, logits, ev, layers, _ = self._trace(jax.vmap(one, in_axes=(0, None)), keys, x)
    if "params" not in v:
      raise ModelError(f"model {self.name!r} has no parameters ('params' collection)")
    ints = [f"{_collection_path(p)} ({a.dtype})"
            for p, a in jax.tree_util.tree_leaves_with_path(v.get("batch_stats", {}))
            if not jnp.issubdtype(a.dtype, jnp.inexact)]
    if ints:  # scoring sizes its chunks from a gradient w.r.t. all variables (point.py)
      raise ModelError(f"model {self.name!r}: mutable collection leaves {ints} are not floats; "
                       "the engine's scoring differentiates through the member state: keep them "
                       "float32 (a float32 counter is exact up to 2**24)")
    changed = _changed_collections(v.get("batch_stats", {}), upd.get("batch_stats", {}))
    if "batch_stats" in v and changed:
      raise ModelError(
          f"model {self.name!r}: a training step changes the structure or shapes of its "
          f"collection(s) {changed} (sow() appending a value per call?); the engine keeps "
          "mutable collections as fixed-shape state per member: keep a fixed-shape "
          "self.variable, or sow into 'intermediates' (dropped)")
    for what, lg in (("training", logits), ("evaluation", ev)):
      if not hasattr(lg, "shape") or lg.shape != (2, x.shape[0], num_classes):
        got = getattr(lg, "shape", type(lg).__name__)
        got = got[1:] if isinstance(got, tuple) else got
        raise ModelError(f"model {self.name!r} returns logits of shape {got} in {what} mode on "
                         f"inputs {tuple(x.shape)}; need [batch, {num_classes}] for the "
                         f"{num_classes} classes")
    if need_features and not layers:
      raise ModelError(
          f"model {self.name!r} returns bare logits, so prediction depth and prototypes have no "
          "features: set model.layers to the module paths whose outputs are its layers, in "
          "depth order (e.g. model.layers=('Dense_0', 'Dense_1'); the last is the penultimate "
          "feature), or scores.representation=False")


def _collection_path(path, collection_only: bool = False) -> str:
  """A key path into the packed `batch_stats` as the module sees it: "stats/count" (packed
  collection "stats") or "batch_stats/BatchNorm_0/mean"; `collection_only`: "stats"."""
  keys = [str(getattr(k, "key", k)) for k in path]
  first = keys[0] if keys else ""
  if first.startswith(PACKED_PREFIX):
    keys = [first[len(PACKED_PREFIX):]] + keys[1:]
  else:
    keys = ["batch_stats"] + keys
  return keys[0] if collection_only else "/".join(keys)


def _changed_collections(before, after) -> list[str]:
  """The collections whose leaves differ in path, shape or dtype between two abstract packed
  `batch_stats` trees (names as the module's: "stats", "batch_stats")."""
  def leaves(tree):
    return {tuple(p): (a.shape, a.dtype) for p, a in jax.tree_util.tree_leaves_with_path(tree)}
  a, b = leaves(before), leaves(after)
  return sorted({_collection_path(k, True) for k in set(a) | set(b) if a.get(k) != b.get(k)})

"""A user's own Flax module in the engine: import strings, factories, and the adapter that gives
any `flax.linen.Module` jaxdiff's `(logits, out)` contract.

`config.model.name = "package.module:factory"` names a factory called as
`factory(model_config, num_classes, input_shape) -> nn.Module` (`model_config`: the model
section's fields other than jaxdiff's own `name` and `layers`); from Python,
`train.train_and_evaluate(config, workdir, model=...)` takes a Module or such a factory. The
module may return bare logits `[B, C]` or `(logits, {"layers": [...], "pre_logits": ...})`; for
bare logits `model.layers` names the submodules (paths such as `"RNN_0"` or `"block/Dense_1"`,
in depth order) whose outputs Flax's `capture_intermediates` records as the layers of
prediction depth and prototypes (the last one is the penultimate feature).
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
RESERVED = ("name", "layers")  # model-section fields jaxdiff reads itself (not the factory's)


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


def build(config: Mapping[str, Any], num_classes: int, example_x: np.ndarray,
          model: Any = None, need_features: bool = False) -> UserModel:
  """A user model in the adapter, checked on `example_x` (as vmapped members) before any work.

  Args:
    config: the model section: `name` (an import string, or the label of `model`), `layers`
      (module paths for bare-logits models, optional) and the factory's own fields.
    num_classes: classes of the data.
    example_x: `[B, ...]` a few training inputs (shapes and dtype; B >= 1).
    model: a Module or factory given from Python (then `config["name"]` is only its label).
    need_features: representation scores are on: the model must give layers.
  Raises:
    ModelError naming the model: not a Module, a wrong output shape, no features, not vmappable.
  """
  name = str(config.get("name"))
  obj = model if model is not None else resolve(name, ())
  input_shape = tuple(int(d) for d in np.shape(example_x)[1:])
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
                      train_arg=_train_arg(module))
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
  `layers`. Its variables are the module's own (no extra nesting).

  Attributes:
    module: the user's `flax.linen.Module`.
    name: the model's name in messages (import string or `python:` label).
    layers: module paths whose `__call__` outputs are the layers (bare-logits models).
    train_arg: the module's training keyword ("train", "training", "deterministic") or None.
  """
  module: nn.Module
  name: str
  layers: tuple[str, ...] = ()
  train_arg: str | None = None
  # The engine passes a "dropout" stream to the training step of models that set this.
  needs_rngs = True

  def _kwargs(self, train: bool) -> dict:
    if self.train_arg is None:
      return {}
    return {self.train_arg: (not train) if self.train_arg == "deterministic" else train}

  def init(self, key, x, train: bool = False):
    variables = self.module.init(key, x, **self._kwargs(train))
    return {k: v for k, v in variables.items() if k != "intermediates"}

  def apply(self, variables, x, train: bool = False, mutable=False, rngs=None):
    """`(logits, out)`, or `((logits, out), updated collections)` when `mutable` is given."""
    kw = self._kwargs(train)
    if rngs:
      kw["rngs"] = rngs
    extra = list(mutable) if mutable else []
    if self.layers:
      wanted = set(self.layers)
      kw["capture_intermediates"] = (
          lambda mdl, method: method == "__call__" and "/".join(mdl.path) in wanted)
      extra = extra + ["intermediates"]
    if extra:
      res, upd = self.module.apply(variables, x, mutable=extra, **kw)
      upd = dict(upd)
      captured = upd.pop("intermediates", {})
    else:
      res, upd, captured = self.module.apply(variables, x, **kw), {}, {}
    out = self._outputs(res, captured)
    return (out, upd) if mutable else out

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

  def check(self, example_x, num_classes: int, need_features: bool) -> None:
    """Traces two members (vmapped, abstractly): init, a training forward pass with batch
    statistics and dropout, an evaluation pass; checks the logits' shape, the variable
    collections and, when `need_features`, the layers.

    Raises:
      ModelError naming the model and what to change.
    """
    x = jnp.asarray(np.asarray(example_x)[:2])
    keys = jax.random.split(jax.random.key(0), 2)

    def one(key, x):  # x traced too: a model that reads its input in Python fails here
      v = self.init(key, x)
      (logits, out), _ = self.apply(v, x, train=True, mutable=["batch_stats"],
                                    rngs={"dropout": key})
      ev, ev_out = self.apply(v, x)
      return v, logits, ev, out["layers"], ev_out["layers"]

    try:
      v, logits, ev, layers, _ = jax.eval_shape(jax.vmap(one, in_axes=(0, None)), keys, x)
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
      raise ModelError(f"model {self.name!r} fails on inputs {tuple(x.shape[1:])} of "
                       f"{x.dtype} vmapped over members: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from e
    other = sorted(set(v) - {"params", "batch_stats"})
    if other:
      raise ModelError(f"model {self.name!r} has variable collections {other}; the engine keeps "
                       "'params' and 'batch_stats' (running statistics, updated in training) "
                       "only: rename a mutable collection to 'batch_stats'")
    if "params" not in v:
      raise ModelError(f"model {self.name!r} has no parameters ('params' collection)")
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

"""The machinery every exercise check is built on.

A check
1. says "not attempted yet" (and returns ``False``) while the exercise still raises
   ``NotImplementedError``;
2. checks the type, shape and dtype of what came back and names what it expected
   (``None`` means a missing ``return``);
3. computes the reference first, then calls the learner's code on copies and checks the
   inputs came back unchanged (an in-place edit of an input is a mistake of its own);
4. compares with the reference on several cases, NaN-safe, and recognises the usual
   mistakes by name; a difference it cannot name says which output differs, where and by
   how much;
5. where the exercise creates tensors, calls it once more on another device (a GPU when
   there is one, else PyTorch's ``meta`` device) to catch tensors made on the wrong device;
6. prints one pass line (and returns ``True``), or raises ``AssertionError`` with a hint.

Checks never depend on the order or the method by which learner code draws random
numbers: randomness is passed in through arguments, or the check measures a property
every correct answer has.

The pass / not-attempted lines start with the fixed marks below, so tools (the grader)
can read a notebook's outputs. An exercise is named by its heading in the notebook
(``Exercise 5 · q_sample``), the same name everywhere.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import weakref
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

PASSED_MARK = "✔ PASSED"
NOT_ATTEMPTED_MARK = "○ NOT ATTEMPTED"

# Words in PyTorch's messages when tensors on two devices meet in one operation.
_DEVICE_ERRORS = ("expected device", "same device", "is not on the expected device",
                  "expected all tensors to be on", "device type", "found at least two devices")


class _NotAttempted(Exception):
    """Raised inside a check when the learner's code is still the stub."""


# The functions and classes that passed their check, with their exercise's name.
_PASSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def exercise_check(exercise: str):
    """Turn ``body(fn, ...) -> str`` into a check for the exercise called ``exercise``.

    ``exercise`` is the exercise's heading in its notebook without the ``##`` (for example
    ``"Exercise 5 · q_sample"``). ``body`` raises ``AssertionError`` (through :func:`fail`)
    with a hint, or returns a short description of what passed.
    """

    def decorate(body: Callable[..., str]):
        @functools.wraps(body)
        def check(fn, *args, **kwargs) -> bool:
            if not callable(fn):
                raise TypeError(f"{body.__name__} expects your function or class itself "
                                f"({exercise}), got {type(fn).__name__}")
            try:
                detail = body(fn, *args, **kwargs)
            except _NotAttempted:
                print(f"{NOT_ATTEMPTED_MARK} {exercise}: not attempted yet — replace "
                      "`raise NotImplementedError()` with your code and run the cell again.")
                return False
            except AssertionError as err:
                raise AssertionError(f"{exercise}: {err}") from None
            print(f"{PASSED_MARK} {exercise}: {detail}")
            try:
                _PASSED[fn] = exercise
            except TypeError:  # an object that cannot be weakly referenced is not remembered
                pass
            return True

        check.exercise = exercise
        return check

    return decorate


def passed(fn) -> bool:
    """Whether ``fn`` (this very function or class object) has passed its check."""
    try:
        return fn in _PASSED
    except TypeError:
        return False


def yours_if_passed(mine, library, *, name: str | None = None):
    """``mine`` if it has passed its check, else ``library``; says which in one line.

    The payoff cells of a lesson (training, sampling, building the model) run the learner's
    own code once its check has passed::

        step_fn = yours_if_passed(train_step, du.train_step)
    """
    name = name or getattr(library, "__name__", "this part")
    if passed(mine):
        print(f"→ using your {name} (it passed its check)")
        return mine
    print(f"→ using the library's du.{name}: yours has not passed its check yet "
          "(run its check cell after your last change)")
    return library


def fail(hint: str):
    """Stop the check with a hint for the learner."""
    raise AssertionError(hint)


def call(fn, *args, **kwargs):
    """Call the learner's function; a stub turns into "not attempted"."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise _NotAttempted from None


# ── Inputs left as they were ─────────────────────────────────────────────────────────


def _tensors(value, path: str) -> list[tuple[str, Tensor]]:
    """Every tensor inside ``value`` (a tensor, module, dataclass, list or dict), by path."""
    if isinstance(value, Tensor):
        return [(path, value)]
    if isinstance(value, nn.Module):
        return [(f"{path}.{k}", v) for k, v in value.state_dict().items()]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [item for f in dataclasses.fields(value)
                for item in _tensors(getattr(value, f.name), f"{path}.{f.name}")]
    if isinstance(value, (list, tuple)):
        return [item for i, v in enumerate(value) for item in _tensors(v, f"{path}[{i}]")]
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _tensors(v, f"{path}[{k!r}]")]
    return []


def snapshot(value, name: str = "") -> list[tuple[str, Tensor]]:
    """Copies of the tensors inside ``value``, to compare with later (:func:`changed`)."""
    return [(path, tensor.detach().clone()) for path, tensor in _tensors(value, name)]


def changed(value, before: list[tuple[str, Tensor]], name: str = "") -> str | None:
    """The path of the first tensor in ``value`` that differs from ``before`` (NaN equals
    NaN), or None when everything is as it was."""
    now = _tensors(value, name)
    if [p for p, _ in now] != [p for p, _ in before]:
        return name
    for (path, tensor), (_, old) in zip(now, before):
        tensor = tensor.detach()
        if (tensor.shape != old.shape or tensor.dtype != old.dtype
                or not torch.equal(tensor.isnan(), old.isnan())
                or not torch.equal(tensor.nan_to_num(), old.nan_to_num())):
            return path
    return None


def call_pure(fn, *args, names: tuple[str, ...] = (), **kwargs):
    """:func:`call`, then fail with a hint naming any input the function changed in place.

    ``names`` are the positional arguments' names as the learner knows them (keyword
    arguments are named by their keyword).
    """
    names = tuple(names) + tuple(f"argument {i + 1}" for i in range(len(names), len(args)))
    watched = list(zip(names, args)) + list(kwargs.items())
    before = [(name, value, snapshot(value, name)) for name, value in watched]
    out = call(fn, *args, **kwargs)
    for name, value, snap in before:
        path = changed(value, snap, name)
        if path is not None:
            fail(f"your code changed its input `{path}` in place (an in-place operation such "
                 f"as `+=`, `.mul_(...)`, `.clamp_(...)` or `[...] =` on it): leave the "
                 "inputs as they are and compute new tensors")
    return out


# ── What came back ───────────────────────────────────────────────────────────────────

BROADCAST_HINT = ("check how per-timestep values broadcast over the batch: a (B,) tensor must "
                  "become (B, 1, 1, 1) before it multiplies a (B, C, H, W) batch")


def call_explained(fn, *args, names: tuple[str, ...], what: str, explain=None,
                   grad: bool = False, **kwargs):
    """:func:`call_pure` (without gradients unless ``grad``); an error that ``explain(err)``
    recognises becomes a hint, any other reaches the learner with its traceback."""
    try:
        with contextlib.nullcontext() if grad else torch.no_grad():
            return call_pure(fn, *args, names=names, **kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        hint = explain(err) if explain is not None else None
        if hint is None:
            raise
        fail(f"{what} raised {type(err).__name__} ({str(err).splitlines()[0]}) — {hint}")


def expect_tensor(out, *, shape, dtype=torch.float32, what: str = "the result",
                  shape_hint: str | None = None) -> Tensor:
    """Check ``out`` is a finite tensor of ``shape`` and ``dtype``; name what was expected.

    ``shape_hint`` is added when the shape is wrong; by default the broadcasting hint
    when the wrong shape has extra batch-sized dimensions (the usual broadcasting slip).
    """
    if out is None:
        fail(f"{what} is None — did you forget the `return` statement?")
    if isinstance(out, tuple) and len(out) == 1:
        fail(f"{what} is a 1-tuple — is there a stray comma after the returned expression?")
    if not isinstance(out, Tensor):
        fail(f"{what} should be a torch.Tensor of shape {tuple(shape)}, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        if shape_hint is None:
            shape_hint = (BROADCAST_HINT if out.ndim > len(shape) or (
                out.ndim == len(shape) and out.numel() > math.prod(shape)) else
                "compare each step's shape with the docstring")
        fail(f"{what} should have shape {tuple(shape)}, got {tuple(out.shape)} — {shape_hint}")
    if dtype is not None and out.dtype != dtype:
        fail(f"{what} should have dtype {dtype}, got {out.dtype}")
    expect_finite(out, what=what)
    return out


def expect_finite(out: Tensor, *, what: str) -> Tensor:
    """Fail if ``out`` holds NaN or inf, saying how many and where the first one is."""
    bad = ~torch.isfinite(out.detach())
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        kind = "NaN" if out.detach().isnan().any() else "inf"
        fail(f"{what} contains {kind} values ({int(bad.sum())} of {out.numel()}, the first at "
             f"index {where}) — look for a division by zero, the sqrt or log of a negative "
             "number, or a value that grows without bound")
    return out


def expect_float(out, *, what: str) -> float:
    """Check ``out`` is a finite Python float."""
    if out is None:
        fail(f"{what} is None — did you forget the `return` statement?")
    if isinstance(out, Tensor):
        fail(f"{what} is a tensor; return a Python float (`.item()`)")
    if not isinstance(out, float):
        fail(f"{what} should be a Python float, got {type(out).__name__}")
    if not math.isfinite(out):
        fail(f"{what} is {out}: something diverged or divided by zero")
    return out


def near(a: float, b: float, *, atol: float = 1e-6, rtol: float = 1e-5) -> bool:
    """Whether two numbers agree (NaN and inf never do)."""
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= atol + rtol * abs(b)


def close(a: Tensor, b: Tensor, *, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """Whether two tensors agree within tolerances; shapes must match, NaN never agrees."""
    return (isinstance(a, Tensor) and a.shape == b.shape
            and bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())
            and torch.allclose(a.detach().double().cpu(), b.detach().double().cpu(),
                               atol=atol, rtol=rtol))


def same_values(out, wrong: Tensor, *, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """Whether ``out`` equals ``wrong``, NaN and inf included: the same entries are not finite
    (and the same infinities), the finite ones agree. Recognises mistakes that divide by zero."""
    if not isinstance(out, Tensor) or out.shape != wrong.shape:
        return False
    out, wrong = out.detach().double().cpu(), wrong.detach().double().cpu()
    finite = torch.isfinite(wrong)
    if not torch.equal(torch.isfinite(out), finite) or not torch.equal(out.isnan(), wrong.isnan()):
        return False
    if not torch.equal(out[out.isinf()], wrong[wrong.isinf()]):
        return False
    return bool(torch.allclose(out[finite], wrong[finite], atol=atol, rtol=rtol))


def expect_result(out, shape, dtype, mistakes: dict[str, Tensor], what: str,
                  shape_hint: str | None = None) -> Tensor:
    """:func:`expect_tensor`, but a result of the right shape holding NaN or inf that one of
    the known ``mistakes`` {hint: wrong result} reproduces fails with that mistake's hint."""
    if isinstance(out, Tensor) and tuple(out.shape) == tuple(shape) and \
            not bool(torch.isfinite(out.detach()).all()):
        for hint, wrong in mistakes.items():
            if same_values(out, wrong, atol=1e-4, rtol=1e-3):
                fail(f"{what} is not right: {hint}")
    return expect_tensor(out, shape=shape, dtype=dtype, what=what, shape_hint=shape_hint)


def largest_difference(out: Tensor, expected: Tensor, *, item_names=None) -> str:
    """"largest difference 0.31 at item 2 (t = 30)": where two same-shape tensors differ most."""
    diff = (out.detach().double().cpu() - expected.detach().double().cpu()).abs()
    diff = diff.nan_to_num(nan=math.inf)
    flat = int(diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    text = f"largest difference {diff.max().item():.3g}"
    if not index:
        return text
    item = index[0]
    if item_names is not None:
        return f"{text} at item {item} ({item_names[item]})"
    return f"{text} at index {index}"


def compare(out: Tensor, expected: Tensor, mistakes: dict[str, Tensor], *, what: str,
            atol: float = 1e-5, rtol: float = 1e-4, item_names=None, term_hint: str | None = None
            ) -> None:
    """Fail unless ``out`` matches ``expected``; when it matches a known mistake, say which.

    ``mistakes`` maps a hint to the value that mistake produces. A difference that is no
    known mistake says where it is largest (``item_names`` names the batch items) and
    ``term_hint`` (default: compare term by term with the equation).
    """
    if close(out, expected, atol=atol, rtol=rtol):
        return
    for hint, wrong in mistakes.items():
        if close(out, wrong, atol=atol, rtol=rtol):
            fail(f"{what} is not right: {hint}")
    where = largest_difference(out, expected, item_names=item_names)
    fail(f"{what} differs from the reference ({where}); "
         + (term_hint or "compare your code with the equation above, term by term"))


# ── Another device ───────────────────────────────────────────────────────────────────


def other_device(device="cpu") -> torch.device:
    """A device other than ``device`` to probe learner code on: a GPU if there is one, else
    ``meta`` (tensors with shapes and dtypes but no values)."""
    device = torch.device(device)
    if device.type != "cuda" and torch.cuda.is_available():
        return torch.device("cuda")
    if device.type != "mps" and getattr(torch.backends, "mps", None) is not None \
            and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("meta")


def to_device(value, device):
    """``value`` with every tensor moved to ``device`` (modules and schedules too)."""
    if isinstance(value, (Tensor, nn.Module)):
        return value.to(device)
    if hasattr(value, "to") and dataclasses.is_dataclass(value):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _is_device_error(err: Exception) -> bool:
    text = str(err).lower()
    return any(words in text for words in _DEVICE_ERRORS)


DEVICE_HINT = ("a tensor is created on the CPU inside your code while the inputs are on "
               "{device}: pass `device=x.device` to torch.randn / torch.randint / torch.arange "
               "/ torch.zeros (or use torch.randn_like, x.new_zeros, ...), so that the code "
               "runs on a GPU as well")


def _device_words(device: torch.device) -> str:
    """How the learner should read the probe's device."""
    if device.type == "meta":
        return ("another device (this check ran your code with PyTorch's `meta` device "
                "standing in for a GPU)")
    return device.type


class _MetaAsGPU(TorchDispatchMode):
    """Let ``meta`` tensors stand in for a GPU's: a value read back to Python
    (``int(t.min())``, ``loss.item()``) is 0 and a copy to the CPU holds zeros.

    Without it the library's own ``du.extract`` (which checks the range of t) stops every
    probe on ``meta`` before the learner's tensors meet; with it, code that mixes devices
    fails on ``meta`` exactly where it would fail on a GPU.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func is aten._local_scalar_dense.default and args[0].device.type == "meta":
            dtype = args[0].dtype
            return False if dtype == torch.bool else 0.0 if dtype.is_floating_point else 0
        if (func is aten._to_copy.default and args[0].device.type == "meta"
                and kwargs.get("device") is not None
                and torch.device(kwargs["device"]).type != "meta"):
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype,
                               device=kwargs["device"])
        if (func is aten.copy_.default and args[1].device.type == "meta"
                and args[0].device.type != "meta"):
            return args[0]
        return func(*args, **kwargs)


def probe_device(fn, *args, what: str, **kwargs):
    """Call ``fn`` with every argument on :func:`other_device` and check the result's device.

    Fails with :data:`DEVICE_HINT` when the call mixes devices or returns a tensor on another
    device than the inputs. An error that has nothing to do with devices (``meta`` tensors
    have no values, so ``.item()`` cannot work on them) leaves the probe inconclusive: a
    correct answer is never rejected here. Returns the result, or ``None`` when
    inconclusive.
    """
    device = other_device()
    try:
        moved_args = [to_device(a, device) for a in args]
        moved_kwargs = {k: to_device(v, device) for k, v in kwargs.items()}
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    try:
        with _MetaAsGPU() if device.type == "meta" else contextlib.nullcontext():
            out = fn(*moved_args, **moved_kwargs)
    except Exception as err:  # noqa: BLE001 (anything else only ends the probe)
        # NotImplementedError included: code that already ran on the CPU is no stub; ``meta``
        # has no kernel for some operations (torch.nonzero, boolean masks).
        if _is_device_error(err):
            fail(f"{what}: " + DEVICE_HINT.format(device=_device_words(device))
                 + f" (PyTorch said: {str(err).splitlines()[0]})")
        return None
    outs = out if isinstance(out, (tuple, list)) else [out]
    for o in outs:
        if isinstance(o, Tensor) and o.device.type != device.type:
            fail(f"{what}: the result is on {o.device.type} although the inputs are on "
                 f"{device.type} — " + DEVICE_HINT.format(device=_device_words(device)))
    return out


def expect_fresh_normal_noise(outs, mean, sigma, what: str, *, step_name: str = "x_prev") -> None:
    """For a sampler step that draws its own z (``noise=None``): two outputs ``outs`` of the
    same call, the step's ``mean`` (z = 0) and ``sigma`` (its output at z = 1 minus the mean).
    The implied z = (out - mean) / σ must look like fresh N(0, I) draws on every call."""
    z = (outs[0] - mean) / sigma
    m, s = float(z.mean()), float(z.std())
    if abs(m - 0.5) < 0.1 and abs(s - 12 ** -0.5) < 0.05:
        fail(f"{what}: z is uniform on [0, 1) (mean {m:.2f}, std {s:.2f}): draw it with "
             "torch.randn_like(xt), not torch.rand_like")
    if not (abs(m) < 0.1 and abs(s - 1) < 0.1):
        fail(f"{what}: the noise added is not σ_t z with z ~ N(0, I) (z has mean {m:.2f} and "
             f"std {s:.2f}): draw z with torch.randn_like(xt) and add σ_t z")
    if torch.equal(outs[0], outs[1]):
        fail(f"{what}: two calls gave the same {step_name}: draw fresh z on every call (no "
             "fixed seed inside the step)")

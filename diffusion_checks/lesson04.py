"""Checks of lesson 04's exercises (conditioning).

``attribute_vector`` is compared with the reference on fixed labels. The two modules
(``AttributeEmbedding``, ``CrossAttention``) get the reference's layers with random non-zero
weights, as in lesson 02, and are compared with it on fixed inputs; the embedding is also
built into a small UNet, to see the condition reach the UNet's output and the loss's
gradient reach every parameter of the embedding. ``drop_condition`` draws its own random
numbers, so its check measures what every right answer does (whole rows kept as they are or
zeroed, about a fraction p of them, fresh draws on every call, the same draws for the same
generator) and never replays a seed.
"""
from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import diffusion_utilities as du

from ._core import (call, call_pure, close, compare, exercise_check, expect_tensor, fail,
                    probe_device, same_values)
from .lesson02 import _first_difference, _probe_module, _run, _scramble, _Trace


def _name_mistake(out: Tensor, mistakes, *, what: str, atol: float = 1e-5,
                  rtol: float = 1e-4) -> None:
    """Fail with the hint of the first mistake in ``mistakes`` (pairs of hint and the value
    that mistake gives) that ``out`` equals; NaN and inf count as values here."""
    finite = bool(torch.isfinite(out.detach()).all())
    for hint, wrong in mistakes:
        if wrong is None:
            continue
        if (close(out, wrong, atol=atol, rtol=rtol) if finite
                else same_values(out, wrong, atol=atol, rtol=rtol)):
            fail(f"{what} is not right: {hint}")


def _own_random_numbers(body):
    """Run a check's ``body`` on a copy of PyTorch's random state, so that building modules
    and drawing inside the check leave the notebook's random numbers as they were."""

    @functools.wraps(body)
    def wrapped(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return body(*args, **kwargs)

    return wrapped


def _learner_module(cls, reference: nn.Module, *args, layers: str, **kwargs) -> nn.Module:
    """Build the learner's module, ``cls(*args, **kwargs)`` (a stub in __init__ counts as not
    attempted), and load ``reference``'s weights into it; the hint names the parameters that
    do not fit and the ``layers`` to build."""
    mine = call(cls, *args, **kwargs)
    if not isinstance(mine, nn.Module):
        fail(f"{cls.__name__}(...) should build an nn.Module, got {type(mine).__name__}")
    try:
        missing, unexpected = mine.load_state_dict(reference.state_dict(), strict=False)
    except RuntimeError as err:
        sizes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        fail(f"{cls.__name__}'s layers do not have the expected shapes "
             f"({'; '.join(sizes) or str(err).splitlines()[0]}) — build {layers}")
    if missing or unexpected:    # missing: the learner's own names; unexpected: those it lacks
        parts = ([f"it has no {', '.join(unexpected)}"] if unexpected else []) + (
            [f"it has {', '.join(missing)}, which the reference has not"] if missing else [])
        hint = ""
        if "mlp.1.weight" in missing and "mlp.2.weight" in unexpected:
            hint = (" (the SiLU between the two Linear layers is missing: it is mlp[1], so "
                    "the second Linear is mlp[2])")
        fail(f"{cls.__name__}'s parameters are not named as expected: {'; '.join(parts)}"
             f"{hint} — build every layer in __init__: {layers}")
    return mine.eval()


def _counts(trace: _Trace, name: str) -> tuple[int, int]:
    """How often the layer ``name`` started and finished."""
    return trace.events.count(("start", name)), trace.events.count(("end", name))


# ── Exercise 1 · the context vector ──────────────────────────────────────────────────

_SIZES = tuple(len(values) for values in du.ATTRIBUTE_VALUES)        # (6, 6, 2, 5, 2)
_STARTS = tuple(sum(_SIZES[:i]) for i in range(len(_SIZES)))         # (0, 6, 12, 14, 19)
_D = sum(_SIZES)                                                     # 21
_LAYOUT = (f"the five blocks side by side in ATTRIBUTES order ({', '.join(du.ATTRIBUTES)}), "
           f"{' + '.join(map(str, _SIZES))} = {_D} columns, starting at columns "
           f"{', '.join(map(str, _STARTS))}")


def _vector_cases() -> list[tuple[str, Tensor]]:
    """(description, labels (B, 5)): hand-picked rows (every first and last value, -1 in every
    column), a random batch, a batch asking nothing, one image."""
    rows = [[0, 0, 0, 0, 0], [5, 5, 1, 4, 1], [2, 3, 1, 0, 0], [4, -1, 0, 2, -1],
            [-1, 1, -1, 3, 1], [1, 4, 0, -1, 0], [3, 2, -1, 1, -1], [-1, -1, -1, -1, -1],
            [5, 0, 1, 4, 0]]
    g = torch.Generator().manual_seed(4)
    random_rows = torch.stack([torch.randint(-1, k, (40,), generator=g) for k in _SIZES], dim=1)
    return [("9 hand-picked rows", torch.tensor(rows)),
            ("40 random rows", random_rows),
            ("3 rows of -1 (nothing asked)", torch.full((3, 5), -1)),
            ("one row", torch.tensor([[4, 0, 1, 2, 1]]))]


def _one_hot_blocks(labels: Tensor, *, minus_one: str = "zero", order=range(5)) -> Tensor:
    """One one-hot block per attribute, concatenated in ``order``; ``minus_one`` says what a
    label of -1 becomes: "zero" (right), "last" or "first" (the block's last or first value)."""
    blocks = []
    for i in order:
        k, column = _SIZES[i], labels[:, i]
        index = torch.where(column < 0, k - 1 if minus_one == "last" else 0, column)
        hot = F.one_hot(index, k).float()
        blocks.append(hot * (column >= 0).float()[:, None] if minus_one == "zero" else hot)
    return torch.cat(blocks, dim=1)


def _offset_vector(labels: Tensor, starts, *, add: bool = False, minus_one: str = "zero"
                   ) -> Tensor | None:
    """1 at column start_i + label_i for each attribute i (summed when ``add``); ``minus_one``
    "zero" skips the -1 labels, "offset" lets -1 land on start_i - 1 (Python wraps -1 to the
    last column). None when a column falls outside the 21 (that code would crash)."""
    out = torch.zeros(len(labels), _D)
    for i, start in enumerate(starts):
        column = labels[:, i]
        rows = column >= 0 if minus_one == "zero" else torch.ones_like(column, dtype=torch.bool)
        index = column[rows] + start
        if bool((index >= _D).any()) or bool((index < -1).any()):
            return None
        index = index % _D
        hot = F.one_hot(index, _D).float()
        out[rows] = out[rows] + hot if add else torch.maximum(out[rows], hot)
    return out


def _vector_mistakes(labels: Tensor) -> list[tuple[str, Tensor | None]]:
    early = tuple(max(s - 1, 0) for s in _STARTS)
    return [
        ("a label of -1 set its block's last entry (indexing with -1 picks the last element) "
         "— -1 means \"not asked\": leave that block all zeros",
         _one_hot_blocks(labels, minus_one="last")),
        ("a label of -1 set its block's first entry (clamping -1 to 0 asks for the first "
         "value) — after clamp(min=0), multiply the block by (label >= 0) so that a -1 "
         "leaves it all zeros", _one_hot_blocks(labels, minus_one="first")),
        ("a label of -1 was added to its block's start, so it set the column just before the "
         "block (the previous attribute's last value) — leave the block of a -1 all zeros",
         _offset_vector(labels, _STARTS, minus_one="offset")),
        (f"this is one one-hot over all {_D} columns, with each label counted from column 0 "
         f"— each attribute has its own block: add the block's start "
         f"({', '.join(map(str, _STARTS))}) to the label", _offset_vector(labels, (0,) * 5)),
        (f"this is one one-hot over all {_D} columns, with each label counted from column 0 "
         f"(the overlapping ones add up) — each attribute has its own block: add the block's "
         f"start ({', '.join(map(str, _STARTS))}) to the label",
         _offset_vector(labels, (0,) * 5, add=True)),
        (f"the blocks start one column too early ({', '.join(map(str, early))}) — block i starts "
         f"after the sizes of the blocks before it: {', '.join(map(str, _STARTS))}",
         _offset_vector(labels, early)),
    ]


def _block_order_mistake(out: Tensor, labels: Tensor, *, what: str) -> None:
    """Fail when ``out`` holds the right blocks in another order."""
    for order in itertools.permutations(range(5)):
        if order == tuple(range(5)):
            continue
        if close(out, _one_hot_blocks(labels, order=order)):
            names = ", ".join(du.ATTRIBUTES[i] for i in order)
            fail(f"{what} is not right: the blocks are in the order ({names}) — concatenate "
                 f"them in ATTRIBUTES order ({', '.join(du.ATTRIBUTES)})")


def _numbers(values: Tensor) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values.tolist()) + "]"


def _block_hint(out: Tensor, expected: Tensor) -> str:
    """Which attribute's block differs first, in which row, and what it should hold."""
    diff = (out.detach().double().cpu() - expected.double()).abs().nan_to_num(nan=math.inf)
    for name, start, k in zip(du.ATTRIBUTES, _STARTS, _SIZES):
        block = diff[:, start:start + k]
        if float(block.max()) > 1e-5:
            row = int(block.max(dim=1).values.argmax())
            return (f"the {name} block (columns {start} to {start + k - 1}) is the first that "
                    f"differs: in row {row} it should be "
                    f"{_numbers(expected[row, start:start + k])}, yours is "
                    f"{_numbers(out.detach().cpu()[row, start:start + k])} — a one-hot of the "
                    f"{name} label, all zeros when the label is -1")
    return "compare your blocks with " + _LAYOUT


def _vector_shape_hint(out: Tensor, B: int) -> str:
    shape = tuple(out.shape)
    if out.ndim == 3 and shape[:2] == (B, 5):
        return ("the blocks are stacked, one per attribute: concatenate them side by side "
                "instead, torch.cat(blocks, dim=1), each block as wide as its attribute's "
                f"number of values ({', '.join(map(str, _SIZES))})")
    if shape == (B, 5 * max(_SIZES)):
        return ("every block is as wide as the largest one: each attribute's block has its "
                f"own number of values ({', '.join(map(str, _SIZES))})")
    if shape == (_D, B):
        return "transposed — one row per image: (B, 21)"
    if out.ndim == 2 and shape[0] == B and shape[1] in _SIZES:
        return ("that is one attribute's block only: concatenate all five, "
                "torch.cat(blocks, dim=1)")
    if out.ndim >= 1 and shape[0] != B and out.numel() == B * _D:
        return "concatenate the blocks along dim=1 (the columns), not dim=0 (the batch)"
    return "one row per image: " + _LAYOUT


def _expect_vector(out, B: int, what: str) -> Tensor:
    if isinstance(out, (list, tuple)) and len(out) > 1 and all(
            isinstance(o, Tensor) for o in out):
        fail(f"{what} is a {type(out).__name__} of {len(out)} tensors: concatenate the blocks "
             "into one tensor, torch.cat(blocks, dim=1)")
    if isinstance(out, Tensor) and tuple(out.shape) == (B, _D) and out.dtype != torch.float32:
        fail(f"{what} should have dtype torch.float32, got {out.dtype} — "
             + ("convert with .float()" if out.dtype.is_floating_point else
                "F.one_hot and comparisons give integers or booleans: convert with .float()"))
    return expect_tensor(out, shape=(B, _D), dtype=torch.float32, what=what,
                         shape_hint=_vector_shape_hint(out, B) if isinstance(out, Tensor)
                         else None)


def _vector_crash(err: Exception) -> str | None:
    text = str(err)
    if "non-negative" in text:
        return ("F.one_hot cannot take the label -1: clamp the labels first, "
                "labels.clamp(min=0), then zero the blocks whose label is -1 (multiply by "
                "(labels[:, i] >= 0))")
    if "smaller than num_classes" in text:
        return ("F.one_hot(label, k) needs labels below k: give each attribute its own number "
                f"of values ({', '.join(map(str, _SIZES))})")
    if "out of bounds" in text or "out of range" in text:
        return (f"a column past the {_D} was asked for: the blocks start at columns "
                f"{', '.join(map(str, _STARTS))} (each after the sizes of the ones before it), "
                "and a label of -1 sets nothing")
    if "stack expects each tensor to be equal size" in text:
        return ("the blocks have different widths: concatenate them, torch.cat(blocks, "
                "dim=1), instead of stacking")
    return None


@exercise_check("Exercise 1 · The context vector: attributes as a multi-hot vector")
def check_attribute_vector(fn) -> str:
    for name, labels in _vector_cases():
        what = f"attribute_vector of {name}"
        expected = du.attribute_vector(labels)                # the reference, before yours
        mistakes = _vector_mistakes(labels)
        out = _run(fn, labels.clone(), what=what, names=("labels",), explain=_vector_crash)
        out = _expect_vector(out, len(labels), what)
        if not close(out, expected):
            _name_mistake(out, mistakes, what=what)
            _block_order_mistake(out, labels, what=what)
        compare(out, expected, {}, what=what,
                item_names=[f"labels {row}" for row in labels.tolist()],
                term_hint=_block_hint(out, expected))
    probe_device(fn, labels, what="attribute_vector(labels)")
    return (f"one one-hot block per attribute, {' + '.join(map(str, _SIZES))} = {_D} columns, "
            "a -1 leaves its block zero")


# ── Exercise 2 · the attribute embedding ─────────────────────────────────────────────

_EMBEDDING_LAYERS = ("self.mlp = nn.Sequential(nn.Linear(attribute_dim, time_dim), nn.SiLU(), "
                     "nn.Linear(time_dim, time_dim)) and self.null = "
                     "nn.Parameter(torch.zeros(time_dim))")


def _embedding_batch() -> tuple[Tensor, list[str]]:
    """Context vectors (8, 21): full, empty, partial, mixed, signed and dense rows."""
    full = du.attribute_vector(torch.tensor([[4, 0, 1, 2, 1], [2, 5, 0, 4, 0]]))
    shape_only = du.attribute_vector(torch.tensor([[1, -1, -1, -1, -1]]))[0]
    mixed = du.attribute_vector(torch.tensor([[-1, 2, -1, -1, -1]]))[0]
    mixed[[0, 3]] = 0.5                                  # half a circle, half a diamond
    signed = torch.zeros(_D)
    signed[[0, 1]] = torch.tensor([0.5, -0.5])           # sums to zero, yet asks something
    spread = torch.cat([torch.full((k,), 1 / k) for k in _SIZES])   # a bit of every value
    zeros = torch.zeros(_D)
    rows = [full[0], zeros, shape_only, mixed, signed, zeros, spread, full[1]]
    names = ["a full vector", "all zeros", "only the shape", "0.5 circle + 0.5 diamond, yellow",
             "+0.5 and -0.5", "all zeros", "1/K for every value", "a full vector"]
    return torch.stack(rows), names


def _embedding_variants(e: nn.Module, c: Tensor, *, whole_batch: bool
                        ) -> list[tuple[str, Tensor]]:
    emb = e.mlp(c)                                       # (B, time_dim)
    null = e.null.expand_as(emb)
    is_null = (c == 0).all(dim=1, keepdim=True)          # (B, 1)
    hidden = e.mlp[0](c)

    def pick(rows, value=emb):
        return torch.where(rows, null, value)

    never = ("every row got self.mlp(c), the all-zero rows too, although a batch of zeros "
             "gets self.null: decide row by row, is_null = (c == 0).all(dim=1, keepdim=True), "
             "not once for the whole batch (c.sum() == 0 or (c == 0).all() looks at every row "
             "at once)") if whole_batch else (
        "the all-zero rows (\"nothing asked\") did not get self.null: an all-zero row gets the "
        "learned null embedding, the others self.mlp(c) — torch.where(is_null, self.null, emb) "
        "with is_null = (c == 0).all(dim=1, keepdim=True)")
    return [
        ("every row got self.null: only the all-zero rows get it — is_null = "
         "(c == 0).all(dim=1, keepdim=True)", null),
        (never, emb),
        ("the all-zero rows got zeros: they get the learned null embedding self.null (a "
         "parameter, so that it can learn) — torch.where(is_null, self.null, emb)",
         torch.where(is_null, torch.zeros_like(emb), emb)),
        ("the all-zero rows got self.mlp(c) + self.null: they get self.null alone "
         "(torch.where chooses between the two, it does not add)", emb + null * is_null),
        ("a row with some zero entries got self.null (.any where .all belongs): only a row "
         "whose every entry is zero asks nothing — (c == 0).all(dim=1, keepdim=True)",
         pick((c == 0).any(dim=1, keepdim=True))),
        ("a row whose entries sum to zero (here +0.5 and -0.5) got self.null although it asks "
         "something: the null rows are those whose every entry is zero — "
         "(c == 0).all(dim=1, keepdim=True), not c.sum(dim=1) == 0",
         pick(c.sum(dim=1, keepdim=True) == 0)),
        ("the SiLU between the two Linear layers is missing — e(c) = W₂ SiLU(W₁ c + b₁) + b₂ "
         "(self.mlp(c) runs all three)", pick(is_null, e.mlp[2](hidden))),
        ("there is a SiLU after the last Linear layer too — the embedding is "
         "W₂ SiLU(W₁ c + b₁) + b₂, self.mlp(c) as it is", pick(is_null, F.silu(emb))),
        ("ReLU where SiLU belongs — e(c) = W₂ SiLU(W₁ c + b₁) + b₂",
         pick(is_null, e.mlp[2](F.relu(hidden)))),
    ]


_EMBEDDING_STEPS = [("mlp.0", "it gets the context vectors c as they are, (B, attribute_dim)"),
                    ("mlp.2", "it gets SiLU(self.mlp[0](c))")]
_EMBEDDING_SHAPE_HINT = ("the embedding is added to the time embedding, so it is (B, time_dim): "
                         "choose row by row between self.mlp(c) and self.null "
                         "(torch.where(is_null, self.null, emb)), do not concatenate them")


def _embedding_crash(err: Exception) -> str | None:
    text = str(err)
    if "must match the size" in text or "broadcast" in text:
        return ("is_null must be (B, 1) to choose whole rows of the (B, time_dim) embedding: "
                "(c == 0).all(dim=1, keepdim=True), or add [:, None]")
    if "mat1 and mat2" in text:
        return "self.mlp takes the context vectors c, (B, attribute_dim)"
    return None


def _embedding_case(cls, ref: nn.Module, c: Tensor, names, *, whole_batch: bool) -> nn.Module:
    """Compare the learner's embedding with ``ref`` on ``c``; returns the learner's module."""
    attribute_dim, time_dim = ref.mlp[0].in_features, ref.null.numel()
    mine = _learner_module(cls, ref, attribute_dim, time_dim, layers=_EMBEDDING_LAYERS)
    what = f"{cls.__name__}({attribute_dim}, {time_dim}) on {len(c)} context vectors"
    parts = [name for name, _ in _EMBEDDING_STEPS]
    with torch.no_grad(), _Trace(ref, parts) as ref_trace:
        expected = ref(c)                                     # the reference, before yours
        wrong = _embedding_variants(ref, c, whole_batch=whole_batch)
    with _Trace(mine, parts) as trace:
        out = _run(mine, c.clone(), what=what, names=("c",), explain=_embedding_crash)
    out = expect_tensor(out, shape=(len(c), time_dim), what=f"the output of {what}",
                        shape_hint=_EMBEDDING_SHAPE_HINT)
    again = _run(mine, c.clone(), what=what, names=("c",), explain=_embedding_crash)
    if not isinstance(again, Tensor) or not close(again, out, atol=1e-6, rtol=1e-6):
        fail(f"{what}: two calls on the same c gave different embeddings, so a layer is created "
             "inside forward (fresh random weights on every call, never trained): build every "
             "layer in __init__ and only use them in forward")
    if not close(out, expected, atol=1e-5, rtol=1e-4):
        _name_mistake(out, wrong, what=f"the output of {what}", atol=1e-5, rtol=1e-4)
    compare(out, expected, {}, what=f"the output of {what}", atol=1e-5, rtol=1e-4,
            item_names=names,
            term_hint=_first_difference(trace, ref_trace, _EMBEDDING_STEPS,
                                        "self.mlp(c) matches: return it for the rows that ask "
                                        "something and self.null for the all-zero rows"))
    return mine


def _unet_with(cls) -> tuple[nn.Module, nn.Module]:
    """A small reference UNet with every weight random and the same UNet built with the
    learner's embedding, holding the same weights."""
    config = du.UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                           attention_resolutions=(), groups=4, image_size=8,
                           attribute_dim=_D)
    ref = _scramble(du.UNet(config), seed=40)
    try:
        mine = du.UNet(config, attribute_embedding=cls)
    except (TypeError, ValueError, RuntimeError) as err:
        fail(f"du.UNet could not build your {cls.__name__}(attribute_dim, time_dim): "
             f"{type(err).__name__}: {err}")
    mine.load_state_dict(ref.state_dict())
    return ref, mine.eval()


def _check_in_unet(cls) -> None:
    """The condition reaches the UNet's output, and the loss's gradient every parameter."""
    ref, mine = _unet_with(cls)
    g = torch.Generator().manual_seed(41)
    x = torch.randn(1, 3, 8, 8, generator=g).expand(4, -1, -1, -1).contiguous()
    t = torch.full((4,), 3)
    c = torch.cat([du.attribute_vector(torch.tensor([[4, 0, 1, 2, 1], [0, 4, 0, 0, 0]])),
                   torch.zeros(1, _D), du.attribute_vector(torch.tensor([[1, -1, -1, -1, -1]]))])
    names = ["a red star", "a blue circle", "nothing asked", "only the shape"]
    what = f"du.UNet built with your {cls.__name__}"
    with torch.no_grad():
        expected = ref(x, t, attributes=c)
        expected_null = ref(x, t, attributes=torch.zeros_like(c))
    out = _run(mine, x.clone(), t.clone(), what=what, names=("x", "t"), attributes=c.clone())
    out = expect_tensor(out, shape=tuple(x.shape), what=f"the output of {what}")
    if close(out[0], out[1], atol=1e-6, rtol=1e-6):
        fail(f"{what}: two different conditions (a red star, a blue circle) gave the same "
             "output for the same x_t and t, so the condition does not reach the model")
    compare(out, expected, {}, what=f"the output of {what}", atol=1e-4, rtol=1e-3, item_names=names)
    out_null = _run(mine, x.clone(), t.clone(), what=what, names=("x", "t"),
                    attributes=torch.zeros_like(c))
    compare(out_null, expected_null, {}, what=f"the output of {what} for all-zero attributes",
            atol=1e-4, rtol=1e-3, term_hint="an all-zero context vector gets self.null")
    mine.zero_grad(set_to_none=True)
    with torch.enable_grad():
        mine(x, t, attributes=c).square().mean().backward()
    for name, p in mine.attribute_emb.named_parameters():
        if p.grad is None or not bool(p.grad.abs().sum() > 0):
            fail(f"{what}: no gradient of the loss reaches `{name}` of your {cls.__name__}, so "
                 "training would never change it — inside forward, torch.no_grad(), .detach() "
                 "or .data cut it off: use the layers and self.null themselves")


@exercise_check("Exercise 2 · Joining the condition to the time embedding")
@_own_random_numbers
def check_attribute_embedding(cls) -> str:
    time_dim = 12
    ref = _scramble(du.AttributeEmbedding(_D, time_dim), seed=42)
    zeros = torch.zeros(2, _D)
    _embedding_case(cls, ref, zeros, ["all zeros", "all zeros"], whole_batch=False)
    c, names = _embedding_batch()
    mine = _embedding_case(cls, ref, c, names, whole_batch=True)
    _check_in_unet(cls)
    _probe_module(mine, c, what=f"{cls.__name__}({_D}, {time_dim})")
    return ("W₂ SiLU(W₁ c + b₁) + b₂ for the rows that ask something, the learned null for "
            "all-zero rows; it changes the UNet's output and learns with it")


# ── Exercise 3 · cross-attention ─────────────────────────────────────────────────────


def _cross_variants(a: nn.Module, x: Tensor, context: Tensor, mask: Tensor | None
                    ) -> list[tuple[str, Tensor]]:
    """The output that each usual mistake gives."""
    B, C, H, W = x.shape
    heads, N, L = a.heads, H * W, context.shape[1]
    d = C // heads
    tokens = a.norm(x).flatten(2).transpose(1, 2)                 # (B, N, C)
    raw = x.flatten(2).transpose(1, 2)                            # (B, N, C), not normalised

    def split(z):                                                 # (B, n, C) -> (B, heads, n, d)
        return z.view(B, z.shape[1], heads, d).transpose(1, 2)

    def attend(q, k, v, *, scale=math.sqrt(d), dim=-1, keep=mask, how="fill"):
        scores = q @ k.transpose(-1, -2) / scale                  # (B, heads, N, L)
        m = None if keep is None else keep[:, None, None, :]      # (B, 1, 1, L)
        if m is not None and how == "fill":
            scores = scores.masked_fill(~m, -math.inf)
        if m is not None and how == "zero":
            scores = scores * m
        weights = scores.softmax(dim=dim)
        if m is not None and how == "after":
            weights = weights * m
        return weights @ v                                        # (B, heads, N, d)

    def merge(o):                                                 # (B, heads, N, d) -> (B, N, C)
        return o.transpose(1, 2).reshape(B, N, C)

    def finish(o, *, residual=x, proj=True, back="right"):        # (B, N, C) -> (B, C, H, W)
        o = a.proj(o) if proj else o
        image = {"right": lambda: o.transpose(1, 2).reshape(B, C, H, W),
                 "reshape": lambda: o.reshape(B, C, H, W),
                 "swapped": lambda: o.transpose(1, 2).reshape(B, C, W, H).transpose(2, 3)}[back]()
        return image if residual is None else residual + image

    def from_kv(kv_in, q_in=tokens, **options):
        k, v = a.kv(kv_in).chunk(2, dim=-1)
        return finish(merge(attend(split(a.q(q_in)), split(k), split(v), **options)))

    q = split(a.q(tokens))
    k, v = (split(z) for z in a.kv(context).chunk(2, dim=-1))
    right = merge(attend(q, k, v))
    q1, k1, v1 = (z[:, None] for z in (a.q(tokens), *a.kv(context).chunk(2, dim=-1)))  # 1 head
    wrong_split = attend(a.q(tokens).reshape(B, heads, N, d),
                         *(z.reshape(B, heads, L, d) for z in a.kv(context).chunk(2, dim=-1)))
    variants = [
        ("the residual is missing — return x + the attention's output",
         finish(right, residual=None)),
        ("the residual adds norm(x) — add the block's input x itself",
         finish(right, residual=a.norm(x))),
        ("the output projection self.proj is missing — apply it to the merged heads (B, H*W, C)",
         finish(right, proj=False)),
        ("the scores are not scaled — divide q kᵀ by sqrt(d), d = C // heads",
         finish(merge(attend(q, k, v, scale=1.0)))),
        ("the scores are divided by d — divide by sqrt(d), d = C // heads",
         finish(merge(attend(q, k, v, scale=d)))),
        ("the scores are divided by sqrt(C) — d is the width of one head: sqrt(d), "
         "d = C // heads", finish(merge(attend(q, k, v, scale=math.sqrt(C))))),
        ("the scores are divided by C — divide by sqrt(d), the square root of one head's width "
         "d = C // heads", finish(merge(attend(q, k, v, scale=C)))),
        ("softmax runs over the pixels — each pixel's weights over the caption's tokens sum to "
         "1: softmax over the keys, the last axis (dim=-1)",
         finish(merge(attend(q, k, v, dim=-2)))),
        ("k and v are swapped — k, v = self.kv(context).chunk(2, dim=-1): the first half "
         "gives the keys", finish(merge(attend(q, v, k)))),
        ("q comes from the un-normalised x — the queries are self.q of the tokens of "
         "self.norm(x)", from_kv(context, q_in=raw)),
        ("the heads are not split — split q (B, H*W, C) and k, v (B, L, C) into heads, "
         "view(B, n, heads, d).transpose(1, 2), so that each head attends on its own",
         finish(attend(q1, k1, v1, scale=math.sqrt(C))[:, 0])),
        ("the heads are not split (q, k and v are used whole) — view(B, n, heads, d)"
         ".transpose(1, 2) first, so that each head attends on its own",
         finish(attend(q1, k1, v1)[:, 0])),
        ("the heads are split wrongly — (B, n, C) -> view(B, n, heads, d).transpose(1, 2), "
         "not reshape(B, heads, n, d)", finish(merge(wrong_split))),
        ("the heads are split wrongly — (B, n, C) -> view(B, n, heads, d).transpose(1, 2), "
         "not reshape(B, heads, n, d) (and back with transpose(1, 2).reshape(B, n, C))",
         finish(wrong_split.reshape(B, N, C))),
        ("the heads are merged wrongly — (B, heads, H*W, d) -> transpose(1, 2)"
         ".reshape(B, H*W, C)", finish(attend(q, k, v).reshape(B, N, C))),
        ("the tokens go back to an image wrongly — (B, H*W, C) -> transpose(1, 2) before "
         "reshape(B, C, H, W)", finish(right, back="reshape")),
        ("the tokens go back to an image with H and W swapped — the pixels were flattened "
         "row by row (flatten(2)), so (B, H*W, C) -> .transpose(1, 2).reshape(B, C, H, W)",
         finish(right, back="swapped")),
    ]
    if mask is not None:
        variants += [
            ("the mask is ignored — the padding tokens (context_mask False) must get no "
             "weight: pass attn_mask=context_mask[:, None, None, :], or masked_fill(~mask, "
             "-inf) the scores before the softmax", finish(merge(attend(q, k, v, keep=None)))),
            ("the mask is inverted — context_mask is True for the real tokens, the ones to "
             "attend to; the padding (False) gets no weight",
             finish(merge(attend(q, k, v, keep=~mask)))),
            ("the padding's weights were zeroed after the softmax, so the real tokens' weights "
             "no longer sum to 1 — mask the scores before it: masked_fill(~mask, -inf)",
             finish(merge(attend(q, k, v, how="after")))),
            ("the padding's scores were set to 0 instead of -inf: exp(0) = 1 still gives them "
             "weight — masked_fill(~mask, float('-inf')) before the softmax",
             finish(merge(attend(q, k, v, how="zero")))),
        ]
    if context.shape[2] == C:   # only then do these run without an error
        variants += [
            ("the keys and values come from x, so the pixels attend to themselves — k, v = "
             "self.kv(context): the pixels look at the caption's tokens", from_kv(tokens)),
            ("the keys and values come from the un-normalised x — k, v = self.kv(context): "
             "the pixels look at the caption's tokens", from_kv(raw)),
            ("self.norm was applied to the context — it normalises the feature map x; the "
             "context goes to self.kv as it is",
             from_kv(a.norm(context.transpose(1, 2)).transpose(1, 2))),
        ]
    return variants


_CROSS_LAYERS = ("self.norm = nn.GroupNorm(groups, channels), self.q = nn.Linear(channels, "
                 "channels), self.kv = nn.Linear(context_dim, 2 * channels) and self.proj = "
                 "nn.Linear(channels, channels)")
_CROSS_STEPS = [
    ("norm", "it gets the block's input x, (B, C, H, W)"),
    ("q", "it gets the pixels' tokens self.norm(x).flatten(2).transpose(1, 2), (B, H*W, C)"),
    ("kv", "it gets the context as it is, (B, L, context_dim): keys and values come from the "
           "caption's tokens"),
    ("proj", "it gets softmax(q kᵀ / sqrt(d) + mask) v with the heads merged back: "
             "(B, heads, H*W, d) -> .transpose(1, 2).reshape(B, H*W, C)"),
]


def _cross_crash(trace: _Trace) -> str | None:
    started, ended = _counts(trace, "norm")
    if started > ended:
        return ("self.norm takes the feature map x (B, C, H, W); the context goes to self.kv as "
                "it is, without a norm")
    for name, should in _CROSS_STEPS:
        started, ended = _counts(trace, name)
        if started > ended:
            return f"self.{name} cannot take what it was given: {should}"
    if trace.finished("proj"):
        return ("turn the tokens back into an image: (B, H*W, C) -> .transpose(1, 2)"
                ".reshape(B, C, H, W), then add x")
    if trace.finished("kv"):
        return ("split q (B, H*W, C) and k, v (B, L, C) into heads with .view(B, n, heads, d)"
                ".transpose(1, 2), d = C // heads; the mask (B, L) becomes (B, 1, 1, L) to "
                "broadcast over the heads and the pixels")
    return None


def _cross_cases():
    """(heads, (H, W), context_dim, L, real tokens per row or None): H != W; the first case has
    context_dim = C, so that attending to x instead of the context gives a value to name."""
    return [(2, (5, 3), 16, 4, None), (4, (4, 6), 6, 5, (3, 1, 4)), (1, (3, 2), 6, 3, (1, 2))]


@exercise_check("Exercise 3 · Cross-attention: pixels look at the caption's words")
@_own_random_numbers
def check_cross_attention(cls) -> str:
    C = 16
    parts = [name for name, _ in _CROSS_STEPS]
    probes = []
    for i, (heads, (H, W), context_dim, L, real) in enumerate(_cross_cases()):
        B = 2 if real is None else len(real)
        g = torch.Generator().manual_seed(50 + i)
        ref = _scramble(du.CrossAttention(C, context_dim, heads=heads, groups=4), seed=51 + i)
        mine = _learner_module(cls, ref, C, context_dim, heads=heads, groups=4,
                               layers=_CROSS_LAYERS)
        x = torch.randn(B, C, H, W, generator=g)
        context = torch.randn(B, L, context_dim, generator=g)
        mask = None if real is None else torch.arange(L)[None, :] < torch.tensor(real)[:, None]
        what = (f"{cls.__name__}({C}, {context_dim}, heads={heads}) on a {H}x{W} map, "
                + ("no mask" if mask is None else
                   f"with a mask keeping {list(real)} of {L} tokens"))
        with torch.no_grad(), _Trace(ref, parts) as ref_trace:
            expected = ref(x, context, mask)                      # the reference, before yours
            wrong = _cross_variants(ref, x, context, mask)
        inputs = (x.clone(), context.clone(), None if mask is None else mask.clone())
        with _Trace(mine, parts) as trace:
            out = _run(mine, *inputs, what=what, names=("x", "context", "context_mask"),
                       explain=lambda err: _cross_crash(trace))
        if isinstance(out, Tensor) and out.shape == expected.shape:
            if not close(out, expected, atol=1e-4, rtol=1e-3):
                _name_mistake(out, wrong, what=f"the output of {what}", atol=1e-4, rtol=1e-3)
        out = expect_tensor(out, shape=(B, C, H, W), what=f"the output of {what}",
                            shape_hint="the output has x's shape (B, C, H, W): turn the tokens "
                                       "back with .transpose(1, 2).reshape(B, C, H, W)")
        if mask is not None and not close(out, expected, atol=1e-4, rtol=1e-3):
            _padding_matters(mine, x, context, mask, out, what=what)
        compare(out, expected, {}, what=f"the output of {what}", atol=1e-4, rtol=1e-3,
                term_hint=_first_difference(trace, ref_trace, _CROSS_STEPS,
                                            "the steps inside match up to self.proj: turn its "
                                            "output back into an image with .transpose(1, 2)"
                                            ".reshape(B, C, H, W) and add x"))
        probes.append((mine, x, context, mask, what))
    for mine, x, context, mask, what in probes[:2]:           # without a mask and with one
        _probe_module(mine, x, context, mask, what=what)
    return ("queries from the pixels, keys and values from the context, softmax(q kᵀ / sqrt(d)) "
            "over the real tokens only, per head, output projection, residual")


def _padding_matters(mine: nn.Module, x: Tensor, context: Tensor, mask: Tensor, out: Tensor,
                     *, what: str) -> None:
    """Fail when other values in the padding tokens change the learner's output."""
    other = context.clone()
    g = torch.Generator().manual_seed(59)
    other[~mask] = 3 * torch.randn(other[~mask].shape, generator=g)
    again = _run(mine, x.clone(), other, mask.clone(), what=what,
                 names=("x", "context", "context_mask"))
    if isinstance(again, Tensor) and not close(again, out, atol=1e-4, rtol=1e-3):
        fail(f"{what}: other values in the padding tokens (context_mask False) changed the "
             "output — the padding must get no weight at all: masked_fill(~mask, -inf) on the "
             "scores (B, heads, H*W, L) with the mask as (B, 1, 1, L), before the softmax")


# ── Exercise 4 · condition dropout ───────────────────────────────────────────────────


def _drop(fn, c: Tensor, p: float, *, what: str, **kwargs) -> Tensor:
    """Call the learner's drop_condition; check the output's shape, dtype and rows."""
    try:
        out = call_pure(fn, c.clone(), p, names=("c", "p"), **kwargs)
    except TypeError as err:
        if "generator" not in str(err):
            raise
        fail("drop_condition does not accept the `generator` keyword: keep "
             "`*, generator=None` in its signature and draw with it, torch.rand(B, "
             f"generator=generator, device=c.device) (PyTorch said: {err})")
    return expect_tensor(out, shape=tuple(c.shape), dtype=c.dtype, what=what,
                         shape_hint="the output has c's shape (B, D): zero whole rows of c")


def _rows(out: Tensor, c: Tensor, p: float, *, what: str) -> Tensor:
    """Which rows were dropped (B,) bool; fails unless each row is c's row or all zeros."""
    kept = (out == c).all(dim=1)
    dropped = (out == 0).all(dim=1)
    other = ~(kept | dropped)
    if not bool(other.any()):
        return dropped
    r = int(other.nonzero()[0])
    rows, base = out[other], c[other]
    partly = ((rows == 0).any(dim=1) & (rows != 0).any(dim=1))
    if bool(partly.any()):
        scaled = bool(torch.allclose(rows[rows != 0], (base / (1 - p))[rows != 0], rtol=1e-4,
                                     atol=1e-6)) if p < 1 else False
        fail(f"{what}: single entries were dropped, not whole rows (row {r} is partly zero)"
             + (" and the rest scaled by 1/(1 - p): that is F.dropout / nn.Dropout, which "
                "drops entries one by one" if scaled else "")
             + " — draw one number per row, keep = torch.rand(B, device=c.device) >= p, and "
               "zero the whole row: c * keep[:, None]")
    ratio = rows / base
    if p < 1 and torch.allclose(ratio, torch.full_like(ratio, 1 / (1 - p)), rtol=1e-4):
        fail(f"{what}: the rows that are kept were scaled by 1/(1 - p) = {1 / (1 - p):.3g} — "
             "that is what nn.Dropout and F.dropout do; here the kept rows stay exactly as "
             "they are and the dropped ones become zeros")
    if torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4) and not bool(
            (rows == rows[:, :1]).all()):
        fail(f"{what}: the rows that are kept were scaled (row {r} is {float(ratio[0, 0]):.3g} "
             "times c's row) — keep them exactly as they are")
    shown = ", ".join(f"{v:.3g}" for v in out[r, :4].tolist())
    fail(f"{what}: row {r} is neither c's row nor all zeros (it starts {shown}, ...) — a dropped "
         "row becomes all zeros, the null condition \"nothing asked\" (not -1, not the mean), "
         "and a kept row stays exactly as it is")


def _check_fraction(dropped: Tensor, p: float, *, what: str) -> None:
    """About a fraction p of the rows dropped, in each half of the batch too."""
    B = len(dropped)
    share = float(dropped.float().mean())
    tolerance = 5 * math.sqrt(p * (1 - p) / B)                    # 5 standard deviations
    if share in (0.0, 1.0):
        fail(f"{what}: {'every' if share else 'no'} row was dropped with p = {p}: one decision "
             "was made for the whole batch — draw one number per row, torch.rand(B, "
             "device=c.device), and drop the rows whose number is below p")
    if abs(share - (1 - p)) <= tolerance < abs(share - p):
        fail(f"{what}: {share:.1%} of the rows were dropped with p = {p}: the rows are kept with "
             "probability p instead of dropped — drop a row when its number is below p "
             "(keep = u >= p)")
    if abs(share - p) > tolerance:
        fail(f"{what}: {share:.1%} of the {B} rows were dropped; with p = {p} about {p:.0%} "
             f"(± {tolerance:.1%}) should be — drop each row with probability p: "
             "torch.rand(B, device=c.device) < p")
    halves = [float(half.float().mean()) for half in dropped.chunk(2)]
    tolerance = 5 * math.sqrt(p * (1 - p) / (B // 2))
    if any(abs(h - p) > tolerance for h in halves):
        fail(f"{what}: the dropped rows are not spread over the batch ({halves[0]:.1%} of the "
             f"first half, {halves[1]:.1%} of the second, for p = {p}) — decide each row on "
             "its own, torch.rand(B, device=c.device) < p, not a block of rows")


@exercise_check("Exercise 4 · Condition dropout")
@_own_random_numbers
def check_drop_condition(fn) -> str:
    g = torch.Generator().manual_seed(60)
    small = torch.rand(6, _D, generator=g) + 0.5                   # no zero entry anywhere
    big = torch.rand(4000, _D, generator=g) + 0.5
    p = 0.3
    out = _drop(fn, small, 0.0, what="drop_condition(c, p=0)")
    if bool((out == 0).all()):
        fail("drop_condition(c, p=0) dropped every row: the rows are dropped with "
             "probability p, so p = 0 keeps them all (keep = u >= p, not u < p)")
    dropped = _rows(out, small, 0.0, what="drop_condition(c, p=0)")
    if bool(dropped.any()):
        fail("drop_condition(c, p=0) dropped rows: with p = 0 every row is kept")
    counts, masks = [], []
    for seed in (61, 62, 63):
        torch.manual_seed(seed)
        what = f"drop_condition(c, p={p}) on {len(big)} rows"
        dropped = _rows(_drop(fn, big, p, what=what), big, p, what=what)
        _check_fraction(dropped, p, what=what)
        counts.append(int(dropped.sum()))
        masks.append(dropped)
    if torch.equal(masks[0], masks[1]):
        fail(f"drop_condition(c, p={p}) dropped the same rows in two calls: draw fresh "
             "random numbers on every call (no fixed seed, no fixed pattern inside)")
    if len(set(counts)) == 1 and counts[0] in (math.floor(p * len(big)),
                                                round(p * len(big))):
        fail(f"drop_condition(c, p={p}) dropped exactly {counts[0]} rows in every call: "
             "decide each row on its own, torch.rand(B, device=c.device) < p, so that the "
             "number dropped varies from call to call")
    out = _drop(fn, small, 1.0, what="drop_condition(c, p=1)")
    if not bool((out == 0).all()):
        fail("drop_condition(c, p=1) kept rows: with p = 1 every row becomes zeros")
    what = f"drop_condition(c, p={p}, generator=...)"
    same = [_drop(fn, big[:500], p, what=what,
                  generator=torch.Generator().manual_seed(64)) for _ in range(2)]
    if not torch.equal(same[0], same[1]):
        fail(f"{what}: two generators with the same seed gave different rows dropped — use "
             "the generator: torch.rand(B, generator=generator, device=c.device)")
    c64 = small.double()
    _rows(_drop(fn, c64, 0.5, what="drop_condition of float64 c"), c64, 0.5,
          what="drop_condition of float64 c")
    probe_device(fn, small, p, what=f"drop_condition(c, p={p})")
    return ("whole rows zeroed with probability p, independently, the others unchanged; "
            "fresh draws each call, reproducible with a generator")

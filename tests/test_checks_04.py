"""Tests of lesson 04's exercise checks: the reference passes, a stub is "not attempted", right
versions written in other forms pass, and each planted mistake (the ones learners make, an
input changed in place, a tensor made on the CPU, a NaN) fails with a hint that names it."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffusion_checks as dc
import diffusion_utilities as du

from check_helpers import DEVICE, GENERIC, IN_PLACE, NAN, cases  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = (6, 6, 2, 5, 2)
STARTS = (0, 6, 12, 14, 19)


# -- attribute_vector --


def vector_stub(labels):
    raise NotImplementedError()


def vector_loop(labels):
    """Row by row, attribute by attribute, with Python integers."""
    out = torch.zeros(len(labels), 21, device=labels.device)
    for row, values in enumerate(labels.tolist()):
        for start, value in zip(STARTS, values):
            if value >= 0:
                out[row, start + value] = 1.0
    return out


def vector_scatter(labels):
    starts = torch.tensor(STARTS, device=labels.device)
    index = labels.clamp(min=0) + starts                      # (B, 5) columns
    asked = (labels >= 0).float()
    return torch.zeros(len(labels), 21, device=labels.device).scatter_(1, index, asked)


def vector_cat_masked(labels):
    blocks = [F.one_hot(labels[:, i].clamp(min=0), k) * (labels[:, i:i + 1] >= 0)
              for i, k in enumerate(SIZES)]
    return torch.cat(blocks, dim=1).to(torch.float32)


def vector_index_put(labels):
    B = len(labels)
    rows = torch.arange(B, device=labels.device)[:, None].expand(B, 5)
    columns = labels.clamp(min=0) + torch.tensor(STARTS, device=labels.device)
    values = (labels >= 0).to(torch.float32)
    return torch.zeros(B, 21, device=labels.device).index_put_((rows, columns), values,
                                                                accumulate=True)


def vector_eye_extra_row(labels):
    """torch.eye(k + 1)[-1] is the extra last row, zero in the first k columns."""
    blocks = [torch.eye(k + 1, device=labels.device)[labels[:, i]][:, :k]
              for i, k in enumerate(SIZES)]
    return torch.cat(blocks, dim=1)


def vector_offsets(starts, *, add=False, skip_minus_one=True):
    def attribute_vector(labels):
        out = torch.zeros(len(labels), 21, device=labels.device)
        for i, start in enumerate(starts):
            column = labels[:, i]
            rows = column >= 0 if skip_minus_one else torch.ones_like(column, dtype=torch.bool)
            hot = F.one_hot(column[rows] + start, 21).float() if add else None
            if add:
                out[rows] += hot
            else:
                out[rows.nonzero()[:, 0], column[rows] + start] = 1.0
        return out
    return attribute_vector


def vector_blocks(*, minus_one="zero", order=range(5), dtype=torch.float32, divide=False):
    def attribute_vector(labels):
        blocks = []
        for i in order:
            k, column = SIZES[i], labels[:, i]
            if minus_one == "last":
                hot = torch.eye(k, device=labels.device)[column]          # -1 picks the last row
            elif minus_one == "one_hot":
                hot = F.one_hot(column, k).float()                       # fails on -1
            else:
                hot = F.one_hot(column.clamp(min=0), k).float()
                if minus_one == "zero":
                    asked = (column >= 0).float()[:, None]
                    hot = hot * asked / asked if divide else hot * asked
            blocks.append(hot)
        return torch.cat(blocks, dim=1).to(dtype)
    return attribute_vector


def vector_stacked(labels):
    return F.one_hot(labels.clamp(min=0), 6).float() * (labels >= 0).float()[..., None]


def vector_list(labels):
    return [F.one_hot(labels[:, i].clamp(min=0), k).float() * (labels[:, i:i + 1] >= 0)
            for i, k in enumerate(SIZES)]


def vector_torch_stack(labels):
    return torch.stack(vector_list(labels), dim=1)


def vector_last_block_only(labels):
    return vector_list(labels)[-1]


def vector_in_place(labels):
    asked = labels >= 0
    labels.clamp_(min=0)
    return torch.cat([F.one_hot(labels[:, i], k).float() * asked[:, i:i + 1]
                      for i, k in enumerate(SIZES)], dim=1)


def vector_cpu_zeros(labels):
    out = torch.zeros(len(labels), 21)                        # made on the CPU
    return out + vector_scatter(labels)


def vector_light_is_zero(labels):
    out = du.attribute_vector(labels)
    return torch.cat([out[:, :19], out[:, 19:].flip(1)], dim=1)  # background read backwards


VECTOR_MISTAKES = [
    ("no_offsets", vector_offsets((0,) * 5), "one one-hot over all 21 columns"),
    ("no_offsets_summed", vector_offsets((0,) * 5, add=True), "(the overlapping ones add up)"),
    ("offsets_early", vector_offsets((0, 5, 11, 13, 18)), "the blocks start one column too early"),
    ("offsets_are_ends", vector_offsets((6, 12, 14, 19, 21)), "a column past the 21"),
    ("reversed_order", vector_blocks(order=range(4, -1, -1)),
     "the blocks are in the order (background, position, size, colour, shape)"),
    ("colour_first", vector_blocks(order=(1, 0, 2, 3, 4)), "in the order (colour, shape, size"),
    ("minus_one_last", vector_blocks(minus_one="last"), "set its block's last entry"),
    ("minus_one_first", vector_blocks(minus_one="first"), "set its block's first entry"),
    ("minus_one_plus_offset", vector_offsets(STARTS, skip_minus_one=False),
     "added to its block's start"),
    ("one_hot_of_minus_one", vector_blocks(minus_one="one_hot"), "cannot take the label -1"),
    ("long", vector_blocks(dtype=torch.long), "convert with .float()"),
    ("bool", vector_blocks(dtype=torch.bool), "convert with .float()"),
    ("stacked_B_5_6", vector_stacked, "the blocks are stacked, one per attribute"),
    ("list_of_blocks", vector_list, "concatenate the blocks into one tensor"),
    ("torch_stack", vector_torch_stack, "concatenate them, torch.cat(blocks, dim=1)"),
    ("last_block_only", vector_last_block_only, "that is one attribute's block only"),
    ("in_place", vector_in_place, f"input `labels` {IN_PLACE}"),
    ("cpu_zeros", vector_cpu_zeros, DEVICE),
    ("nan", vector_blocks(divide=True), NAN),
    ("background_reversed", vector_light_is_zero,
     f"{GENERIC} (largest difference 1 at item 0 (labels [0, 0, 0, 0, 0])); the background "
     "block (columns 19 to 20) is the first that differs: in row 0 it should be [1, 0], "
     "yours is [0, 1]"),
]
VECTOR_RIGHT = [("loop", vector_loop), ("scatter", vector_scatter),
                ("cat_masked", vector_cat_masked), ("index_put", vector_index_put),
                ("eye_extra_row", vector_eye_extra_row)]


# -- AttributeEmbedding: __init__ as the library's; forward written by the learner --


class EmbeddingStub(du.AttributeEmbedding):
    def forward(self, c):
        raise NotImplementedError()


class Embedding(du.AttributeEmbedding):
    """The right forward, with the usual mistakes behind switches."""
    null_rows, activation, after, combine, keepdim, grad, in_place, out_dtype = (
        "all_zero", "silu", False, "where", True, "on", False, None)

    def forward(self, c):
        if self.in_place:
            c.clamp_(min=0)
        act = {"silu": F.silu, "none": lambda h: h, "relu": F.relu, "tanh": torch.tanh}[
            self.activation]
        if self.grad == "no_grad":
            with torch.no_grad():
                emb = self.mlp[2](act(self.mlp[0](c)))
        else:
            emb = self.mlp[2](act(self.mlp[0](c)))
        emb = F.silu(emb) if self.after else emb
        is_null = {"all_zero": lambda: (c == 0).all(dim=1), "any_zero": lambda: (c == 0).any(1),
                   "row_sum": lambda: c.sum(dim=1) == 0,
                   "batch_sum": lambda: (c.sum() == 0).expand(len(c)),
                   "batch_all": lambda: (c == 0).all().expand(len(c)),
                   "every": lambda: torch.ones(len(c), dtype=torch.bool, device=c.device),
                   "never": lambda: torch.zeros(len(c), dtype=torch.bool, device=c.device),
                   }[self.null_rows]()
        is_null = is_null[:, None] if self.keepdim else is_null
        null = self.null.detach() if self.grad == "detach_null" else self.null
        if self.combine == "zeros":
            out = emb * ~is_null
        elif self.combine == "add":
            out = emb + null * is_null
        elif self.combine == "cat":
            out = torch.cat([emb, null.expand_as(emb)], dim=1)
        else:
            out = torch.where(is_null, null, emb)
        return out if self.out_dtype is None else out.to(self.out_dtype)


def embedding(**options):
    return type("AttributeEmbedding", (Embedding,), options)


class EmbeddingAbsSum(du.AttributeEmbedding):
    def forward(self, c):
        is_null = (c.abs().sum(dim=1, keepdim=True) == 0).float()
        return (1 - is_null) * self.mlp(c) + is_null * self.null


class EmbeddingIndexAssign(du.AttributeEmbedding):
    def forward(self, c):
        emb = self.mlp(c)
        out = emb.clone()
        out[~c.bool().any(dim=1)] = self.null.to(emb.dtype)
        return out


class EmbeddingOwnInit(nn.Module):
    """The learner's own __init__ (same names) and a forward with the layers one by one."""

    def __init__(self, attribute_dim, time_dim):
        super().__init__()
        layers = [nn.Linear(attribute_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)]
        self.mlp = nn.Sequential(*layers)
        self.null = nn.Parameter(torch.randn(time_dim))

    def forward(self, c):
        h = self.mlp[0](c)
        emb = self.mlp[2](h * torch.sigmoid(h))
        keep = c.ne(0).any(dim=-1).unsqueeze(-1)
        return emb.masked_fill(~keep, 0.0) + self.null * (~keep)


class EmbeddingNoSiluInInit(nn.Module):
    def __init__(self, attribute_dim, time_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(attribute_dim, time_dim), nn.Linear(time_dim, time_dim))
        self.null = nn.Parameter(torch.zeros(time_dim))

    def forward(self, c):
        return torch.where((c == 0).all(1, keepdim=True), self.null, self.mlp(c))


class EmbeddingRenamed(nn.Module):
    def __init__(self, attribute_dim, time_dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(attribute_dim, time_dim), nn.SiLU(),
                                 nn.Linear(time_dim, time_dim))
        self.null_embedding = nn.Parameter(torch.zeros(time_dim))

    def forward(self, c):
        return torch.where((c == 0).all(1, keepdim=True), self.null_embedding, self.net(c))


class EmbeddingInitStub(nn.Module):
    """The exercise as handed out: __init__ and forward are both stubs."""

    def __init__(self, attribute_dim, time_dim):
        super().__init__()
        # YOUR CODE HERE
        raise NotImplementedError()

    def forward(self, c):
        raise NotImplementedError()


class EmbeddingLayersInForward(du.AttributeEmbedding):
    def forward(self, c):
        time_dim = self.null.numel()
        mlp = nn.Sequential(nn.Linear(c.shape[1], time_dim), nn.SiLU(),
                            nn.Linear(time_dim, time_dim)).to(c.device)
        return torch.where((c == 0).all(1, keepdim=True), self.null, mlp(c))


class EmbeddingCpuZeros(du.AttributeEmbedding):
    def forward(self, c):
        is_null = (c == 0).all(1, keepdim=True)
        out = torch.zeros(len(c), self.null.numel())          # made on the CPU
        return out + torch.where(is_null, self.null, self.mlp(c))


class EmbeddingNaN(du.AttributeEmbedding):
    def forward(self, c):
        return du.AttributeEmbedding.forward(self, c) * math.nan


EMBEDDING_MISTAKES = [
    ("every_row_null", embedding(null_rows="every"), "every row got self.null"),
    ("never_null", embedding(null_rows="never"),
     "on 2 context vectors is not right: the all-zero rows (\"nothing asked\") did not get "
     "self.null"),
    ("whole_batch_sum", embedding(null_rows="batch_sum"), "not once for the whole batch"),
    ("whole_batch_all", embedding(null_rows="batch_all"), "not once for the whole batch"),
    ("zeros_for_null", embedding(combine="zeros"), "the all-zero rows got zeros"),
    ("null_added", embedding(combine="add"), "got self.mlp(c) + self.null"),
    ("any_zero", embedding(null_rows="any_zero"), ".any where .all belongs"),
    ("row_sum", embedding(null_rows="row_sum"), "sum to zero (here +0.5 and -0.5)"),
    ("no_silu", embedding(activation="none"), "the SiLU between the two Linear layers is missing"),
    ("no_silu_in_init", EmbeddingNoSiluInInit, "it is mlp[1], so the second Linear is mlp[2]"),
    ("silu_after", embedding(after=True), "a SiLU after the last Linear layer too"),
    ("relu", embedding(activation="relu"), "ReLU where SiLU belongs"),
    ("renamed", EmbeddingRenamed, "it has no null, mlp.0.weight, mlp.0.bias"),
    ("layers_in_forward", EmbeddingLayersInForward, "a layer is created inside forward"),
    ("concatenated", embedding(combine="cat"), "do not concatenate them"),
    ("no_keepdim", embedding(keepdim=False), "is_null must be (B, 1)"),
    ("no_grad", embedding(grad="no_grad"), "no gradient of the loss reaches `mlp.0.weight`"),
    ("detached_null", embedding(grad="detach_null"), "no gradient of the loss reaches `null`"),
    ("float64", embedding(out_dtype=torch.float64), "should have dtype torch.float32"),
    ("in_place", embedding(in_place=True), f"input `c` {IN_PLACE}"),
    ("cpu_zeros", EmbeddingCpuZeros, DEVICE),
    ("nan", EmbeddingNaN, NAN),
    ("tanh", embedding(activation="tanh"),
     f"{GENERIC} (largest difference 0.786 at item 0 (a full vector)); what goes into "
     "self.mlp.2 differs: it gets SiLU(self.mlp[0](c))"),
]
EMBEDDING_RIGHT = [("switches_off", Embedding), ("abs_sum", EmbeddingAbsSum),
                   ("index_assign", EmbeddingIndexAssign), ("own_init", EmbeddingOwnInit)]


# -- CrossAttention --


class Cross(du.CrossAttention):
    """softmax(q kᵀ / sqrt(d) + mask) v written out, with the usual mistakes behind switches."""
    scale, softmax_dim, residual, split, merge, back, proj_on, q_from, kv_from, norm_context, \
        mask_mode, kv_order, x_in_place = (
            "sqrt_d", -1, "x", "view", "transpose", "right", True, "norm", "context", False,
            "fill", "kv", False)

    def forward(self, x, context, context_mask=None):
        B, C, H, W = x.shape
        N, heads = H * W, self.heads
        d = C // heads
        tokens = self.norm(x).flatten(2).transpose(1, 2)                  # (B, N, C)
        raw = x.flatten(2).transpose(1, 2)
        q = self.q(tokens if self.q_from == "norm" else raw)
        kv_in = {"context": context, "x": tokens, "raw": raw}[self.kv_from]
        if self.norm_context:
            kv_in = self.norm(kv_in.transpose(1, 2)).transpose(1, 2)
        k, v = self.kv(kv_in).chunk(2, dim=-1)
        if self.kv_order == "vk":
            k, v = v, k
        if self.split == "view":
            q, k, v = (z.view(B, z.shape[1], heads, d).transpose(1, 2) for z in (q, k, v))
        elif self.split == "reshape":
            q, k, v = (z.reshape(B, heads, z.shape[1], d) for z in (q, k, v))
        else:                                                             # one head of width C
            q, k, v = (z[:, None] for z in (q, k, v))
        divide = {"sqrt_d": math.sqrt(d), "none": 1.0, "d": d, "sqrt_C": math.sqrt(C),
                  "C": C}[self.scale]
        scores = q @ k.transpose(-1, -2) / divide                         # (B, heads, N, L)
        mask = None if context_mask is None else context_mask[:, None, None, :]
        if mask is not None and self.mask_mode == "inverted":
            mask = ~mask
        if mask is not None and self.mask_mode in ("fill", "inverted"):
            scores = scores.masked_fill(~mask, float("-inf"))
        if mask is not None and self.mask_mode == "zero_scores":
            scores = scores * mask
        if mask is not None and self.mask_mode == "minus_one":
            scores = scores.masked_fill(~mask, -1.0)
        weights = scores.softmax(dim=self.softmax_dim)
        if mask is not None and self.mask_mode == "after":
            weights = weights * mask
        out = weights @ v
        out = (out.transpose(1, 2).reshape(B, N, C) if self.merge == "transpose"
               else out.reshape(B, N, C))
        out = self.proj(out) if self.proj_on else out
        image = {"right": lambda: out.transpose(1, 2).reshape(B, C, H, W),
                 "reshape": lambda: out.reshape(B, C, H, W),
                 "swapped": lambda: out.transpose(1, 2).reshape(B, C, W, H).transpose(2, 3),
                 }[self.back]()
        if self.x_in_place:
            x += image
            return x
        return {"x": x + image, "none": image, "normed": self.norm(x) + image}[self.residual]


def cross(**options):
    return type("CrossAttention", (Cross,), options)


class CrossStub(du.CrossAttention):
    def forward(self, x, context, context_mask=None):
        raise NotImplementedError()


class CrossInitStub(nn.Module):
    """The exercise as handed out: __init__ and forward are both stubs."""

    def __init__(self, channels, context_dim, *, heads=4, groups=8):
        super().__init__()
        self.heads = heads
        raise NotImplementedError()


class CrossSeparateKV(du.CrossAttention):
    """Keys and values from two layers of their own, instead of one self.kv."""

    def __init__(self, channels, context_dim, *, heads=4, groups=8):
        super().__init__(channels, context_dim, heads=heads, groups=groups)
        del self.kv
        self.k = nn.Linear(context_dim, channels)
        self.v = nn.Linear(context_dim, channels)


class CrossKvFromChannels(du.CrossAttention):
    def __init__(self, channels, context_dim, *, heads=4, groups=8):
        super().__init__(channels, context_dim, heads=heads, groups=groups)
        self.kv = nn.Linear(channels, 2 * channels)


class CrossSDPA(du.CrossAttention):
    def forward(self, x, context, context_mask=None):
        B, C, H, W = x.shape
        q = self.q(self.norm(x).view(B, C, H * W).permute(0, 2, 1))
        k, v = self.kv(context).split(C, dim=-1)
        q, k, v = (z.unflatten(-1, (self.heads, C // self.heads)).transpose(1, 2)
                   for z in (q, k, v))
        mask = None if context_mask is None else context_mask.view(B, 1, 1, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.proj(out.transpose(1, 2).flatten(2))
        return x + out.permute(0, 2, 1).reshape(B, C, H, W)


class CrossEinsumBias(du.CrossAttention):
    """An additive mask: -1e9 for the padding, einsum for the products."""
    def forward(self, x, context, context_mask=None):
        B, C, H, W = x.shape
        d = C // self.heads
        tokens = torch.einsum("bchw->bhwc", self.norm(x)).reshape(B, H * W, C)
        q = self.q(tokens).reshape(B, H * W, self.heads, d)
        k, v = (z.reshape(B, -1, self.heads, d) for z in self.kv(context).chunk(2, -1))
        scores = torch.einsum("bnhd,blhd->bhnl", q, k) / d ** 0.5
        if context_mask is not None:
            scores = scores + (~context_mask)[:, None, None, :].to(scores.dtype) * -1e9
        out = torch.einsum("bhnl,blhd->bnhd", scores.softmax(-1), v).reshape(B, H * W, C)
        return x + self.proj(out).transpose(1, 2).reshape(B, C, H, W)


class CrossHeadLoop(du.CrossAttention):
    def forward(self, x, context, context_mask=None):
        B, C, H, W = x.shape
        d = C // self.heads
        q = self.q(self.norm(x).flatten(2).transpose(1, 2))
        k, v = self.kv(context).chunk(2, dim=-1)
        outs = []
        for h in range(self.heads):                                       # one head at a time
            part = slice(h * d, (h + 1) * d)
            scores = torch.bmm(q[..., part], k[..., part].transpose(1, 2)) / math.sqrt(d)
            if context_mask is not None:
                scores = scores.masked_fill(~context_mask[:, None, :], -math.inf)
            outs.append(torch.bmm(torch.softmax(scores, dim=-1), v[..., part]))
        out = self.proj(torch.cat(outs, dim=-1))
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class CrossPermutedPixels(du.CrossAttention):
    """Pixels flattened column by column (W before H) and put back the same way: each pixel's
    query is on its own in cross-attention, so the order does not matter."""
    def forward(self, x, context, context_mask=None):
        B, C, H, W = x.shape
        tokens = self.norm(x).permute(0, 3, 2, 1).reshape(B, W * H, C)
        q = du._split_heads(self.q(tokens), self.heads)
        k, v = (du._split_heads(z, self.heads) for z in self.kv(context).chunk(2, -1))
        mask = None if context_mask is None else context_mask[:, None, None, :]
        out = self.proj(du._merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
        return x + out.reshape(B, W, H, C).permute(0, 3, 2, 1)


class CrossKvTransposed(Cross):
    def forward(self, x, context, context_mask=None):
        self.kv(context.transpose(1, 2))             # (B, context_dim, L): the wrong axis last
        return Cross.forward(self, x, context, context_mask)


class CrossCpuBias(Cross):
    def forward(self, x, context, context_mask=None):
        out = Cross.forward(self, x, context, context_mask)
        return out + torch.zeros(1, out.shape[1], 1, 1)                 # made on the CPU


class CrossNaN(Cross):
    def forward(self, x, context, context_mask=None):
        return Cross.forward(self, x, context, context_mask) * math.nan


class CrossSigmoid(Cross):
    def forward(self, x, context, context_mask=None):
        B, C, H, W = x.shape
        d = C // self.heads
        q = du._split_heads(self.q(self.norm(x).flatten(2).transpose(1, 2)), self.heads)
        k, v = (du._split_heads(z, self.heads) for z in self.kv(context).chunk(2, -1))
        out = torch.sigmoid(q @ k.transpose(-1, -2) / math.sqrt(d)) @ v
        out = self.proj(du._merge_heads(out))
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class CrossNormContextCrash(Cross):
    def forward(self, x, context, context_mask=None):
        self.norm(context)                           # GroupNorm on (B, L, context_dim)
        return Cross.forward(self, x, context, context_mask)


CROSS_MISTAKES = [
    ("no_residual", cross(residual="none"), "the residual is missing"),
    ("residual_of_norm", cross(residual="normed"), "the residual adds norm(x)"),
    ("no_proj", cross(proj_on=False), "the output projection self.proj is missing"),
    ("no_scale", cross(scale="none"), "the scores are not scaled"),
    ("scale_d", cross(scale="d"), "the scores are divided by d"),
    ("scale_sqrt_C", cross(scale="sqrt_C"), "divided by sqrt(C)"),
    ("scale_C", cross(scale="C"), "the scores are divided by C"),
    ("softmax_over_pixels", cross(softmax_dim=-2), "softmax runs over the pixels"),
    ("k_v_swapped", cross(kv_order="vk"), "k and v are swapped"),
    ("q_from_raw_x", cross(q_from="raw"), "q comes from the un-normalised x"),
    ("self_attention", cross(kv_from="x"), "the pixels attend to themselves"),
    ("kv_from_raw_x", cross(kv_from="raw"), "the keys and values come from the un-normalised x"),
    ("norm_on_context", cross(norm_context=True), "self.norm was applied to the context"),
    ("norm_on_context_crash", CrossNormContextCrash, "self.norm takes the feature map x"),
    ("one_head_sqrt_C", cross(split="none", scale="sqrt_C"), "the heads are not split"),
    ("one_head_sqrt_d", cross(split="none"), "the heads are not split"),
    ("split_reshape", cross(split="reshape"), "the heads are split wrongly"),
    ("split_and_merge_reshape", cross(split="reshape", merge="reshape"),
     "the heads are split wrongly"),
    ("merge_reshape", cross(merge="reshape"), "the heads are merged wrongly"),
    ("back_without_transpose", cross(back="reshape"), "the tokens go back to an image wrongly"),
    ("H_W_swapped", cross(back="swapped"), "with H and W swapped"),
    ("mask_ignored", cross(mask_mode="ignored"), "the mask is ignored"),
    ("mask_inverted", cross(mask_mode="inverted"), "the mask is inverted"),
    ("mask_after_softmax", cross(mask_mode="after"), "zeroed after the softmax"),
    ("mask_zero_scores", cross(mask_mode="zero_scores"), "set to 0 instead of -inf"),
    ("mask_minus_one", cross(mask_mode="minus_one"),
     "other values in the padding tokens (context_mask False) changed the output"),
    ("separate_k_v", CrossSeparateKV, "it has no kv.weight, kv.bias; it has k.weight, k.bias, "
                                      "v.weight, v.bias, which the reference has not"),
    ("kv_from_channels", CrossKvFromChannels, "do not have the expected shapes (size mismatch "
                                              "for kv.weight"),
    ("kv_transposed_context", CrossKvTransposed, "self.kv cannot take what it was given: it "
                                                 "gets the context as it is"),
    ("in_place", cross(x_in_place=True), f"input `x` {IN_PLACE}"),
    ("cpu_bias", CrossCpuBias, DEVICE),
    ("nan", CrossNaN, NAN),
    ("sigmoid", CrossSigmoid,
     f"{GENERIC} (largest difference 2.72 at index (0, 9, 3, 0)); what goes into self.proj "
     "differs: it gets softmax(q kᵀ / sqrt(d) + mask) v"),
]
CROSS_RIGHT = [("explicit", Cross), ("sdpa", CrossSDPA), ("einsum_bias", CrossEinsumBias),
               ("head_loop", CrossHeadLoop), ("permuted_pixels", CrossPermutedPixels)]


# -- drop_condition --


def drop_stub(c, p, *, generator=None):
    raise NotImplementedError()


def drop_bernoulli(c, p, *, generator=None):
    keep = torch.bernoulli(torch.full((len(c), 1), 1 - p, device=c.device), generator=generator)
    return c * keep.to(c.dtype)


def drop_where(c, p, *, generator=None):
    drop = torch.rand(c.shape[0], 1, generator=generator, device=c.device) < p
    return torch.where(drop, torch.zeros_like(c), c)


def drop_masked_fill(c, p, *, generator=None):
    u = torch.rand(len(c), generator=generator, device=c.device)
    return c.masked_fill((u < p).unsqueeze(-1), 0)


def drop_with(*, per="row", inverted=False, scale=False, fill=0.0, decide="rand", seed=None,
              use_generator=True, nan=False):
    """A learner's drop_condition with one knob turned."""
    def drop_condition(c, p, *, generator=None):
        if seed is not None:
            torch.manual_seed(seed)
        B, D = c.shape
        gen = generator if use_generator else None
        shape = (B, D) if per == "entry" else (B, 1)
        if decide == "batch":
            u = torch.rand(1, 1, generator=gen, device=c.device).expand(shape)
        elif decide == "first_rows":
            u = (torch.arange(B, device=c.device, dtype=c.dtype) / B)[:, None]
        elif decide == "randperm":
            u = torch.ones(shape, device=c.device)
            u[torch.randperm(B, generator=gen, device=c.device)[:int(p * B)]] = 0.0
        else:
            u = torch.rand(shape, generator=gen, device=c.device)
        drop = u >= p if inverted else u < p
        kept = c / (1 - p) if scale else c
        if nan:
            return torch.where(drop, torch.full_like(c, math.nan), kept)
        if fill == "mean":
            return torch.where(drop, c.mean(dim=0, keepdim=True).expand_as(c), kept)
        return torch.where(drop, torch.full_like(c, fill), kept)
    return drop_condition


def drop_inverted_after_shortcut(c, p, *, generator=None):
    if p == 0:
        return c.clone()
    return drop_with(inverted=True)(c, p, generator=generator)


def drop_f_dropout(c, p, *, generator=None):
    return F.dropout(c, p=p, training=True)


def drop_in_place(c, p, *, generator=None):
    drop = torch.rand(len(c), generator=generator, device=c.device) < p
    c[drop] = 0.0
    return c


def drop_cpu_mask(c, p, *, generator=None):
    keep = (torch.rand(len(c), generator=generator) >= p).float()        # made on the CPU
    return c * keep[:, None]


def drop_no_generator_keyword(c, p):
    return c * (torch.rand(len(c), 1, device=c.device) >= p)


DROP_MISTAKES = [
    ("per_entry", drop_with(per="entry"), "single entries were dropped, not whole rows"),
    ("f_dropout", drop_f_dropout, "that is F.dropout / nn.Dropout"),
    ("inverted", drop_with(inverted=True), "p = 0 keeps them all (keep = u >= p, not u < p)"),
    ("inverted_p_0_kept", drop_inverted_after_shortcut,
     "the rows are kept with probability p instead of dropped"),
    ("scaled", drop_with(scale=True), "scaled by 1/(1 - p) = 1.43"),
    ("minus_one", drop_with(fill=-1.0), "neither c's row nor all zeros (it starts -1, -1"),
    ("mean", drop_with(fill="mean"), "(not -1, not the mean)"),
    ("whole_batch", drop_with(decide="batch"), "one decision was made for the whole batch"),
    ("first_rows", drop_with(decide="first_rows"), "the dropped rows are not spread"),
    ("fixed_seed", drop_with(seed=0), "dropped the same rows in two calls"),
    ("exact_count", drop_with(decide="randperm"), "rows in every call: decide each row on its own"),
    ("generator_ignored", drop_with(use_generator=False), "use the generator: torch.rand(B, "
                                                          "generator=generator, device=c.device)"),
    ("no_generator_keyword", drop_no_generator_keyword,
     "does not accept the `generator` keyword"),
    ("in_place", drop_in_place, f"input `c` {IN_PLACE}"),
    ("cpu_mask", drop_cpu_mask, DEVICE),
    ("nan", drop_with(nan=True), NAN),
]
DROP_RIGHT = [("library_like", drop_with()), ("bernoulli", drop_bernoulli),
              ("where", drop_where), ("masked_fill", drop_masked_fill)]


# ── the tests ──

CHECKS = {
    "attribute_vector": (dc.check_attribute_vector, du.attribute_vector, vector_stub),
    "attribute_embedding": (dc.check_attribute_embedding, du.AttributeEmbedding, EmbeddingStub),
    "cross_attention": (dc.check_cross_attention, du.CrossAttention, CrossStub),
    "drop_condition": (dc.check_drop_condition, du.drop_condition, drop_stub),
}
MISTAKES = {"attribute_vector": VECTOR_MISTAKES, "attribute_embedding": EMBEDDING_MISTAKES,
            "cross_attention": CROSS_MISTAKES, "drop_condition": DROP_MISTAKES}
RIGHT = {"attribute_vector": VECTOR_RIGHT, "attribute_embedding": EMBEDDING_RIGHT,
         "cross_attention": CROSS_RIGHT, "drop_condition": DROP_RIGHT}


@pytest.mark.parametrize("name", CHECKS)
def test_reference_passes(name, capsys):
    check, reference, _ = CHECKS[name]
    assert check(reference) is True
    assert dc.PASSED_MARK in capsys.readouterr().out
    assert dc.passed(reference)


@pytest.mark.parametrize("name", CHECKS)
def test_stub_is_not_attempted(name, capsys):
    check, _, stub = CHECKS[name]
    assert check(stub) is False
    assert dc.NOT_ATTEMPTED_MARK in capsys.readouterr().out


@pytest.mark.parametrize("check, stub", [(dc.check_attribute_embedding, EmbeddingInitStub),
                                         (dc.check_cross_attention, CrossInitStub)],
                         ids=["attribute_embedding", "cross_attention"])
def test_a_stub_in_init_is_not_attempted(check, stub, capsys):
    """The learner writes __init__ too: its stub raises before forward is ever called."""
    assert check(stub) is False
    assert dc.NOT_ATTEMPTED_MARK in capsys.readouterr().out


def test_exercise_names_match_the_notebook_headings():
    assert [check.exercise for check, _, _ in CHECKS.values()] == [
        "Exercise 1 · The context vector: attributes as a multi-hot vector",
        "Exercise 2 · Joining the condition to the time embedding",
        "Exercise 3 · Cross-attention: pixels look at the caption's words",
        "Exercise 4 · Condition dropout"]


@pytest.mark.parametrize("name, fn", cases(RIGHT))
def test_right_versions_in_other_forms_pass(name, fn, capsys):
    assert CHECKS[name][0](fn) is True
    assert dc.PASSED_MARK in capsys.readouterr().out


@pytest.mark.parametrize("name, fn, hint", cases(MISTAKES))
def test_planted_mistakes_fail_with_their_hint(name, fn, hint):
    with pytest.raises(AssertionError) as err:
        CHECKS[name][0](fn)
    assert hint in str(err.value), str(err.value)
    assert dc.BROADCAST_HINT not in str(err.value)


def test_every_check_has_in_place_device_and_nan_mistakes():
    for name in CHECKS:
        hints = [hint for _, _, hint in MISTAKES[name]]
        assert any(IN_PLACE in hint for hint in hints)
        assert DEVICE in hints
        assert NAN in hints
        assert len(RIGHT[name]) >= 2


@pytest.mark.parametrize("name", CHECKS)
def test_the_check_leaves_the_notebooks_random_numbers_alone(name):
    """Building modules and drawing inside a check do not shift the notebook's seeded draws."""
    check, reference, _ = CHECKS[name]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    assert check(reference) is True
    assert torch.equal(torch.rand(3), expected)


def test_the_cross_attention_probe_leaves_the_learners_module_where_it_was():
    m = du.CrossAttention(16, 6, heads=4, groups=4).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    dc.lesson02._probe_module(m, torch.zeros(2, 16, 4, 4), torch.zeros(2, 3, 6),
                              torch.ones(2, 3, dtype=torch.bool), what="probe")
    assert all(v.device.type == "cpu" and torch.equal(v, before[k])
               for k, v in m.state_dict().items())

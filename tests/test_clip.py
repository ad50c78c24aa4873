"""Lesson 06's library section: the caption tokenizer, patches and the causal mask, the two
transformers and CLIP, the contrastive loss, zero-shot scores, retrieval recall, the prompt
ensembles and the text encoder a text-to-image model reads. Each is tested against an
independent computation (a convolution, loops in float64) or a property with a known answer."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffusion_utilities as du

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")

# small enough to run in milliseconds, with two heads and two text layers so that the
# properties are tested through more than one block
TINY = dict(image_size=8, patch_size=4, vision_width=16, vision_layers=1, vision_heads=2,
            text_width=16, text_layers=2, text_heads=2, embed_dim=8)


def tiny_clip(seed=0, **overrides) -> du.CLIP:
    torch.manual_seed(seed)
    return du.CLIP(du.ClipConfig(**{**TINY, **overrides}))


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


# ── the tokenizer ──


@pytest.fixture(scope="module")
def tokenizer():
    return du.CaptionTokenizer()


def test_special_tokens_come_first_and_the_vocabulary_follows(tokenizer):
    assert tokenizer.vocabulary[:3] == ("<pad>", "<start>", "<end>")
    assert tokenizer.ids["<pad>"] == 0 and tokenizer.ids["<start>"] == 1 \
        and tokenizer.ids["<end>"] == 2
    assert tokenizer.vocabulary[3:] == du.caption_vocabulary()
    assert len(tokenizer) == 3 + len(du.caption_vocabulary())
    assert tokenizer.context_length == du.CLIP_CONTEXT_LENGTH


def test_a_caption_is_start_words_end_then_padding(tokenizer):
    ids, mask = tokenizer.encode("a red star")
    L = du.CLIP_CONTEXT_LENGTH
    assert ids.shape == mask.shape == (1, L)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    words = [tokenizer.ids[w] for w in ("a", "red", "star")]
    assert ids[0].tolist() == [1, *words, 2] + [0] * (L - 5)
    # the mask is True up to and including <end>
    assert mask[0].tolist() == [True] * 5 + [False] * (L - 5)


def test_the_empty_caption_is_start_end(tokenizer):
    ids, mask = tokenizer.encode(["", "red"])
    assert ids[0].tolist() == [1, 2] + [0] * (tokenizer.context_length - 2)
    assert mask.sum(1).tolist() == [2, 3]


def test_every_caption_of_the_data_set_encodes_and_decodes_back(tokenizer):
    data = du.make_shapes(60, seed=3)
    rng = np.random.default_rng(0)
    captions = data.captions + [du.caption_for(a, rng) for a in data.attributes]
    ids, mask = tokenizer.encode(captions)
    assert ids.shape == (len(captions), tokenizer.context_length)
    # decoding gives the lower-case words back, punctuation dropped
    assert tokenizer.decode(ids) == [" ".join(du._words(c)) for c in captions]
    # one <start>, one <end> per row, at the mask's last True position
    assert (ids == 1).sum(1).eq(1).all() and (ids == 2).sum(1).eq(1).all()
    assert torch.equal(du.end_positions(ids), mask.sum(1) - 1)


def test_decoding_drops_the_special_tokens_and_keeps_punctuation_out(tokenizer):
    ids, _ = tokenizer.encode(["A Red star, in the centre.", ""])
    assert tokenizer.decode(ids) == ["a red star in the centre", ""]


def test_an_unknown_word_is_named(tokenizer):
    with pytest.raises(ValueError, match="unknown word 'zebra' in 'a red zebra'"):
        tokenizer.encode(["a red star", "a red zebra"])


def test_a_caption_longer_than_the_context_is_refused_and_one_that_just_fits_is_not(tokenizer):
    fits = " ".join(["red"] * (tokenizer.context_length - 2))
    ids, mask = tokenizer.encode(fits)
    assert ids[0, -1] == 2 and mask.all()
    too_long = fits + " star"
    with pytest.raises(ValueError, match=f"has {tokenizer.context_length - 1} words; at most "
                                         f"{tokenizer.context_length - 2} fit") as err:
        tokenizer.encode(too_long)
    assert repr(too_long) in str(err.value)


def test_the_tokenizer_refuses_what_is_not_a_list_of_captions(tokenizer):
    with pytest.raises(ValueError, match="a caption must be a str, got int"):
        tokenizer.encode(["a red star", 3])
    with pytest.raises(ValueError, match="at least one caption"):
        tokenizer.encode([])
    with pytest.raises(ValueError, match="context_length must be an int in"):
        du.CaptionTokenizer(context_length=1)


def test_a_tokenizer_of_its_own_vocabulary_and_context(tokenizer):
    small = du.CaptionTokenizer(["cat", "dog"], context_length=4)
    assert small.vocabulary == ("<pad>", "<start>", "<end>", "cat", "dog")
    ids, _ = small.encode(["dog cat", "dog"])
    assert ids.tolist() == [[1, 4, 3, 2], [1, 4, 2, 0]]
    with pytest.raises(ValueError, match="unknown word 'red'"):
        small.encode("red")


def test_end_positions_need_an_end_in_every_row():
    ids = torch.tensor([[1, 5, 2, 0], [1, 2, 0, 0], [1, 5, 6, 2]])
    assert du.end_positions(ids).tolist() == [2, 1, 3]
    with pytest.raises(ValueError, match="every row of ids needs an <end> token"):
        du.end_positions(torch.tensor([[1, 5, 2], [1, 5, 6]]))


# ── patches and the causal mask ──


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_patchify_is_a_stride_p_convolution_with_the_weights_flattened(p):
    images = torch.randn(2, 3, 8, 16, generator=generator(), dtype=F64)
    weight = torch.randn(5, 3, p, p, generator=generator(1), dtype=F64)       # (width, C, p, p)
    conv = F.conv2d(images, weight, stride=p)                                 # (B, width, H/p, W/p)
    expected = conv.flatten(2).transpose(1, 2)                                # (B, N, width)
    patches = du.patchify(images, p)
    assert patches.shape == (2, (8 // p) * (16 // p), 3 * p * p)
    torch.testing.assert_close(patches @ weight.reshape(5, -1).T, expected, rtol=1e-12, atol=1e-12)
    # and it is exactly torch's unfold, whose columns are in (C, p, p) order
    assert torch.equal(patches, F.unfold(images, p, stride=p).transpose(1, 2))


def test_patches_are_in_reading_order_and_fold_back_into_the_image():
    images = torch.randn(3, 3, 12, 8, generator=generator())
    p = 4
    patches = du.patchify(images, p)
    columns = 8 // p
    for n in range(patches.shape[1]):
        row, col = divmod(n, columns)
        block = images[:, :, row * p:(row + 1) * p, col * p:(col + 1) * p]
        assert torch.equal(patches[:, n], block.reshape(3, -1))
    # the inverse: fold the patches back, or undo the reshapes by hand
    assert torch.equal(F.fold(patches.transpose(1, 2), (12, 8), p, stride=p), images)
    grid = patches.reshape(3, 12 // p, columns, 3, p, p)              # (B, H/p, W/p, C, p, p)
    assert torch.equal(grid.permute(0, 3, 1, 4, 2, 5).reshape(images.shape), images)


@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 3, 8, 6), (2, 3, 7, 8)])
def test_patchify_refuses_images_it_cannot_cut(shape):
    with pytest.raises(ValueError, match="multiples of patch_size 4, got shape"):
        du.patchify(torch.zeros(shape), 4)


@pytest.mark.parametrize("L", [1, 2, 5, 24])
def test_causal_mask_lets_each_token_see_itself_and_the_earlier_ones(L):
    mask = du.causal_mask(L)
    assert mask.shape == (L, L) and mask.dtype == torch.bool
    for i in range(L):
        for j in range(L):
            assert bool(mask[i, j]) == (j <= i)


def test_causal_mask_is_scaled_dot_product_attentions_causal_flag():
    q, k, v = torch.randn(3, 2, 2, 6, 4, generator=generator(), dtype=F64)
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=du.causal_mask(6))
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(masked, causal)


def test_causal_mask_is_made_on_the_device_asked_and_refuses_a_bad_length():
    assert du.causal_mask(3, device="meta").device.type == "meta"
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="length must be an int in"):
            du.causal_mask(bad)


def test_quick_gelu_is_close_to_gelu():
    x = torch.linspace(-8, 8, 2001, dtype=F64)
    assert (du.quick_gelu(x) - F.gelu(x)).abs().max() < 0.021
    torch.testing.assert_close(du.quick_gelu(x), x * torch.sigmoid(1.702 * x))


# ── attention and the blocks ──


def attention_by_hand(attn, x, mask=None):
    """Multi-head self-attention with a loop over heads, in float64."""
    q, k, v = attn.q(x), attn.k(x), attn.v(x)
    d = x.shape[-1] // attn.heads
    heads = []
    for h in range(attn.heads):
        qh, kh, vh = (z[..., h * d:(h + 1) * d] for z in (q, k, v))
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)                     # (B, L, L)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        heads.append(scores.softmax(-1) @ vh)
    return attn.out(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("masked", [False, True])
def test_multi_head_attention_matches_a_loop_over_heads(masked):
    torch.manual_seed(0)
    attn = du.MultiHeadAttention(12, 3).double()
    x = torch.randn(2, 5, 12, generator=generator(), dtype=F64)
    mask = du.causal_mask(5) if masked else None
    # (the attention itself runs in float32 on a CPU, so float32's tolerance)
    torch.testing.assert_close(attn(x, mask), attention_by_hand(attn, x, mask),
                               rtol=1e-5, atol=1e-6)


def test_multi_head_attention_refuses_a_width_the_heads_do_not_divide():
    with pytest.raises(ValueError, match="width 10 must be divisible by heads 4"):
        du.MultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match="width 10 must be divisible by heads 4"):
        du.CLIP(du.ClipConfig(**{**TINY, "vision_width": 10, "vision_heads": 4}))


def test_a_transformer_block_under_the_causal_mask_does_not_look_ahead():
    torch.manual_seed(0)
    block = du.TransformerBlock(8, 2).double()
    x = torch.randn(2, 6, 8, generator=generator(), dtype=F64)
    later = x.clone()
    later[:, 4:] = torch.randn(2, 2, 8, generator=generator(1), dtype=F64)
    out, out_later = block(x, du.causal_mask(6)), block(later, du.causal_mask(6))
    assert out.shape == x.shape
    torch.testing.assert_close(out[:, :4], out_later[:, :4], rtol=0, atol=1e-12)
    assert not torch.allclose(out[:, 4:], out_later[:, 4:])


# ── the configuration and the encoders ──


def test_clip_config_fills_the_vocabulary_size_and_checks_the_patches():
    assert du.ClipConfig().vocab_size == len(du.CaptionTokenizer())
    assert du.ClipConfig(vocab_size=50).vocab_size == 50
    with pytest.raises(ValueError, match="image_size 30 must be a multiple of patch_size 4"):
        du.ClipConfig(image_size=30)


def test_the_vision_transformer_gives_a_token_per_patch_and_the_class_token():
    clip = tiny_clip()
    images = torch.randn(3, 3, 8, 8, generator=generator())
    tokens, pooled = clip.visual(images)
    assert tokens.shape == (3, 1 + 4, 16) and pooled.shape == (3, 16)
    torch.testing.assert_close(pooled, clip.visual.norm_post(tokens[:, 0]))
    assert clip.encode_image(images).shape == (3, 8)


def test_the_text_transformer_gives_a_token_per_position_and_the_end_token():
    clip = tiny_clip()
    ids, mask = du.CaptionTokenizer().encode(["a red star", "", "a small blue circle"])
    tokens, pooled = clip.text(ids)
    assert tokens.shape == (3, du.CLIP_CONTEXT_LENGTH, 16) and pooled.shape == (3, 16)
    ends = mask.sum(1) - 1
    torch.testing.assert_close(pooled, tokens[torch.arange(3), ends])
    assert clip.encode_text(ids).shape == (3, 8)
    with pytest.raises(ValueError, match=r"L <= 24, got shape \(3, 25\)"):
        clip.text(torch.cat([ids, ids[:, :1]], dim=1))
    with pytest.raises(ValueError, match=r"expected token ids \(B, L\)"):
        clip.text(ids[0])


@pytest.fixture(scope="module")
def float64_clip():
    return tiny_clip().double()


def test_the_pooled_text_ignores_what_comes_after_end(float64_clip, tokenizer):
    ids, _ = tokenizer.encode(["a red star", "a large blue circle in the centre"])
    after = ids.clone()
    end = du.end_positions(ids)
    for i, e in enumerate(end.tolist()):  # fill the padding with random words
        after[i, e + 1:] = torch.randint(3, len(tokenizer), (len(ids[i]) - e - 1,),
                                         generator=generator(i))
    tokens, pooled = float64_clip.text(ids)
    tokens_after, pooled_after = float64_clip.text(after)
    torch.testing.assert_close(pooled_after, pooled, rtol=0, atol=1e-12)
    for i, e in enumerate(end.tolist()):
        torch.testing.assert_close(tokens_after[i, :e + 1], tokens[i, :e + 1], rtol=0, atol=1e-12)


def test_the_pooled_text_changes_when_an_earlier_word_changes(float64_clip, tokenizer):
    ids, _ = tokenizer.encode(["a red star", "a blue star", "a red circle"])
    pooled = float64_clip.text(ids)[1]
    assert (pooled[0] - pooled[1]).abs().max() > 1e-3
    assert (pooled[0] - pooled[2]).abs().max() > 1e-3


def test_a_shorter_sequence_gives_the_first_tokens_of_the_full_one(float64_clip, tokenizer):
    ids, _ = tokenizer.encode(["a red star", "a small green cross"])
    full = float64_clip.text(ids)[0]
    short, pooled = float64_clip.text(ids[:, :8])
    # another length, another attention kernel's rounding (it runs in float32 on a CPU)
    torch.testing.assert_close(short, full[:, :8], rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, float64_clip.text(ids)[1], rtol=0, atol=1e-6)


def test_clip_uses_the_patchify_and_mask_it_is_given(tokenizer):
    calls = []

    def my_patchify(images, patch_size):
        calls.append(("patchify", tuple(images.shape), patch_size))
        return F.unfold(images, patch_size, stride=patch_size).transpose(1, 2)

    def my_mask(length, *, device=None):
        calls.append(("mask", length, device))
        positions = torch.arange(length, device=device)
        return positions[None, :] <= positions[:, None]

    reference = tiny_clip()
    mine = du.CLIP(reference.config, patchify_fn=my_patchify, mask_fn=my_mask)
    mine.load_state_dict(reference.state_dict())
    images = torch.randn(2, 3, 8, 8, generator=generator())
    ids, _ = tokenizer.encode(["a red star", "a blue circle"])
    torch.testing.assert_close(mine(images, ids), reference(images, ids))
    assert ("patchify", (2, 3, 8, 8), 4) in calls
    assert ("mask", du.CLIP_CONTEXT_LENGTH, ids.device) in calls

    # a mask that lets every token see every other: the end token now reads the padding
    seeing_all = du.CLIP(reference.config, mask_fn=lambda L, device=None:
                         torch.ones(L, L, dtype=torch.bool, device=device)).double()
    seeing_all.load_state_dict(reference.state_dict())
    later = ids.clone()
    later[:, -1] = tokenizer.ids["star"]
    assert not torch.allclose(seeing_all.text(ids)[1], seeing_all.text(later)[1])


def test_clip_logits_are_the_scaled_cosine_similarities():
    clip = tiny_clip()
    images = torch.randn(3, 3, 8, 8, generator=generator())
    ids, _ = du.CaptionTokenizer().encode(["a red star", "a blue circle", ""])
    img, txt = clip.encode_image(images), clip.encode_text(ids)
    cosine = torch.stack([torch.stack([F.cosine_similarity(i, t, dim=0) for t in txt])
                          for i in img])
    assert clip.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    torch.testing.assert_close(clip(images, ids), cosine / 0.07, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        clip.logit_scale.fill_(10.0)       # exp(10) is clamped to 100
    assert clip.scale().item() == pytest.approx(100.0, rel=1e-5)
    torch.testing.assert_close(clip(images, ids), 100 * cosine, rtol=1e-4, atol=1e-4)


# ── the contrastive loss ──


def contrastive_by_hand(img, txt, logit_scale):
    """Both cross-entropies with Python loops over the rows and columns, in float64."""
    img, txt = F.normalize(img.double(), dim=-1), F.normalize(txt.double(), dim=-1)
    s, B = math.exp(float(logit_scale)), len(img)
    logits = [[s * float(img[i] @ txt[j]) for j in range(B)] for i in range(B)]

    def lse(values):
        top = max(values)
        return top + math.log(sum(math.exp(v - top) for v in values))
    image_to_text = sum(lse(logits[i]) - logits[i][i] for i in range(B)) / B
    text_to_image = sum(lse([logits[i][j] for i in range(B)]) - logits[j][j] for j in range(B)) / B
    return (image_to_text + text_to_image) / 2


@pytest.mark.parametrize("logit_scale", [0.0, math.log(1 / 0.07), math.log(100)])
def test_contrastive_loss_matches_a_float64_loop(logit_scale):
    img = torch.randn(6, 5, generator=generator(), dtype=F64)
    txt = img + 0.8 * torch.randn(6, 5, generator=generator(1), dtype=F64)
    loss = du.contrastive_loss(img, txt, torch.tensor(logit_scale, dtype=F64))
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(contrastive_by_hand(img, txt, logit_scale), rel=1e-10)


def test_contrastive_loss_is_log_b_when_nothing_tells_the_pairs_apart():
    B = 8
    same = torch.ones(B, 4)  # every image and text the same vector: all logits equal
    for scale in (0.0, 2.0, math.log(100)):
        assert du.contrastive_loss(same, same, torch.tensor(scale)).item() == \
            pytest.approx(math.log(B), rel=1e-6)
    # random directions in a high-dimensional space are nearly orthogonal: logits ≈ 0
    img = torch.randn(B, 4096, generator=generator(), dtype=F64)
    txt = torch.randn(B, 4096, generator=generator(1), dtype=F64)
    assert du.contrastive_loss(img, txt, torch.tensor(0.0, dtype=F64)).item() == \
        pytest.approx(math.log(B), abs=0.01)


def test_contrastive_loss_of_orthonormal_pairs():
    """img = txt = orthonormal rows: the logits are s·I, each cross-entropy is
    log(e^s + B - 1) - s, which goes to 0 as the scale s grows."""
    B = 5
    basis = torch.eye(B, dtype=F64)
    for logit_scale in (0.0, 1.0, math.log(100)):
        s = math.exp(logit_scale)
        loss = du.contrastive_loss(basis, 3 * basis, torch.tensor(logit_scale, dtype=F64))
        assert loss.item() == pytest.approx(math.log(math.exp(s) + B - 1) - s, rel=1e-10)


def test_contrastive_loss_is_symmetric_and_ignores_the_feature_lengths():
    img = torch.randn(7, 6, generator=generator(), dtype=F64)
    txt = torch.randn(7, 6, generator=generator(1), dtype=F64)
    scale = torch.tensor(2.5, dtype=F64)
    loss = du.contrastive_loss(img, txt, scale)
    torch.testing.assert_close(du.contrastive_loss(txt, img, scale), loss)
    lengths = torch.rand(7, 1, generator=generator(2), dtype=F64) + 0.1
    torch.testing.assert_close(du.contrastive_loss(img * lengths, txt, scale), loss)


def test_matched_pairs_have_a_lower_loss_than_shuffled_ones():
    img = torch.randn(16, 32, generator=generator())
    txt = img + 0.5 * torch.randn(16, 32, generator=generator(1))
    scale = torch.tensor(math.log(1 / 0.07))
    matched = du.contrastive_loss(img, txt, scale)
    for seed in range(3):
        perm = torch.randperm(16, generator=generator(seed))
        if (perm == torch.arange(16)).all():
            continue
        assert du.contrastive_loss(img, txt[perm], scale) > matched + 1.0


def test_contrastive_loss_refuses_features_of_different_shapes():
    with pytest.raises(ValueError, match=r"same shape \(B, D\), got \(4, 3\) and \(4, 5\)"):
        du.contrastive_loss(torch.zeros(4, 3), torch.zeros(4, 5), torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"got \(4,\) and \(4,\)"):
        du.contrastive_loss(torch.zeros(4), torch.zeros(4), torch.tensor(0.0))


# ── zero-shot scores and retrieval ──


def test_zero_shot_scores_match_a_loop():
    image_features = torch.randn(5, 6, generator=generator(), dtype=F64)
    class_features = torch.randn(3, 4, 6, generator=generator(1), dtype=F64)
    scores = du.zero_shot_scores(image_features, class_features)
    assert scores.shape == (5, 3)
    for n in range(5):
        image = image_features[n] / image_features[n].norm()
        for k in range(3):
            weight = sum(p / p.norm() for p in class_features[k]) / 4
            weight = weight / weight.norm()
            assert scores[n, k].item() == pytest.approx(float(image @ weight), rel=1e-12)
    assert scores.abs().max() <= 1 + 1e-12


def test_zero_shot_picks_the_class_whose_prompts_an_image_matches():
    prompts = torch.randn(4, 3, 16, generator=generator())                     # (K, P, D)
    images = prompts[[2, 0, 3, 1], 1] * torch.tensor([[0.5], [2.0], [1.0], [3.0]])
    assert du.zero_shot_scores(images, prompts).argmax(-1).tolist() == [2, 0, 3, 1]


def test_zero_shot_scores_refuse_features_of_the_wrong_shapes():
    for img, cls in ((torch.zeros(5, 6), torch.zeros(3, 6)),
                     (torch.zeros(5, 6), torch.zeros(3, 2, 4)),
                     (torch.zeros(6), torch.zeros(3, 2, 6))):
        with pytest.raises(ValueError, match=r"image features \(N, D\) and class prompt features"):
            du.zero_shot_scores(img, cls)


def test_retrieval_of_a_perfect_similarity_is_complete():
    similarity = torch.eye(10) + 0.01 * torch.rand(10, 10, generator=generator())
    assert du.retrieval_recall(similarity) == {"recall@1": 1.0, "recall@5": 1.0}


def test_retrieval_recall_counts_the_ranks_of_the_captioned_images():
    N, g = 8, generator()
    ranks = torch.randint(0, N, (N,), generator=g)          # how many images beat the right one
    similarity = torch.empty(N, N)
    for i in range(N):
        values = torch.arange(N, 0, -1).float()            # distinct, best first
        others = [j for j in range(N) if j != i]
        order = torch.randperm(N - 1, generator=g).tolist()
        rest = [v for r, v in enumerate(values.tolist()) if r != ranks[i]]
        similarity[i, i] = values[ranks[i]]
        for j, o in zip(others, order):
            similarity[i, j] = rest[o]
    recall = du.retrieval_recall(similarity, ks=(1, 2, 5, N))
    for k in (1, 2, 5, N):
        assert recall[f"recall@{k}"] == pytest.approx(float((ranks < k).float().mean()))
    # reversed: each text's own image is the least similar
    assert du.retrieval_recall(-torch.eye(N), ks=(1, N - 1, N)) == \
        {"recall@1": 0.0, f"recall@{N - 1}": 0.0, f"recall@{N}": 1.0}


def test_retrieval_recall_with_same_counts_any_matching_image():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    same = labels[:, None] == labels[None, :]
    twin = torch.tensor([1, 0, 3, 2, 5, 4])
    similarity = -torch.eye(6)
    similarity[torch.arange(6), twin] = 1.0                # the twin first, the own image last
    assert du.retrieval_recall(similarity, ks=(1,)) == {"recall@1": 0.0}
    assert du.retrieval_recall(similarity, ks=(1,), same=same) == {"recall@1": 1.0}
    # `same` without its diagonal: the captioned image still counts
    assert du.retrieval_recall(torch.eye(6), ks=(1,), same=torch.zeros(6, 6, dtype=torch.bool)) \
        == {"recall@1": 1.0}


def test_retrieval_recall_refuses_a_similarity_that_is_not_square():
    with pytest.raises(ValueError, match=r"square similarity \(N, N\), got \(3, 4\)"):
        du.retrieval_recall(torch.zeros(3, 4))


# ── prompt ensembles and the trained-model helpers ──


@pytest.mark.parametrize("attribute, value", [("shape", "star"), ("colour", "orange"),
                                              ("position", "top left"), ("background", "light")])
def test_class_prompts_all_say_the_value_and_vary_the_rest(attribute, value):
    prompts = du.class_prompts(attribute, value, 24, seed=5)
    assert len(prompts) == 24
    assert all(f" {value} " in f" {p} " for p in prompts)
    assert len(set(prompts)) > 5
    du.CaptionTokenizer().encode(prompts)  # all within the vocabulary and the context
    assert prompts == du.class_prompts(attribute, value, 24, seed=5)
    assert prompts[:10] == du.class_prompts(attribute, value, 10, seed=5)
    assert prompts != du.class_prompts(attribute, value, 24, seed=6)
    # every one is a canonical caption: "a {size} {colour} {shape} in the {position} on a ..."
    assert all(p.startswith("a ") and " in the " in p and p.endswith(" background")
               for p in prompts)


def test_class_prompts_refuse_what_is_not_an_attribute_or_value():
    with pytest.raises(ValueError, match="attribute must be one of .*got 'texture'"):
        du.class_prompts("texture", "rough", 3)
    with pytest.raises(ValueError, match="shape must be one of .*got 'hexagon'"):
        du.class_prompts("shape", "hexagon", 3)
    with pytest.raises(ValueError, match="n must be an int in"):
        du.class_prompts("shape", "star", 0)


@pytest.fixture(scope="module")
def clip32():
    """A tiny CLIP for the 32 x 32 shapes images."""
    return tiny_clip(image_size=32, patch_size=8)


def test_embeddings_are_normalised_and_do_not_depend_on_the_batch_size(clip32):
    images = du.from_uint8(du.make_shapes(7, seed=1).images)
    whole = du.embed_images(clip32, images)
    assert whole.shape == (7, 8)
    torch.testing.assert_close(whole.norm(dim=-1), torch.ones(7))
    torch.testing.assert_close(du.embed_images(clip32, images, batch_size=3), whole)
    captions = ["a red star", "", "a small blue circle in the centre"]
    text = du.embed_captions(clip32, captions)
    torch.testing.assert_close(text, F.normalize(clip32.encode_text(
        du.CaptionTokenizer().encode(captions)[0]), dim=-1).detach())
    torch.testing.assert_close(du.embed_captions(clip32, captions, batch_size=1), text)


def test_zero_shot_class_features_hold_each_values_prompt_embeddings(clip32):
    features = du.zero_shot_class_features(clip32, "colour", prompts_per_class=3, seed=2)
    assert features.shape == (len(du.COLOURS), 3, 8)
    torch.testing.assert_close(features[1], du.embed_captions(
        clip32, du.class_prompts("colour", du.COLOURS[1], 3, seed=2)))
    with pytest.raises(ValueError, match="attribute must be one of"):
        du.zero_shot_class_features(clip32, "texture")


def test_zero_shot_accuracy_scores_with_the_function_given(clip32):
    data = du.make_shapes(30, seed=4)
    images = du.from_uint8(data.images)

    def always_class_0(image_features, class_features):
        assert image_features.shape == (30, 8) and class_features.shape[1:] == (2, 8)
        scores = torch.zeros(len(image_features), len(class_features))
        scores[:, 0] = 1
        return scores
    accuracy = du.zero_shot_accuracy(clip32, images, data.labels, prompts_per_class=2,
                                     scores_fn=always_class_0)
    assert set(accuracy) == {"shape", "colour"}
    assert accuracy["shape"] == pytest.approx(float((data.labels[:, 0] == 0).float().mean()))
    assert accuracy["colour"] == pytest.approx(float((data.labels[:, 1] == 0).float().mean()))
    plain = du.zero_shot_accuracy(clip32, images, data.labels, attributes=("size",),
                                  prompts_per_class=2)
    assert set(plain) == {"size"} and 0.0 <= plain["size"] <= 1.0


def test_the_text_encoder_gives_tokens_mask_and_a_normalised_pooled_embedding(clip32):
    encoder = du.TextEncoder(clip32)
    captions = ["a red star", "", "there is a large purple diamond in the bottom right"]
    out = encoder(captions)
    ids, mask = du.CaptionTokenizer().encode(captions)
    assert isinstance(out, du.TextEncoding) and encoder.width == 16
    assert out.tokens.shape == (3, du.CLIP_CONTEXT_LENGTH, 16)
    assert torch.equal(out.mask, mask)
    tokens, pooled = clip32.text(ids)
    torch.testing.assert_close(out.tokens, tokens)
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.pooled, F.normalize(clip32.text_projection(pooled), dim=-1))
    # the parts are the CLIP's own: training one trains the other
    assert encoder.transformer is clip32.text and encoder.projection is clip32.text_projection


def test_a_saved_clip_loads_back_in_eval_mode(tmp_path):
    clip = tiny_clip()
    du.save_checkpoint("clip", clip.state_dict(), command="test", data_dir=tmp_path,
                       config=dataclasses.asdict(clip.config))
    loaded = du.load_clip(data_dir=tmp_path)
    assert not loaded.training and loaded.config == clip.config
    images = torch.randn(2, 3, 8, 8, generator=generator())
    ids, _ = du.CaptionTokenizer().encode(["a red star", "a blue circle"])
    torch.testing.assert_close(loaded(images, ids), clip(images, ids))

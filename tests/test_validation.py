"""Bad inputs to flex_attention: the right exception, naming the argument."""

from __future__ import annotations

import math

import pytest
import torch

from flex_inductor import _validation
from flex_inductor.api import flex_attention
from flex_inductor.block_mask import create_block_mask
from flex_inductor.masks import causal


def _qkv(B=1, Hq=2, Hkv=2, L=8, S=8, E=4, Ev=4, dtype=torch.float32, device="cpu"):
    return (
        torch.randn(B, Hq, L, E, dtype=dtype, device=device),
        torch.randn(B, Hkv, S, E, dtype=dtype, device=device),
        torch.randn(B, Hkv, S, Ev, dtype=dtype, device=device),
    )


def _raises(exc_type, *names, **kwargs):
    """Call flex_attention and check the error type and that it names ``names``."""
    args = kwargs.pop("args", None) or _qkv()
    with pytest.raises(exc_type) as info:
        flex_attention(*args, **kwargs)
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not in message: {message}"
    return message


def _validate(query, key, value, score_mod=None, block_mask=None, scale=None,
              enable_gqa=False, return_lse=False, kernel_options=None):
    _validation.validate_inputs(
        query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options
    )


def test_valid_inputs_pass():
    q, k, v = _qkv(B=2, Hq=4, Hkv=2, L=9, S=13, E=8, Ev=6)
    mask = create_block_mask(causal(), 1, 4, 9, 13, "cpu", 4)

    def star_args(*args):
        return args[0]

    _validate(q, k, v, star_args, mask, 0.5, True, True, {"fwd_BLOCK_M": 4, "BACKEND": "TRITON"})
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        _validate(*_qkv(dtype=dtype), scale=2)


# ---------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("position, name", [(0, "`query`"), (1, "`key`"), (2, "`value`")])
def test_non_tensor(position, name):
    args = list(_qkv())
    args[position] = args[position].tolist()
    _raises(TypeError, name, "torch.Tensor", args=args)


@pytest.mark.parametrize("position, name", [(0, "`query`"), (1, "`key`"), (2, "`value`")])
def test_wrong_rank(position, name):
    args = list(_qkv())
    args[position] = args[position][0]
    _raises(ValueError, name, "4-D", args=args)


def test_empty_sequence():
    q, k, v = _qkv()
    _raises(ValueError, "`key`", "non-empty", args=(q, k[:, :, :0], v[:, :, :0]))


def test_batch_mismatch():
    q, k, v = _qkv(B=2)
    _raises(ValueError, "`key`", "batch size", args=(q, k[:1], v[:1]))


def test_head_dim_mismatch_between_query_and_key():
    q, _, v = _qkv()
    k = torch.randn(1, 2, 8, 5)
    _raises(ValueError, "`key`", "head_dim", args=(q, k, v))


def test_value_sequence_length_mismatch():
    q, k, v = _qkv()
    _raises(ValueError, "`value`", "sequence length", args=(q, k, v[:, :, :5]))


def test_value_heads_mismatch():
    q, k, v = _qkv()
    _raises(ValueError, "`value`", "heads", args=(q, k, v[:, :1]))


def test_heads_differ_without_enable_gqa():
    _raises(ValueError, "`query`", "enable_gqa", args=_qkv(Hq=4, Hkv=2))


def test_gqa_ratio_not_integer():
    _raises(ValueError, "enable_gqa", "multiple", args=_qkv(Hq=3, Hkv=2), enable_gqa=True)


def test_dtype_mismatch():
    q, k, v = _qkv()
    _raises(ValueError, "`value`", "dtype", args=(q, k, v.double()))


def test_unsupported_dtype():
    q, k, v = (t.to(torch.int32) for t in _qkv())
    _raises(ValueError, "`query`", "float16, bfloat16, float32, float64", args=(q, k, v))


def test_device_mismatch():
    q, k, v = _qkv()
    _raises(ValueError, "`key`", "meta", args=(q, k.to("meta"), v))


# ---------------------------------------------------------------------------
# Block mask
# ---------------------------------------------------------------------------


def test_block_mask_not_a_block_mask():
    _raises(TypeError, "`block_mask`", "BlockMask", block_mask=torch.ones(8, 8, dtype=torch.bool))


def test_block_mask_seq_lengths_mismatch():
    mask = create_block_mask(causal(), 1, 1, 16, 8, "cpu", 4)
    _raises(ValueError, "`block_mask`", "(16, 8)", "(8, 8)", block_mask=mask)


def test_block_mask_block_count_mismatch():
    # Lengths that agree but a layout for other lengths (a hand-edited mask).
    mask = create_block_mask(causal(), 1, 1, 8, 8, "cpu", 4)
    mask.seq_lengths = (16, 8)
    _raises(ValueError, "`block_mask`", "blocks", args=_qkv(L=16), block_mask=mask)


@pytest.mark.parametrize("B, H", [(3, 1), (1, 3)])
def test_block_mask_batch_or_heads_mismatch(B, H):
    mask = create_block_mask(causal(), B, H, 8, 8, "cpu", 4)
    _raises(ValueError, "`block_mask`", "broadcast", args=_qkv(B=2, Hq=2), block_mask=mask)


def test_block_mask_on_another_device():
    mask = create_block_mask(causal(), 1, 1, 8, 8, "cpu", 4)
    _raises(ValueError, "`block_mask`", "meta", args=_qkv(device="meta"), block_mask=mask)


def test_block_mask_mask_mod_wrong_arity():
    mask = create_block_mask(causal(), 1, 1, 8, 8, "cpu", 4)
    mask.mask_mod = lambda b, h, q_idx: q_idx >= 0
    _raises(TypeError, "`block_mask.mask_mod`", "4 positional", block_mask=mask)


def test_block_mask_mask_mod_not_returning_bool():
    mask = create_block_mask(causal(), 1, 1, 8, 8, "cpu", 4)
    mask.mask_mod = lambda b, h, q_idx, kv_idx: q_idx - kv_idx
    _raises(TypeError, "`block_mask.mask_mod`", "bool", "torch.int32", block_mask=mask)


def test_block_mask_mask_mod_that_fails():
    mask = create_block_mask(causal(), 1, 1, 8, 8, "cpu", 4)
    table = torch.zeros(3, 3)
    mask.mask_mod = lambda b, h, q_idx, kv_idx: table[q_idx, kv_idx, 0] > 0
    _raises(TypeError, "`block_mask.mask_mod`", "0-d int32", block_mask=mask)


# ---------------------------------------------------------------------------
# score_mod, scale, flags, kernel_options
# ---------------------------------------------------------------------------


def test_score_mod_not_callable():
    _raises(TypeError, "`score_mod`", "callable", score_mod=2.0)


@pytest.mark.parametrize(
    "score_mod",
    [
        lambda score, b, h, q_idx: score,
        lambda score, b, h, q_idx, kv_idx, extra: score,
        lambda score, b, h, q_idx, kv_idx, *, required: score,
    ],
    ids=["four", "six", "keyword_only"],
)
def test_score_mod_wrong_arity(score_mod):
    _raises(TypeError, "`score_mod`", "5 positional", score_mod=score_mod)


def test_score_mod_with_defaults_or_star_args_is_accepted():
    _validate(*_qkv(), lambda score, b, h, q_idx, kv_idx, unused=None: score)
    _validate(*_qkv(), lambda score, *rest: score)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan])
def test_scale_not_positive_finite(scale):
    _raises(ValueError, "`scale`", "positive and finite", scale=scale)


@pytest.mark.parametrize("scale", ["0.5", torch.tensor(0.5), True])
def test_scale_wrong_type(scale):
    _raises(TypeError, "`scale`", "float", scale=scale)


@pytest.mark.parametrize("flag", ["enable_gqa", "return_lse"])
def test_flags_must_be_bool(flag):
    _raises(TypeError, f"`{flag}`", "bool", **{flag: 1})


def test_kernel_options_not_a_dict():
    _raises(TypeError, "`kernel_options`", "dict", kernel_options=[("BLOCK_M", 64)])


def test_kernel_options_unknown_key_lists_valid_keys():
    message = _raises(ValueError, "`kernel_options`", "BLOK_M", kernel_options={"BLOK_M": 64})
    for valid in ("BLOCK_M", "num_warps", "bwd_BLOCK_N2", "decode_num_stages", "SPLIT_KV"):
        assert valid in message


def test_kernel_option_keys_contain_prefixed_tuning_keys():
    keys = _validation.KERNEL_OPTION_KEYS
    for key in _validation.TUNING_KEYS:
        assert {key, f"fwd_{key}", f"bwd_{key}", f"decode_{key}"} <= keys
    assert "fwd_BACKEND" not in keys  # only tuning keys are per kernel


@pytest.mark.parametrize("persistent", [True, False])
def test_persistent_accepts_a_bool(persistent):
    _validate(*_qkv(), kernel_options={"PERSISTENT": persistent})


@pytest.mark.parametrize("persistent", [0, 1, 3, 1.5, "yes", None])
def test_persistent_rejects_anything_but_a_bool(persistent):
    _raises(
        TypeError, "`kernel_options['PERSISTENT']`", "bool",
        kernel_options={"PERSISTENT": persistent},
    )

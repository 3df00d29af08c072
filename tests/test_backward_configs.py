"""Backward config choice: which configs are benchmarked under max-autotune."""

from __future__ import annotations

import torch
import torch._inductor.config as inductor_config
from flex_inductor.lowering import backward_configs as configs

CUDA = torch.device("cuda")  # only its type is read: no GPU needed
DEFAULT = configs.BackwardConfig(32, 128, 64, 64, 4, 3)


def test_without_max_autotune_only_the_default_runs():
    with inductor_config.patch(max_autotune=False):
        assert configs.autotune_candidates(DEFAULT, {}, CUDA, 128, 128) == [DEFAULT]


def test_max_autotune_benchmarks_fitting_candidates_default_first():
    with inductor_config.patch(max_autotune=True):
        candidates = configs.autotune_candidates(DEFAULT, {}, CUDA, 128, 128)
    assert candidates[0] == DEFAULT
    assert len(candidates) > 1
    assert len(set(candidates)) == len(candidates)
    assert all(configs.fits_block_mask(c, 128, 128) for c in candidates)


def test_candidates_that_do_not_tile_the_block_mask_are_dropped():
    with inductor_config.patch(max_autotune=True):
        candidates = configs.autotune_candidates(DEFAULT, {}, CUDA, 64, 64)
    assert all(c.BLOCK_N1 <= 64 and c.BLOCK_M2 <= 64 for c in candidates[1:])


def test_pinned_options_and_the_interpreter_turn_autotuning_off():
    with inductor_config.patch(max_autotune=True):
        assert configs.autotune_candidates(DEFAULT, {"bwd_num_warps": 8}, CUDA, 128, 128) == [
            DEFAULT
        ]
        assert configs.autotune_candidates(DEFAULT, {}, torch.device("cpu"), 128, 128) == [
            DEFAULT
        ]

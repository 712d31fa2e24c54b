"""RL diverging (issue 13): huge learning rates stop the stage with a user error naming the step; no model and
no checkpoint of non-finite weights are saved. (Base, mid and SFT: tests/test_train.py; the tiny chat model
comes from tests/test_rl.py.)"""

import pytest
from test_rl import TINY_RL, sft_dir  # noqa: F401 - sft_dir is a fixture
from test_train import HUGE_LR, assert_nothing_saved_from

from nanochat_core.errors import UserError
from nanochat_core.train import rl


def test_diverging_rl_stops_with_a_user_error_and_saves_nothing(sft_dir, tiny_tokenizer_dir, tmp_path):  # noqa: F811
    """Step 2's update makes the weights non-finite; sampling step 3's answers from them would crash in
    torch.multinomial, so the weights are checked after every RL update."""
    config = rl.RLConfig(**{**TINY_RL, **HUGE_LR, "eval_every": -1, "save_every": -1})
    with pytest.raises(UserError, match=r"training diverged: the weights \(.+\) became non-finite .* at step 2;"):
        rl.train(config, sft_dir, tiny_tokenizer_dir, tmp_path)
    assert assert_nothing_saved_from(tmp_path, step=2) == []

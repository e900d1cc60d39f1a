"""``python -m dropgrad_dist bench``: flags that contradict each other end in a usage error naming the fix."""

import pytest

from dropgrad_dist.__main__ import build_parser, main


@pytest.mark.parametrize("name", ["clip", "gnp"])
def test_a_vit_width_its_heads_do_not_divide_is_a_usage_error_naming_a_head_count_that_fits(name, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", name, "--hidden_dim", "64"])  # 6 heads by default: torch would assert mid-run
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"bench {name}: --hidden_dim 64 must be a multiple of --num_heads 6 (e.g. --num_heads 4)" in err


def test_heads_that_divide_the_width_pass_the_check_and_help_says_so(capsys):
    args = build_parser().parse_args(["bench", "clip", "--hidden_dim", "64", "--num_heads", "4"])
    args.module.check_arguments(args)  # no error: the benchmark would run
    with pytest.raises(SystemExit):
        main(["bench", "clip", "--help"])
    assert "attention heads per ViT block; must divide --hidden_dim" in " ".join(capsys.readouterr().out.split())

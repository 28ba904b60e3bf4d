import pytest

from ldm.lr_schedule import learning_rate


def test_warm_up_then_each_schedule_ends_where_it_should():
    assert [learning_rate(s, 1.0, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = [
        learning_rate(s, 2.0, schedule="cosine", warmup_steps=10, total_steps=110, final_ratio=0.1)
        for s in (10, 60, 110, 500)
    ]
    assert cosine == pytest.approx([2.0, 1.1, 0.2, 0.2])
    assert learning_rate(60, 1.0, schedule="linear", total_steps=120) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        learning_rate(0, 1.0, schedule="step")

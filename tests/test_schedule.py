import pytest

from trainer.schedule import WarmupCosine


def test_reference_schedule_matches_golden_including_the_rise_past_total(golden):
    ref = golden["lr_schedule_warmup3_total10"]
    sched = WarmupCosine(warmup_steps=3, total_steps=10, max_lr=1e-3, min_lr=1e-6, hold_floor=False)
    assert sched.lr(0) == pytest.approx(ref["initial_lr"], rel=1e-12)
    assert [sched.lr(n) for n in range(1, len(ref["returned"]) + 1)] == pytest.approx(ref["returned"], rel=1e-6)


def test_schedule_holds_its_floor_after_the_end():
    sched = WarmupCosine(warmup_steps=3, total_steps=10, max_lr=1e-3, min_lr=1e-6)
    assert [sched.lr(n) for n in (10, 11, 50)] == [1e-6, 1e-6, 1e-6]
    assert sched.lr(3) == 1e-3
    assert 1e-6 < sched.lr(9) < sched.lr(8) < sched.lr(4) < 1e-3


def test_bad_schedule_is_rejected():
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        WarmupCosine(warmup_steps=10, total_steps=10, max_lr=1e-3)

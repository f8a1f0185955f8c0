"""sparqle's autotuning policy (kernels/triton/_autotune.py): one config when asked, M
bucketed in the key, outputs zeroed after the trials, nothing timed during CUDA-graph
capture, and planning that counts instead of launching. The tuner's timing is replaced by a
table so that the policy is tested without a GPU; the kernel itself runs (interpreted)."""
import pytest
import torch
import triton
import triton.language as tl

from sparqle.kernels.triton import _autotune
from sparqle.kernels.triton._autotune import AUTOTUNE_ENV, Autotuner, Configs, bucket, planning

SPACE = Configs([triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32}, num_warps=2)],
                test=triton.Config({"BLOCK": 16}))


@triton.jit
def _accumulate_kernel(x_ptr, y_ptr, M, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < M), mask=offs < M)


def _tuner(monkeypatch, seconds):
    """An Autotuner over SPACE (as on a GPU) whose trials run the kernel for real and take
    ``seconds[BLOCK]``; returns it and the list of (key, BLOCK) trials it ran."""
    with monkeypatch.context() as env:
        env.delenv("TRITON_INTERPRET")  # the space, as on a GPU
        env.delenv(AUTOTUNE_ENV, raising=False)
        tuner = Autotuner(_accumulate_kernel, SPACE, key=["M"], bucket=["M"], reset_to_zero=["y_ptr"])
    trials = []

    def bench(*args, config, **meta):
        trials.append((tuner.tuning_key(tuner.nargs)[0], config.kwargs["BLOCK"]))
        tuner.pre_hook({**tuner.nargs, **meta, **config.all_kwargs()})
        tuner.fn.run(*args, **meta, **config.all_kwargs())
        return [seconds[config.kwargs["BLOCK"]]] * 3

    monkeypatch.setattr(tuner, "_bench", bench)
    return tuner, trials


def _call(tuner, m):
    x = torch.randn(m)
    y = torch.zeros(m)
    tuner[lambda meta: (triton.cdiv(m, meta["BLOCK"]),)](x, y, m)
    return x, y


@pytest.mark.parametrize("n,expected", [(0, 0), (1, 1), (2, 2), (3, 4), (16, 16), (17, 32), (4097, 8192)])
def test_bucket_rounds_up_to_a_power_of_two(n, expected):
    assert bucket(n) == expected


def test_one_config_under_the_interpreter_or_when_asked(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.delenv(AUTOTUNE_ENV, raising=False)
    assert SPACE.active() == SPACE.space
    monkeypatch.setenv(AUTOTUNE_ENV, "one")
    assert SPACE.active() == [SPACE.test]
    monkeypatch.setenv(AUTOTUNE_ENV, "fast")
    with pytest.raises(ValueError, match=AUTOTUNE_ENV):
        SPACE.active()
    monkeypatch.delenv(AUTOTUNE_ENV)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert SPACE.active() == [SPACE.test]


def test_key_and_bucket_must_name_arguments():
    with pytest.raises(ValueError, match="must name its arguments"):
        Autotuner(_accumulate_kernel, SPACE, key=["M"], bucket=["N"])
    with pytest.raises(ValueError, match="must name its arguments"):
        Autotuner(_accumulate_kernel, SPACE, key=["ROWS"])


def test_tunes_once_per_bucket_keeps_the_fastest_and_zeroes_the_output(monkeypatch):
    tuner, trials = _tuner(monkeypatch, seconds={16: 2.0, 32: 1.0})
    for m in (5, 7, 8):  # one bucket: tuned once
        x, y = _call(tuner, m)
        # Both trials added x into y; the run after tuning starts from zero again.
        torch.testing.assert_close(y, x, rtol=0, atol=0)
    assert trials == [(8, 16), (8, 32)]
    assert tuner.best_config.kwargs["BLOCK"] == 32
    _call(tuner, 9)
    assert trials[2:] == [(16, 16), (16, 32)]


def test_nothing_is_timed_during_cuda_graph_capture(monkeypatch):
    tuner, trials = _tuner(monkeypatch, seconds={16: 2.0, 32: 1.0})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.warns(RuntimeWarning, match="inside CUDA graph capture"):
        x, y = _call(tuner, 20)
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    assert trials == [] and tuner.best_config == SPACE.space[0]
    assert tuner.cache == {}  # the untuned choice is not remembered
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    _call(tuner, 20)
    assert trials == [(32, 16), (32, 32)]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    _call(tuner, 30)  # tuned outside capture: the tuned config runs, nothing is timed
    assert len(trials) == 2 and tuner.best_config.kwargs["BLOCK"] == 32


def test_planning_counts_trials_and_compiles_without_launching(monkeypatch):
    tuner, trials = _tuner(monkeypatch, seconds={16: 2.0, 32: 1.0})
    with planning() as plan:
        for m in (3, 4, 16, 17):  # buckets 4, 4, 16, 32
            x = torch.randn(m)
            y = torch.full((m,), float("nan"))
            tuner[(1,)](x, y, m)
            assert y.isnan().all()  # not launched
    assert trials == [] and tuner.cache == {}
    assert plan.trials == {"_accumulate_kernel": 6}  # 3 keys x 2 configs
    # Two configs x the specialisations of M that Triton compiles apart: M = 3 and 17
    # (plain), 4 (plain too), 16 (divisible by 16).
    assert plan.compiles_by_kernel() == {"_accumulate_kernel": 4}
    assert _autotune._plan is None

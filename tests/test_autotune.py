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


def _small_m_tuner(monkeypatch, fastest_split_k: int):
    """int4's small-M kernel of fp16 and bf16 x autotuned over its whole space (as on a GPU),
    the trials timed by a table in which the first config with SPLIT_K == ``fastest_split_k``
    wins; it replaces the launcher's. Returns it, the trials and the SPLIT_K of each launch
    it makes outside the trials."""
    from sparqle.kernels.triton import _linear, int4_linear
    with monkeypatch.context() as env:
        env.delenv("TRITON_INTERPRET")
        env.delenv(AUTOTUNE_ENV, raising=False)
        tuner = Autotuner(int4_linear._int4_linear_kernel, _linear.SMALL_M_CONFIGS, key=["M", "N", "K"],
                          bucket=["M"], reset_to_zero=["y_ptr"])
    best = next(c for c in tuner.configs if c.kwargs["SPLIT_K"] == fastest_split_k)
    trials, launches = [], []
    real_run = tuner.fn.run

    def bench(*args, config, **meta):
        trials.append(config)
        tuner.pre_hook({**tuner.nargs, **meta, **config.all_kwargs()})
        real_run(*args, **meta, **config.all_kwargs())
        return [1.0 if config is best else 2.0] * 3

    def run(*args, **kwargs):
        launches.append(kwargs["SPLIT_K"])
        return real_run(*args, **kwargs)
    monkeypatch.setattr(tuner, "_bench", bench)
    monkeypatch.setattr(tuner.fn, "run", run)
    monkeypatch.setattr(int4_linear, "_small_m", tuner)
    return tuner, trials, launches


@pytest.mark.parametrize("split_k", [1, 2])
def test_small_m_launches_once_into_y_unless_the_tuned_config_splits_k(monkeypatch, split_k):
    """Small M (int4, N:M): a tuned config with SPLIT_K == 1 writes y in x's dtype in one
    launch (no zeroed workspace, no cast); the call that tunes it runs it once more that way;
    a split-K config accumulates into a zeroed fp32 workspace. Same results either way."""
    import sparqle
    tuner, trials, launches = _small_m_tuner(monkeypatch, split_k)
    w = torch.randn(40, 72, dtype=torch.float16)
    qw = sparqle.Int4Weight.from_float(w, group_size=32)
    bias = torch.randn(40, dtype=torch.float16)
    want = (lambda x: x.double() @ qw.dequantize().double().t() + bias.double())
    zeroed = []
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: (zeroed.append(a), real_zeros(*a, **k))[1])
    with sparqle.use_backend("triton"), torch.no_grad():
        for call in range(3):
            x = torch.randn(3, 72, dtype=torch.float16)
            del zeroed[:], launches[:]
            y = sparqle.linear(x, qw, bias)
            assert y.dtype == torch.float16
            torch.testing.assert_close(y.double(), want(x), rtol=1e-2, atol=1e-2)
            workspaces = len([a for a in zeroed if tuple(a[0]) == (3, 40)])
            if split_k == 1:
                assert launches == ([1] if call else [1, 1]) and workspaces == (0 if call else 1)
            else:
                assert launches == [split_k] and workspaces == 1
    assert len(trials) == len(tuner.configs)  # tuned once: the direct launch tunes no key of its own
    assert len(tuner.cache) == 1


def test_planning_counts_a_pinned_config_as_one_compile_and_no_trials(monkeypatch):
    import sparqle
    tuner, trials, launches = _small_m_tuner(monkeypatch, 1)
    qw = sparqle.Int4Weight.from_float(torch.randn(40, 72, dtype=torch.float16), group_size=32)
    with sparqle.use_backend("triton"), torch.no_grad():
        sparqle.linear(torch.randn(3, 72, dtype=torch.float16), qw)  # tunes
        del launches[:]
        with planning() as plan:
            sparqle.linear(torch.randn(3, 72, dtype=torch.float16), qw)
    assert launches == [] and plan.trials == {}
    assert [launch.config.kwargs["SPLIT_K"] for launch in plan.compiles.values()] == [1]

"""Backend choice: auto, SPARQLE_BACKEND, use_backend, and errors that say why."""
import os
import time

import pytest
import torch

import sparqle
from sparqle import CSR
from sparqle.backends import requested_backend


def _spmm():
    a = CSR.from_dense(torch.eye(3))
    return sparqle.spmm(a, torch.randn(3, 2))


def test_requested_backend_order(monkeypatch):
    assert requested_backend() == "auto"
    monkeypatch.setenv("SPARQLE_BACKEND", "torch")
    assert requested_backend() == "torch"
    with sparqle.use_backend("triton"):
        assert requested_backend() == "triton"
        with sparqle.use_backend("auto"):
            assert requested_backend() == "auto"
        assert requested_backend() == "triton"
    assert requested_backend() == "torch"


def test_unknown_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="name='cuda' is not a backend"):
        with sparqle.use_backend("cuda"):
            pass
    monkeypatch.setenv("SPARQLE_BACKEND", "fast")
    with pytest.raises(ValueError, match="SPARQLE_BACKEND='fast' is not a backend"):
        _spmm()


def test_forced_cupy_says_why(monkeypatch):
    monkeypatch.setenv("SPARQLE_BACKEND", "cupy")
    a = sparqle.BlockedELL.from_dense(torch.eye(16), block_size=16)
    with pytest.raises(ValueError, match="backend 'cupy' has no kernel for sparqle::bell_linear"):
        sparqle.spmm(a, torch.randn(16, 2))
    with pytest.raises(ValueError, match=r"backend 'cupy' cannot run sparqle::csr_linear: "):
        _spmm()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only rule")
def test_forced_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with sparqle.use_backend("triton"):
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            _spmm()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs where no GPU is")
def test_interpreter_is_on_without_a_gpu():
    import triton
    assert os.environ["TRITON_INTERPRET"] == "1" and triton.knobs.runtime.interpret


def test_auto_is_torch_on_cpu(monkeypatch):
    """auto never runs the interpreter: a CPU user gets the fast torch path."""
    import sparqle.bindings._backend as backend
    chosen = []
    original = backend.kernels
    monkeypatch.setattr(backend, "kernels", lambda name, module: chosen.append(name) or original(name, module))
    _spmm()
    assert chosen == ["torch"]


def test_info_prints_backends(capsys):
    sparqle.info()
    out = capsys.readouterr().out
    assert "torch " in out and "triton" in out and "cupy" in out and "device:" in out


def test_backward_runs_on_the_forward_backend_in_another_thread(monkeypatch):
    """The autograd engine runs CUDA backwards on its own threads, which do not see
    use_backend's context: the backend forced for the forward must reach the backward."""
    import threading

    from sparqle.bindings import _backend

    chosen = []
    choose = _backend.choose
    monkeypatch.setattr(_backend, "choose", lambda *a: chosen.append(choose(*a)) or chosen[-1])
    a = CSR.from_dense(torch.eye(3))
    a.values.requires_grad_(True)
    with sparqle.use_backend("triton"):
        y = sparqle.spmm(a, torch.randn(3, 2))
    thread = threading.Thread(target=y.sum().backward)  # a new thread: an empty context
    thread.start()
    thread.join()
    assert a.values.grad is not None
    assert chosen == ["triton", "triton"]  # csr_linear forward, sddmm_csr backward


class TestFastest:
    """bindings._fastest.fastest: time every candidate once per key, keep the fastest, drop
    one that raises or disagrees with the reference (the first)."""

    def setup_method(self):
        from sparqle.bindings import _fastest
        self.module = _fastest
        self.calls = []

    def _candidate(self, name, seconds, result):
        def run():
            self.calls.append(name)
            time.sleep(seconds)
            return result() if callable(result) else result
        return run

    def test_keeps_the_fastest_and_runs_only_it_later(self, monkeypatch):
        monkeypatch.setattr(self.module, "_fastest", {})
        y = torch.randn(4, 3)
        candidates = {"slow": self._candidate("slow", 0.004, y),
                      "fast": self._candidate("fast", 0.0, y + 1e-4)}
        torch.testing.assert_close(self.module.fastest("k", candidates, "slow", torch.device("cpu")), y + 1e-4)
        assert self.module._fastest == {"k": "fast"}
        self.calls.clear()
        self.module.fastest("k", candidates, "slow", torch.device("cpu"))
        assert self.calls == ["fast"]

    def test_drops_a_wrong_or_raising_candidate_with_a_warning(self, monkeypatch):
        monkeypatch.setattr(self.module, "_fastest", {})
        y = torch.randn(8, 5)

        def broken():
            raise RuntimeError("no kernel for this device")

        candidates = {"reference": self._candidate("reference", 0.003, y),
                      "wrong": self._candidate("wrong", 0.0, lambda: y.flip(0)),
                      "raises": broken}
        with pytest.warns(RuntimeWarning) as warned:
            got = self.module.fastest("k", candidates, "reference", torch.device("cpu"))
        messages = " ".join(str(w.message) for w in warned)
        assert "wrong is not used for k" in messages and "raises is not used for k" in messages
        assert "no kernel for this device" in messages
        assert torch.equal(got, y) and self.module._fastest == {"k": "reference"}

    def test_a_raising_reference_raises(self, monkeypatch):
        monkeypatch.setattr(self.module, "_fastest", {})

        def broken():
            raise RuntimeError("reference failed")

        with pytest.raises(RuntimeError, match="reference failed"):
            self.module.fastest("k", {"reference": broken}, "reference", torch.device("cpu"))
        assert self.module._fastest == {}

"""``sparqle.info()``: versions, the device, and which backends can run on it."""
import importlib.metadata
import platform

import torch

from .backends import requested_backend, status


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> None:
    """Print the versions, the device, and which backends can run on it, and why not."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    lines = [f"sparqle {_version('sparqle')}", f"python {platform.python_version()}",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    lines += [f"{p} {_version(p)}" for p in ("triton", "numpy")]
    cupy = next((d.version for d in importlib.metadata.distributions()
                 if (d.metadata["Name"] or "").lower().startswith("cupy")), "not installed")
    try:
        requested = requested_backend()
    except ValueError as error:  # a mistyped SPARQLE_BACKEND: say so, and print the rest
        requested = f"error: {error}"
    lines += [f"cupy {cupy}", f"device: {name}", f"requested backend: {requested}"]
    for backend in ("triton", "cupy", "torch"):
        ok, why = status(backend, device)
        lines.append(f"  {backend:<7}{'can run' if ok else 'cannot run: ' + why}")
    print("\n".join(lines))

"""A native resource loaded on first use, whose failure is recorded instead of raised.

Why: the compiled CPU kernels (:mod:`rnnkit.ops._native`) and MKL's batch interface
(:mod:`rnnkit.ops._blas`) are optional fast paths. Importing rnnkit must not compile, look up
symbols or fail; the first caller pays the loading once (thread-safely), and every later caller
sees either the resource or the reason it is missing, so that it can fall back to PyTorch.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class LazyResource(Generic[T]):
    """``load()`` run once on the first :meth:`get`; None and a reason when it raised or when the
    environment variable ``disable_env`` is set to anything but ``""`` or ``"0"``."""

    def __init__(self, load: Callable[[], T], disable_env: str) -> None:
        self.load = load
        self.disable_env = disable_env
        self.value: T | None = None
        self.reason: str | None = None
        self.lock = threading.Lock()

    def get(self) -> T | None:
        if self.value is not None or self.reason is not None:
            return self.value
        with self.lock:
            if self.value is None and self.reason is None:
                if os.environ.get(self.disable_env, "") not in ("", "0"):
                    self.reason = f"disabled by {self.disable_env}"
                else:
                    try:
                        self.value = self.load()
                    except Exception as err:  # noqa: BLE001 - any failure means "fall back"
                        self.reason = f"{type(err).__name__}: {err}"
        return self.value

    def unavailable_reason(self) -> str | None:
        """Why :meth:`get` gives None (None when it gives the resource)."""
        self.get()
        return self.reason

    def reset(self) -> None:
        """Forget the resource and any failure, so that the next :meth:`get` re-reads the environment."""
        with self.lock:
            self.value, self.reason = None, None

"""One-series forecasting from ``statsmodels``' bundled data sets, with classical baselines computed in-suite.

Series: yearly sunspot numbers 1700-2008 (309 values; the ~11-year solar cycle) and weekly Mauna Loa
CO2 1958-2001 (2,284 values, 59 missing, filled by linear interpolation; yearly season of 52 weeks).
Both ship inside the ``statsmodels`` wheel (``pip install 'rnnkit[forecast]'``); nothing is downloaded.

The model reads a window of ``context`` past values and predicts the next ``horizon`` values. Splits are
chronological (no look-ahead): the targets of ``train`` are the first 70% of the series, ``val`` the
next 15%, ``test`` the last 15%; a window's context may reach back into the previous split, as it
would in deployment. Values are standardised with the training part's mean and std.

Baselines on exactly the same test windows (:meth:`ForecastTask.baselines`): seasonal naive (repeat
the value one season back; Hyndman & Athanasopoulos, "Forecasting: Principles and Practice", 5.2) and
an ARIMA (Box & Jenkins) whose order is chosen by AIC on the training part, its parameters fitted
there and then kept fixed while it forecasts from each test origin.
"""

from __future__ import annotations

import importlib.util
import itertools
import warnings
from functools import lru_cache
from typing import Iterator

import numpy as np
import torch

from rnnkit.errors import InputError, check_choice, check_positive_int
from rnnkit.tasks.base import Batch, Task, check_eval_args, check_train_args, generator, register_task

#: series name -> (statsmodels dataset module, column, seasonal period in steps)
SERIES = {"sunspots": ("sunspots", "SUNACTIVITY", 11), "co2": ("co2", "co2", 52)}
INSTALL_HINT = "pip install -c constraints.txt statsmodels (or pip install 'rnnkit[forecast]')"
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)


@lru_cache(maxsize=None)
def load_series(name: str) -> np.ndarray:
    """The raw series ``(N,)`` float64 with missing values filled by linear interpolation."""
    check_choice("series", name, tuple(SERIES))
    if importlib.util.find_spec("statsmodels") is None:
        raise InputError(f"forecast: expected the statsmodels package (its bundled data sets), got none: {INSTALL_HINT}")
    module_name, column, _ = SERIES[name]
    module = importlib.import_module(f"statsmodels.datasets.{module_name}")
    values = module.load_pandas().data[column].to_numpy(dtype=np.float64)  # (N,)
    missing = np.isnan(values)
    if missing.any():
        steps = np.arange(len(values))
        values = values.copy()
        values[missing] = np.interp(steps[missing], steps[~missing], values[~missing])
    return values


@register_task("forecast")
class ForecastTask(Task):
    """Forecast the next ``horizon`` values of a series (sunspots or CO2) from the last ``context`` values.

    Args:
        series: ``"sunspots"`` or ``"co2"`` (default ``"sunspots"``).
        context: window length ``T`` read by the model (default 44 for sunspots, 104 for co2: four and
            two seasons).
        horizon: values to predict (default 1).

    Batches: ``x`` ``(B, T, 1)`` float32 standardised values, ``y`` ``(B, horizon)`` float32 (the next
    values, standardised), ``lengths`` ``None``. Training batches are ``B`` random windows (with
    replacement); val/test visit every forecast origin of the split in order. ``seq_len`` must be
    ``None`` or ``context``. MSE is in standardised units (divide by 1 for "fraction of the variance").

    Example:
        >>> task = build_task("forecast", series="co2", horizon=4)
        >>> batch = next(task.eval_batches("test", batch_size=8))
        >>> batch.x.shape, batch.y.shape
        (torch.Size([8, 104, 1]), torch.Size([8, 4]))
    """

    input_kind = "features"
    d_input = 1
    target = "regress"
    metrics = ("loss", "mse")

    def __init__(self, *, series: str = "sunspots", context: int | None = None, horizon: int = 1) -> None:
        check_choice("series", series, tuple(SERIES))
        self.period = SERIES[series][2]
        context = (4 if series == "sunspots" else 2) * self.period if context is None else context
        check_positive_int("context", context)
        check_positive_int("horizon", horizon)
        super().__init__(series=series, context=context, horizon=horizon)
        self.series, self.context, self.horizon = series, context, horizon
        self.d_output = horizon
        self.default_seq_len = context
        raw = load_series(series)
        N = len(raw)
        n_train, n_val = int(SPLIT_FRACTIONS[0] * N), int(SPLIT_FRACTIONS[1] * N)
        self.bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, N)}
        self.mean, self.std = float(raw[:n_train].mean()), float(raw[:n_train].std())
        self.values = torch.from_numpy((raw - self.mean) / self.std).float()  # (N,)
        self.raw = raw
        for split in self.bounds:
            if len(self.origins(split)) == 0:
                raise InputError(
                    f"context + horizon: expected a window that fits the {split} split of {series} "
                    f"({self.bounds[split]}), got context={context}, horizon={horizon}"
                )

    def origins(self, split: str) -> torch.Tensor:
        """Forecast origins of ``split``: indices ``o`` whose targets ``values[o : o + horizon]`` lie in the split
        and whose context ``values[o - context : o]`` starts at or after 0."""
        lo, hi = self.bounds[split]
        first, last = max(lo, self.context), hi - self.horizon + 1
        return torch.arange(first, max(first, last))

    def _batch(self, origins: torch.Tensor) -> Batch:
        steps = torch.arange(-self.context, self.horizon)  # (T + horizon,)
        windows = self.values[origins[:, None] + steps]  # (B, T + horizon)
        return Batch(windows[:, : self.context, None].clone(), windows[:, self.context :].clone(), None)

    def _check_seq_len(self, seq_len: int | None) -> None:
        if seq_len is not None and seq_len != self.context:
            raise InputError(f"seq_len: expected None or context = {self.context}, got {seq_len}")

    def train_batches(
        self, batch_size: int, seq_len: int | None = None, seed: int = 0, start: int = 0
    ) -> Iterator[Batch]:
        check_train_args(batch_size, seq_len, seed, start)
        self._check_seq_len(seq_len)
        origins = self.origins("train")

        def batches() -> Iterator[Batch]:
            k = start
            while True:
                pick = torch.randint(0, len(origins), (batch_size,), generator=generator("forecast", self.series, seed, k))
                yield self._batch(origins[pick])
                k += 1

        return batches()

    def eval_batches(self, split: str, batch_size: int, seq_len: int | None = None) -> Iterator[Batch]:
        check_eval_args(split, batch_size, seq_len)
        self._check_seq_len(seq_len)
        origins = self.origins(split)
        return (self._batch(origins[i : i + batch_size]) for i in range(0, len(origins), batch_size))

    # ------------------------------------------------------------------ baselines
    def targets(self, split: str) -> np.ndarray:
        """Standardised targets ``(n_origins, horizon)`` of ``split``, in the order of :meth:`eval_batches`."""
        origins = self.origins(split).numpy()
        return self.values.numpy()[origins[:, None] + np.arange(self.horizon)]

    def seasonal_naive(self, split: str = "test") -> np.ndarray:
        """Seasonal-naive forecasts ``(n_origins, horizon)``: the value one season before each target,
        taken from the data already seen at the origin (``k`` seasons back for horizons beyond one season)."""
        origins = self.origins(split).numpy()
        steps = np.arange(self.horizon)
        back = self.period * (steps // self.period + 1)  # (horizon,): seasons back, always before the origin
        return self.values.numpy()[origins[:, None] + steps - back]

    def arima(self, split: str = "test", max_p: int = 3, max_q: int = 2) -> tuple[np.ndarray, tuple[int, int, int]]:
        """ARIMA forecasts ``(n_origins, horizon)`` and the chosen order ``(p, d, q)``.

        The order minimises AIC over ``p <= max_p``, ``q <= max_q`` with ``d = 1`` for the trending co2
        series and ``d = 0`` for sunspots, on the training part; the parameters are then fixed and the
        model is run over the whole series to forecast ``horizon`` steps from each origin of ``split``.
        """
        from statsmodels.tsa.arima.model import ARIMA

        lo, hi = self.bounds["train"]
        train = self.values.numpy()[lo:hi].astype(np.float64)
        d = 1 if self.series == "co2" else 0
        best = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter of poor candidate orders
            for p, q in itertools.product(range(max_p + 1), range(max_q + 1)):
                if p == q == 0:
                    continue
                fit = ARIMA(train, order=(p, d, q), trend="c" if d == 0 else "n").fit()
                if best is None or fit.aic < best[0]:
                    best = (fit.aic, (p, d, q), fit)
            _, order, fit = best
            full = fit.apply(self.values.numpy().astype(np.float64))  # same parameters, whole series
            origins = self.origins(split).numpy()
            if self.horizon == 1:
                # one-step predictions at every step in one call: prediction at o uses data up to o - 1
                return full.predict(start=int(origins[0]), end=int(origins[-1]))[:, None], order
            preds = np.stack([
                full.get_prediction(start=int(o), end=int(o) + self.horizon - 1, dynamic=0).predicted_mean
                for o in origins
            ])
        return preds, order

    def baselines(self, split: str = "test") -> dict[str, float]:
        """MSE (standardised units) of the classical baselines on ``split``'s windows.

        Returns:
            ``{"seasonal_naive": ..., "arima": ..., "mean": ...}`` (``mean``: predicting the training
            mean, 0 in standardised units) plus ``"arima_order"`` as text.
        """
        target = self.targets(split)
        arima, order = self.arima(split)
        return {
            "mean": float((target**2).mean()),
            "seasonal_naive": float(((self.seasonal_naive(split) - target) ** 2).mean()),
            "arima": float(((arima - target) ** 2).mean()),
            "arima_order": str(order),
        }

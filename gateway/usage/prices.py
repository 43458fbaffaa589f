"""What an image costs: `[prices]` by model, size and quality, times the images made."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)


class PriceTable:
    def __init__(
        self,
        prices: Mapping[str, Mapping[str, float]],
        unpriced_image_usd: float,
        on_unpriced: Callable[[str], object] = lambda model: None,
    ) -> None:
        # Looked up case-blind: `GPT-IMAGE-1`, `HIGH` or `1536X1024` must not find a cheaper
        # line (or none) than the upstream bills.
        self._prices = {
            model.lower(): {key.lower(): price for key, price in table.items()}
            for model, table in prices.items()
        }
        self._unpriced_usd = unpriced_image_usd
        self._on_unpriced = on_unpriced
        self._said: set[str] = set()

    def per_image(self, model: str | None, size: str | None, quality: str | None) -> float:
        """One image's price, looked up as "size/quality", "size", "/quality", "default". A
        model the table lacks costs `unpriced_image_usd`, never $0 (LiteLLM's Imagen lesson).
        A quality left to the upstream (none given, or "auto": gpt-image's default, often high)
        is the dearest the table names for the size, so a budget errs on the safe side."""
        table = self._prices.get((model or "").lower())
        if table is None:
            return self._unpriced(model or "")
        size = size.lower() if size and size.lower() != "auto" else None
        quality = quality.lower() if quality and quality.lower() != "auto" else None
        if quality is None:
            prefix = f"{size}/" if size else "/"
            dearest = [price for key, price in table.items() if key.startswith(prefix)]
            if dearest:
                return max(dearest)
        keys = [f"{size}/{quality}"] if size and quality else []
        keys += [size] if size else []
        keys += [f"/{quality}", "default"] if quality else ["default"]
        for key in keys:
            if key in table:
                return table[key]
        return self._unpriced(model or "")

    def _unpriced(self, model: str) -> float:
        self._on_unpriced(model)
        if model not in self._said and len(self._said) < 1000:
            self._said.add(model)
            # The model name is the caller's own text: repr() keeps it on one line.
            logger.warning(
                "no price for model %r in [prices]: each image estimated at $%g "
                "(usage.unpriced_image_usd)",
                model[:100],
                self._unpriced_usd,
            )
        return self._unpriced_usd

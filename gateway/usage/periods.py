"""Budget periods: the UTC day and the UTC month a moment falls in, and when each ends."""

from __future__ import annotations

import datetime as dt

PERIODS = ("day", "month")


class Periods:
    """The day and month of one moment: their names (the keys their figures live under) and
    their ends (when a spent budget is available again)."""

    __slots__ = ("day", "day_ends", "month", "month_ends")

    def __init__(self, now: float) -> None:
        moment = dt.datetime.fromtimestamp(now, dt.UTC)
        today = moment.date()
        tomorrow = today + dt.timedelta(days=1)
        next_month = (today.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
        self.day = today.isoformat()
        self.month = today.strftime("%Y-%m")
        self.day_ends = _epoch(tomorrow)
        self.month_ends = _epoch(next_month)

    def ends(self, period: str) -> float:
        return self.day_ends if period == "day" else self.month_ends


def _epoch(day: dt.date) -> float:
    return dt.datetime.combine(day, dt.time(), dt.UTC).timestamp()


def iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

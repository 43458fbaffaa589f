"""Usage and budgets per named client (`[clients.<name>]`): what a call asks for (`ask.py`) and
what its answer says it got (`answer.py`), priced from `[prices]` (`prices.py`); budgets held
before a call and settled after it (`ledger.py`: in memory embedded, `redis_ledger.py` and
`lua/*.lua` across replicas), per UTC day and month (`periods.py`); the Prometheus series
(`metrics.py`), the one object the gateway's paths call (`meter.py`) and `GET /v1/usage`
(`view.py`)."""

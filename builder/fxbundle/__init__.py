"""fxbundle: turn a trained FX forecasting checkpoint into a validated MetaTrader 5 bundle."""

__version__ = "0.1.0"

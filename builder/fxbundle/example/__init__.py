"""The example model: the reference architecture trained on real USDJPY H1 bars."""

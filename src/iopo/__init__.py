"""iopo: Indirect Online Preference Optimization (Wang et al., IJCAI 2025) and its baselines."""

__version__ = "0.1.0"

"""Machine learning: preprocessing, models, training, CAMs, pseudo-labels, metrics, export (no Qt)."""

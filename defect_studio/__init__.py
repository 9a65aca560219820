"""defect-studio: from good/defect image tags to a pixel-level defect segmenter."""

__version__ = "0.1.0"

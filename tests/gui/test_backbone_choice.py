"""The Train tab's backbone choice: each backbone brings its own defaults, and the job trains the one chosen."""

from __future__ import annotations

from defect_studio.gui.panels.train_panel import TrainPanel
from defect_studio.ml.classifier_options import ClassifierConfig


def test_choosing_a_backbone_shows_its_defaults_and_builds_its_config(make_window) -> None:
    panel: TrainPanel = make_window().train_panel
    combo = panel.form.combos["arch"]
    assert combo.currentText() == "efficientnet-lite0"
    assert panel.form.values()["input_size"] == 256
    combo.setCurrentText("compact")
    config = panel.form.config()
    assert config.arch == "compact" and config.input_size == 128 and config.lr == ClassifierConfig(arch="compact").lr
    assert config.frozen_stages == 0 and config.normalisation == "per-image-robust"  # not carried over from EfficientNet
    combo.setCurrentText("efficientnet-lite0")
    assert panel.form.config().frozen_stages == 2 and panel.form.values()["input_size"] == 256

"""The stage dock's tabs: each page scrolls its panel, and the tab widget speaks of the panels."""

from __future__ import annotations

from PySide6.QtCore import QSize, Qt
from PySide6.QtWidgets import QFrame, QScrollArea, QTabWidget, QWidget


class StageTabs(QTabWidget):
    """Tabs whose pages are scroll areas; `currentWidget()` and `setCurrentWidget()` speak of the panels."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.panel_of_page: dict[QWidget, QWidget] = {}

    def currentWidget(self) -> QWidget:  # noqa: N802
        page = super().currentWidget()
        return self.panel_of_page.get(page, page)

    def widget(self, index: int) -> QWidget:
        page = super().widget(index)
        return self.panel_of_page.get(page, page)

    def setCurrentWidget(self, widget: QWidget) -> None:  # noqa: N802
        for page, panel in self.panel_of_page.items():
            if panel is widget:
                super().setCurrentWidget(page)
                return
        super().setCurrentWidget(widget)


class StagePage(QScrollArea):
    """A stage panel that scrolls vertically and is never narrower than the panel needs: the dock
    cannot be made so narrow that a control is cut off at its right edge (there is no horizontal
    scroll bar to reach it)."""

    def __init__(self, panel: QWidget, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName(f"{panel.objectName()}Scroll")
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setWidget(panel)
        self.viewport().setObjectName("stageViewport")

    def minimumSizeHint(self) -> QSize:  # noqa: N802
        hint = super().minimumSizeHint()
        panel = self.widget()
        if panel is None:
            return hint
        needed = panel.minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()
        return QSize(max(hint.width(), needed), hint.height())

"""The desktop app (PySide6 + pyqtgraph). The only package allowed to import Qt.

It calls the Qt-free core (project store, jobs, ml) and never re-implements it: long operations
run as job generators in `workers.JobRunner`, everything else is a direct call on the project.
"""

import pyqtgraph as _pg

# Arrays are row-major (H×W) everywhere in the core; tell pyqtgraph once, before any ImageItem exists.
_pg.setConfigOptions(imageAxisOrder="row-major", antialias=True)

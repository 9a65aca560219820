"""pyqtgraph, configured once for the whole app: GUI modules import `pg` from here."""

import pyqtgraph as pg

# Arrays are row-major (H×W) everywhere in the core; tell pyqtgraph once, before any ImageItem exists.
pg.setConfigOptions(imageAxisOrder="row-major", antialias=True)

__all__ = ["pg"]

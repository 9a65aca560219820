"""The desktop app (PySide6 + pyqtgraph). The only package allowed to import Qt.

It calls the Qt-free core (project store, jobs, ml) and never re-implements it: long operations
run as job generators in `workers.JobRunner`, everything else is a direct call on the project.

Importing this package loads no Qt (`app.run_app` checks first that Qt can start here); the
modules that draw take pyqtgraph from `plotting`, which configures it.
"""

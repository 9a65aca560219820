"""The app's stylesheet and icons, installed as the package `defect_studio.resources` (see
pyproject.toml); read them with `importlib.resources.files("defect_studio.resources")`."""

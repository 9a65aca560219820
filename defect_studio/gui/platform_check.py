"""Why Qt could not open a window here, found out before Qt tries.

When Qt's platform plugin cannot load (a system library missing) or finds no display, Qt prints
its own diagnostics and aborts the process: no exception reaches Python. So the app checks first,
without importing Qt, and says in one line what to install or do. Qt-free on purpose.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from pathlib import Path

# System libraries (outside the PySide6 wheel) with the Debian/Ubuntu package of each.
# Qt's GUI module links these on every platform, offscreen included.
QT_GUI_LIBRARIES = {
    "libGL.so.1": "libgl1",
    "libEGL.so.1": "libegl1",
    "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libglib-2.0.so.0": "libglib2.0-0",
    "libX11.so.6": "libx11-6",
    "libdbus-1.so.3": "libdbus-1-3",
}
# The xcb (X11) platform plugin, the one Qt uses on a Linux desktop, links these too
# (the NEEDED entries of PySide6's libqxcb.so and libQt6XcbQpa.so.6, Qt 6.12).
XCB_PLUGIN_LIBRARIES = {
    "libxcb.so.1": "libxcb1",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-util.so.1": "libxcb-util1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
}
NO_DISPLAY_ADVICE = ("start it in a desktop session, over `ssh -X`, or under `xvfb-run`; the commands "
                     "(`defect-studio --help`) need no display")


def can_load(library: str) -> bool:
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


def missing_packages(libraries: dict[str, str]) -> dict[str, str]:
    """{library: package} of the libraries that cannot be loaded."""
    return {library: package for library, package in libraries.items() if not can_load(library)}


def qt_platform() -> str:
    """The platform plugin Qt will try first: QT_QPA_PLATFORM's first choice, else wayland in a
    Wayland session, else xcb."""
    requested = os.environ.get("QT_QPA_PLATFORM", "").strip()
    if requested:
        return requested.split(";")[0].split(":")[0].strip()
    if os.environ.get("XDG_SESSION_TYPE") == "wayland" and os.environ.get("WAYLAND_DISPLAY"):
        return "wayland"
    return "xcb"


def xcb_plugin_file() -> Path | None:
    """PySide6's xcb plugin, found without importing PySide6."""
    spec = importlib.util.find_spec("PySide6")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        plugin = Path(folder) / "Qt" / "plugins" / "platforms" / "libqxcb.so"
        if plugin.is_file():
            return plugin
    return None


def x_display_answers(display: str) -> bool:
    """Whether an X server accepts a connection on `display` (as Qt's xcb plugin will ask)."""
    xcb = ctypes.CDLL("libxcb.so.1")
    xcb.xcb_connect.restype = ctypes.c_void_p
    xcb.xcb_connect.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    xcb.xcb_connection_has_error.argtypes = [ctypes.c_void_p]
    xcb.xcb_disconnect.argtypes = [ctypes.c_void_p]
    connection = xcb.xcb_connect(display.encode(), None)  # never NULL: an error object instead
    try:
        return xcb.xcb_connection_has_error(connection) == 0
    finally:
        xcb.xcb_disconnect(connection)


def install_line(what: str, missing: dict[str, str]) -> str:
    packages = " ".join(sorted(set(missing.values())))
    return (f"defect-studio cannot open its window: {what} needs system libraries that are missing "
            f"({', '.join(missing)}). Install them (Debian/Ubuntu): sudo apt-get install {packages}")


def qt_start_problem() -> str | None:
    """One line saying why Qt would abort instead of opening a window, or None when it should open."""
    if not sys.platform.startswith("linux"):
        return None  # Qt ships what it needs on Windows and macOS
    missing = missing_packages(QT_GUI_LIBRARIES)
    if missing:
        return install_line("Qt", missing)
    if qt_platform() != "xcb":
        return None  # offscreen, wayland...: chosen on purpose, nothing more to check cheaply
    display = os.environ.get("DISPLAY", "")
    if not display:
        return f"defect-studio cannot open its window: there is no display (DISPLAY is not set); {NO_DISPLAY_ADVICE}."
    missing = missing_packages(XCB_PLUGIN_LIBRARIES)
    if missing:
        return install_line("Qt's X11 (xcb) plugin", missing)
    plugin = xcb_plugin_file()
    if plugin is not None:
        try:  # anything a newer Qt links that the list above does not name
            ctypes.CDLL(str(plugin))
        except OSError as error:
            return f"defect-studio cannot open its window: Qt's X11 (xcb) plugin does not load: {error}"
    if not x_display_answers(display):
        return (f"defect-studio cannot open its window: the X display {display} does not answer "
                f"(is the X server running, and may this user use it?); {NO_DISPLAY_ADVICE}.")
    return None

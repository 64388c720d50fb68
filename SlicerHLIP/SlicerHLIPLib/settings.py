"""What the module remembers between sessions (server URL, findings text, display choices),
through an injectable store: Slicer's QSettings in the module, a dict or a JSON file elsewhere.
Passwords and tokens are never stored.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Protocol

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
MAX_RECENT_URLS = 10


class SettingsStore(Protocol):
    def value(self, key: str, default: Any = None) -> Any: ...

    def set_value(self, key: str, value: Any) -> None: ...


class MemorySettings:
    """A store in a dict (tests, scripts)."""

    def __init__(self, values: dict | None = None):
        self.values = dict(values or {})

    def value(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set_value(self, key: str, value: Any) -> None:
        self.values[key] = value


class JsonFileSettings:
    """A store in a JSON file, rewritten atomically on every change."""

    def __init__(self, path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.values = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(self.values, dict):
                self.values = {}
        except (OSError, ValueError):
            self.values = {}

    def value(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set_value(self, key: str, value: Any) -> None:
        with self._lock:
            self.values[key] = value
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".settings-", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(self.values, f, indent=1)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise


def _as_float(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


class RememberedSettings:
    """Typed access to the module's remembered values. Keys live under ``prefix`` (QSettings groups)."""

    def __init__(self, store: SettingsStore, prefix: str = "SlicerHLIP/"):
        self.store = store
        self.prefix = prefix

    def _get(self, key: str, default: Any = None) -> Any:
        value = self.store.value(self.prefix + key, default)
        return default if value is None else value

    def _set(self, key: str, value: Any) -> None:
        self.store.set_value(self.prefix + key, value)

    @property
    def server_url(self) -> str:
        return str(self._get("serverUrl", DEFAULT_SERVER_URL)) or DEFAULT_SERVER_URL

    @server_url.setter
    def server_url(self, url: str) -> None:
        self._set("serverUrl", url)
        recent = [u for u in self.recent_server_urls if u != url]
        self._set("recentServerUrls", json.dumps([url] + recent[: MAX_RECENT_URLS - 1]))

    @property
    def recent_server_urls(self) -> list[str]:
        raw = self._get("recentServerUrls", "[]")
        try:
            urls = json.loads(raw) if isinstance(raw, str) else list(raw)
        except ValueError:
            return []
        return [str(u) for u in urls if u]

    @property
    def findings_text(self) -> str:
        return str(self._get("findingsText", ""))

    @findings_text.setter
    def findings_text(self, text: str) -> None:
        self._set("findingsText", text)

    @property
    def region(self) -> str:
        return str(self._get("region", ""))

    @region.setter
    def region(self, name: str) -> None:
        self._set("region", name)

    @property
    def probability_threshold(self) -> float:
        return _as_float(self._get("probabilityThreshold", 0.5), 0.5)

    @probability_threshold.setter
    def probability_threshold(self, value: float) -> None:
        self._set("probabilityThreshold", float(value))

    @property
    def heatmap_opacity(self) -> float:
        return _as_float(self._get("heatmapOpacity", 0.5), 0.5)

    @heatmap_opacity.setter
    def heatmap_opacity(self, value: float) -> None:
        self._set("heatmapOpacity", float(value))

    @property
    def heatmap_threshold(self) -> float:
        return _as_float(self._get("heatmapThreshold", 0.2), 0.2)

    @heatmap_threshold.setter
    def heatmap_threshold(self, value: float) -> None:
        self._set("heatmapThreshold", float(value))

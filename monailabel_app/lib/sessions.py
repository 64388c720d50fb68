"""Upload sessions (MONAI Label's ``PUT /session/``) that also keep what the upload said about its
files: the modality of each volume file, which a NIfTI/NRRD/MHA file does not carry itself."""
from __future__ import annotations

from monailabel.utils.sessions import SessionInfo, Sessions


class StudySessions(Sessions):
    """MONAI Label's session store; ``add_study`` records ``meta`` in the session's meta.info, so it
    survives a restart of the server as the session does."""

    def add_study(self, source: str, expiry: int, meta: dict) -> tuple[str, SessionInfo]:
        session_id, info = self.add_session(source, expiry)
        info.meta = dict(meta)
        self._write_meta_info(session_id, info)
        return session_id, info

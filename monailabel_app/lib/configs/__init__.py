from .hlip import DEFAULT_FINDINGS, HLIPConfig

__all__ = ["DEFAULT_FINDINGS", "HLIPConfig"]

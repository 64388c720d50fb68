from .hlip_findings import HLIPFindings

__all__ = ["HLIPFindings"]

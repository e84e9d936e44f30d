"""cxr: read chest X-rays (NIH ChestX-ray14, 14 findings). Research software, not for clinical use."""

from cxr.findings import DISPLAY_NAMES, FINDINGS

__version__ = "0.1.0"
__all__ = ["FINDINGS", "DISPLAY_NAMES", "__version__"]

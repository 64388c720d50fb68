import sys
from pathlib import Path

# test helpers (naive_reference, ...) live beside the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))

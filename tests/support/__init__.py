"""What the tests share: paths, a store builder (``storegen``), a fault-injecting TCP proxy
(``faulty_proxy``). Fixtures live in ``tests/conftest.py``."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REAL_FIXTURES = REPO / "tests" / "fixtures" / "real"

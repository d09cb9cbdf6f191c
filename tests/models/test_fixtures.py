"""fixtures/ is reproducible: regenerating gives identical bytes."""

import subprocess
import sys

from conftest import ARCHS, FIXTURES, MOE_ARCHS, ROOT


def test_regenerate_identical(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_fixtures.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(FIXTURES) for p in FIXTURES.rglob("*")
                       if p.is_file() and p.relative_to(FIXTURES).parts[0] in ARCHS + MOE_ARCHS)
    assert made == committed and len(made) == 6 * len(ARCHS + MOE_ARCHS)
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (FIXTURES / rel).read_bytes(), rel

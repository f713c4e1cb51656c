"""How the sweep CLI ends: its Ray shut down before `main` returns."""

from __future__ import annotations

from types import SimpleNamespace

from conftest import ROOT


def test_the_sweep_cli_shuts_its_ray_down_before_it_returns(tmp_path, monkeypatch):
    # Left to Ray's exit hook, the shutdown would first sleep half a second.
    from tuning import sweep

    calls = []
    monkeypatch.setattr(sweep, "INTERRUPT", SimpleNamespace(install=lambda: None))
    monkeypatch.setattr(sweep, "run_sweep", lambda loaded, **kw: calls.append("sweep") or 0)
    monkeypatch.setattr(sweep, "shutdown_ray", lambda: calls.append("shutdown"))
    argv = [str(ROOT / "configs" / "search.yaml"), "--set", f"sweep.storage_path={tmp_path}"]
    assert sweep.main(argv) == 0
    assert calls == ["sweep", "shutdown"]

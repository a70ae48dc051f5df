"""A service loads the recipes' libraries ahead: the installed ones, skipping absent ones, and a broken
install is left for its recipe to report (the service still starts)."""

import logging
import sys

from fedhealth.learning import RECIPE_LIBRARIES, preload_libraries


def test_installed_libraries_are_loaded_and_absent_ones_skipped():
    loaded = preload_libraries(("json.decoder", "fedhealth_no_such_library.sub"))
    assert loaded == ["json.decoder"]
    assert "json.decoder" in sys.modules


def test_a_library_that_fails_to_import_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    (tmp_path / "fedhealth_broken_lib.py").write_text("raise RuntimeError('half installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="fedhealth.learning._preload"):
        assert preload_libraries(("fedhealth_broken_lib",)) == []
    assert "fedhealth_broken_lib: RuntimeError: half installed" in caplog.text
    monkeypatch.delitem(sys.modules, "fedhealth_broken_lib", raising=False)


def test_torch_is_not_preloaded():
    assert not any(name.partition(".")[0] == "torch" for name in RECIPE_LIBRARIES)

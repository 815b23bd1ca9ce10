"""The trainer callbacks without their trainers installed: importing one says what to install."""

from __future__ import annotations

import importlib
import sys

import pytest


@pytest.mark.parametrize("module, package", [("lightning", "lightning.pytorch"), ("transformers", "transformers")])
def test_importing_a_callback_without_its_package_says_what_to_install(monkeypatch, module, package):
    monkeypatch.setitem(sys.modules, package, None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, f"lrviz.integrations.{module}", raising=False)
    with pytest.raises(ImportError, match=rf"lrviz.integrations.{module} needs .*: pip install 'lrviz\[{module}\]'"):
        importlib.import_module(f"lrviz.integrations.{module}")


def test_the_integrations_package_imports_no_trainer():
    code = ("import sys, lrviz.integrations; "
            "print(any(m.split('.')[0] in ('lightning', 'transformers', 'accelerate') for m in sys.modules))")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

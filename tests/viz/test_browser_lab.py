"""The case browser in a real JupyterLab on loopback, driven by Debian's Chromium through playwright."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lib.app import report
from lib.core.paths import REPO_ROOT
from lib.io import save_volume
from tests.helpers.spines import spine_mask

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = shutil.which("chromium")


ARGS = report.CHROMIUM_ARGS


SHOTS = REPO_ROOT / "runs" / "browser_test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={tmp_path}", "--LabApp.expose_app_in_browser=True",
           "--ServerApp.disable_check_xsrf=False", "--allow-root"]
    settings = tmp_path / ".jlab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JUPYTER_CONFIG_DIR=str(tmp_path / ".jcfg"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / ".jlab-settings"))
    log = open(tmp_path / "lab.log", "w")  # noqa: SIM115 - the server writes to it until the finally block closes it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"JupyterLab did not start: {(tmp_path / 'lab.log').read_text()[-2000:]}")
        yield url, token, tmp_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _write_case_notebook(root: Path) -> str:
    truth = spine_mask([24, 23, 22, 21, 20, 19], shape=(16, 16, 64))
    pred = truth.copy()
    pred[pred == 21] = 22
    ct = np.where(truth > 0, 700, 40).astype(np.int16)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    for name, arr in (("img", ct), ("gt", truth), ("pred", pred)):
        save_volume(arr, aff, root / f"{name}.nii.gz")
    src = ("from lib.core.cases import Case\nfrom lib.viz.browser import CaseBrowser\n"
           "b = CaseBrowser([Case('liver_001', 'img.nii.gz', 'gt.nii.gz', prediction='pred.nii.gz')])\n"
           "b.widget")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(root / "browser.ipynb"))
    return "browser.ipynb"


def _png_diff(a: Path, b: Path) -> float:
    x = np.asarray(Image.open(a).convert("L"), dtype=float)
    y = np.asarray(Image.open(b).convert("L").resize(Image.open(a).size), dtype=float)
    return float(np.abs(x - y).mean())


def test_case_browser_in_jupyterlab_and_report(lab):
    from playwright.sync_api import sync_playwright

    url, token, root = lab
    nb = _write_case_notebook(root)
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(f"{url}/lab/tree/{nb}?token={token}")
        page.wait_for_function("window.jupyterapp !== undefined", timeout=90_000)
        page.wait_for_selector(".jp-Notebook", timeout=90_000)
        page.wait_for_function(
            "document.querySelector('.jp-Notebook') && window.jupyterapp.shell.currentWidget"
            " && window.jupyterapp.shell.currentWidget.sessionContext"
            " && window.jupyterapp.shell.currentWidget.sessionContext.session"
            " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel", timeout=90_000)
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        img = page.locator(".jp-OutputArea-output img").first
        img.wait_for(timeout=120_000)
        page.wait_for_timeout(1500)
        before = SHOTS / "case_browser_before.png"
        img.screenshot(path=str(before))
        page.screenshot(path=str(SHOTS / "jupyterlab_case_browser.png"), full_page=True)
        src0 = img.get_attribute("src")
        # move the axial slider through its editable readout
        readout = page.locator(".widget-slider", has_text="axial").locator(".widget-readout").first
        readout.click()
        page.keyboard.press("Control+A")
        page.keyboard.type("15")
        page.keyboard.press("Enter")
        page.wait_for_function("(s) => { const i = document.querySelector('.jp-OutputArea-output img'); return i && i.src !== s; }",
                               arg=src0, timeout=60_000)
        page.wait_for_timeout(500)
        after = SHOTS / "case_browser_after.png"
        img.screenshot(path=str(after))
        assert _png_diff(before, after) > 0.5, "moving the axial slider did not change the picture"

        # the run report
        rep_root = Path(os.environ["SPINE1K_RUNS"]) / "ci"
        st = rep_root / "04_benchmark"
        (st / "tables").mkdir(parents=True)
        (st / "figures").mkdir()
        pd.DataFrame({"vertebra": ["L5", "L6", "Mean of Vertebrae"], "Test_public DSC": [0.8, 0.0, 0.7],
                      "paper Test_public DSC": [None, 0.0, 0.869]}).to_csv(st / "tables" / "table2.csv", index=False)
        shutil.copy(after, st / "figures" / "case_view.png")
        out = report.build_report("ci")
        page.goto(out.as_uri())
        assert page.locator("h1").inner_text().startswith("spine1k")
        assert page.locator("table", has_text="Mean of Vertebrae").count() == 1
        fig = page.locator("figure img").first
        fig.wait_for()
        assert page.evaluate("(i) => i.naturalWidth", fig.element_handle()) > 0, "report figure did not load"
        page.screenshot(path=str(SHOTS / "report.png"), full_page=True)
        browser.close()

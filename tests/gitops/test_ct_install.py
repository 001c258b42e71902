"""`ct install` (chart-testing, the real tool) against the local cluster, as chart CI runs it:
for each installable chart/ci/*-values.yaml a fresh namespace, `helm install --wait`, the chart's
`helm test` hook, uninstall, namespace deleted.

No `--upgrade`: ct upgrades only from a previous revision whose version it considers compatible, and
for 0.x it reads a minor bump as breaking (`~0.1.0` excludes 0.2.0), so from the released 0.1.0 it
would skip; the 0.1.0 -> 0.2.0 upgrade is tested with the packaged 0.1.0 (tests/e2e, #21). Against
its own revision (what `--upgrade` on an unchanged chart does) it would double this test's time.

ct reads chart/ci/ itself, so it runs on a copy of the chart in a scratch git repository. Three values
files need services this machine does not have and are linted only (tests/chart/test_lint.py); the
partition is checked so a new values file is not silently skipped. Two settings are added to every
case with --helm-extra-set-args: the webhook rewrites no namespace (the url-webhook case's
failurePolicy Fail would otherwise refuse every pod in the shared cluster while it is installed), and
the release does not own the CRDs (ct's random release names cannot adopt the cluster's CRDs).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.chart.chartlib import CI_VALUES
from tests.gitops.lib import CHART, ROOT, tool
from tests.support.cluster import Cluster, exclusive_chart

P = "global.networkfunctionextension."
LINT_ONLY = {
    "azure-nodeport-values.yaml": "needs an Azure storage account and two pre-created Secrets",
    "early-loading-values.yaml": "preloads images from myacr.azurecr.io and side-loads from a PVC that does not exist",
    "object-storage-values.yaml": "needs S3, cert-manager and an image pinned by a made-up digest",
}
EXTRA_SETS = " ".join([
    f"--set={P}webhook.pod.mutation.matchConditionExpression=request.namespace=='ct-rewrites-nothing'",
    f"--set={P}crds.enabled=false",
    f"--set={P}clusterRegistry.storageSize=1Gi",
])

# Installs hold the cluster-wide chart lock (tests.support.cluster.exclusive_chart), waited for first.
pytestmark = pytest.mark.timeout(3000)


def git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "ct", "GIT_AUTHOR_EMAIL": "ct@localhost", "GIT_COMMITTER_NAME": "ct",
           "GIT_COMMITTER_EMAIL": "ct@localhost", "PATH": "/usr/bin:/bin"}
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, env=env).stdout


def scratch_repo(tmp: Path) -> Path:
    """chart/ (installable ci values only) and ci/ct/, committed (ct works in a git repository)."""
    repo = tmp / "repo"
    shutil.copytree(CHART, repo / "chart")
    shutil.copytree(ROOT / "ci" / "ct", repo / "ci" / "ct")
    for name in LINT_ONLY:
        (repo / "chart" / "ci" / name).unlink()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "chart")
    return repo


def test_every_values_file_is_installed_or_lint_only_with_a_reason() -> None:
    names = {p.name for p in CI_VALUES}
    assert set(LINT_ONLY) <= names
    assert len(names - set(LINT_ONLY)) >= 4


def test_ct_install_every_installable_values_file(cluster: Cluster, tmp_path: Path) -> None:
    repo = scratch_repo(tmp_path)
    installable = sorted(p.name for p in (repo / "chart" / "ci").glob("*-values.yaml"))
    # The CRDs the releases leave unowned, as a platform team installs them before the chart.
    crds = subprocess.run([tool("helm"), "template", "crds", str(CHART), "--show-only", "templates/crds/artifacts.yaml",
                           "--show-only", "templates/crds/components.yaml"], capture_output=True, text=True, check=True).stdout
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=crds)
    env = dict(cluster.env(), PATH=f"{ROOT / '.cache' / 'bin'}:{ROOT / '.venv' / 'bin'}:/usr/bin:/bin")
    with exclusive_chart():
        result = subprocess.run(
            [tool("ct"), "install", "--config", "ci/ct/ct.yaml", "--charts", "chart", "--helm-extra-set-args", EXTRA_SETS],
            cwd=repo, env=env, capture_output=True, text=True, check=False, timeout=3000)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "All charts installed successfully" in output, output[-3000:]
    for name in installable:
        assert f'Installing chart with values file "chart/ci/{name}"' in output, (name, output[-3000:])
    # one `helm test` per install: its probe Pod succeeded every time
    assert output.count("TEST SUITE:     chart-") >= len(installable), output[-3000:]
    assert output.count("Phase:          Succeeded") >= len(installable), output[-3000:]

"""The dashboard's command-line surface: ``orchestrator serve`` adds the dashboard unless --no-dashboard and
the metrics only with --metrics-port; ``site dashboard`` refuses a folder that is no site home in one line."""

from __future__ import annotations

from typer.testing import CliRunner

from fedhealth.cli import app
from fedhealth.cli._services import _serve_extensions
from fedhealth.dashboard import DashboardExtension, MetricsExtension
from fedhealth.orchestrator import default_extensions

runner = CliRunner()


def test_serve_adds_the_dashboard_by_default_and_the_metrics_only_when_asked():
    defaults = [type(e) for e in default_extensions()]
    plain = _serve_extensions(dashboard=False, metrics_port=None, metrics_host="127.0.0.1")
    assert [type(e) for e in plain] == defaults
    served = _serve_extensions(dashboard=True, metrics_port=None, metrics_host="127.0.0.1")
    assert [type(e) for e in served] == [*defaults, DashboardExtension]
    metrics = _serve_extensions(dashboard=True, metrics_port=9999, metrics_host="127.0.0.1")
    assert isinstance(metrics[-2], MetricsExtension)
    assert (metrics[-2].host, metrics[-2].requested_port) == ("127.0.0.1", 9999)


def test_site_dashboard_refuses_a_folder_that_is_no_site_home(tmp_path):
    result = runner.invoke(app, ["site", "dashboard", "--home", str(tmp_path / "nowhere"), "--port", "0"])
    assert result.exit_code == 1
    assert result.output.startswith("error:")
    assert "Traceback" not in result.output


def test_serve_help_names_the_dashboard_and_metrics_options():
    result = runner.invoke(app, ["orchestrator", "serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--no-dashboard", "--metrics-port", "--metrics-host"):
        assert option in result.output

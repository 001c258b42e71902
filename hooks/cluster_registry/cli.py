"""The ``cluster-registry`` command line: one click group, each subcommand imported on first use."""

from __future__ import annotations

import gc
import importlib

import click

from cluster_registry import __version__, logs

# subcommand -> "module:attribute"; imported lazily so `webhook` never loads the GC's code and so on.
COMMANDS = {
    "webhook": "cluster_registry.webhook.cli:webhook",
    "reconcile": "cluster_registry.reconcile.cli:reconcile",
    "gc": "cluster_registry.gc.cli:gc",
    "validate": "cluster_registry.install.validate:validate",
    "preload": "cluster_registry.install.preload:preload",
    "sideload": "cluster_registry.install.sideload:sideload",
    "export": "cluster_registry.install.export:export",
    "copy": "cluster_registry.oci.cli:copy",
    # Beyond the fixed list: the registry's token service and the webhook's certificate manager.
    "token-service": "cluster_registry.gate.cli:token_service",  # distribution's token realm
    "certs": "cluster_registry.certs.cli:certs",
    "registry-secret": "cluster_registry.install.registry_secret:registry_secret",
    "node-proxy": "cluster_registry.nodeproxy.cli:node_proxy",  # the registry on each node's loopback
    "wait-drained": "cluster_registry.drainwait:wait_drained",  # the registry pod's preStop: clients got every byte
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        # A subcommand's import allocates tens of thousands of objects that live as long as the
        # process: collecting meanwhile is wasted start-up time (about 10% of `copy`'s), and
        # freezing them keeps later collections from walking them again.
        enabled = gc.isenabled()
        gc.disable()
        try:
            command = getattr(importlib.import_module(module), attr)
        finally:
            if enabled:
                gc.enable()
        gc.freeze()
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"auto_envvar_prefix": "CLUSTER_REGISTRY"})
@click.version_option(__version__)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--log-level", default="INFO", show_default=True)
def cli(log_format: str, log_level: str) -> None:
    """In-cluster image registry for Kubernetes."""
    logs.setup(log_format, log_level)


def main() -> None:
    cli()

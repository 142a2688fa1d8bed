"""The ``connhex-edge-ota`` command line.

Exit codes: 0 success, 1 the operation failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from connhex_edge_ota import __version__
from connhex_edge_ota.agent import StepHost, configure_each, host_plugin_manager, run_agent
from connhex_edge_ota.archive import ArchiveError, Limits
from connhex_edge_ota.config import ConfigError, OtaSettings, load_settings, named_config
from connhex_edge_ota.console import Console, interruptible, print_result, status_line, wants_json
from connhex_edge_ota.logs import (
    LEVEL_ENV,
    LEVELS,
    hide_status_lines,
    resolve_level,
    setup_logging,
)
from connhex_edge_ota.natsauth import NatsAuth, nats_auth, redact
from connhex_edge_ota.state import load_state
from connhex_edge_ota.status import Status
from connhex_edge_ota.store import Busy, Store

log = logging.getLogger("connhex_edge_ota")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROG = "connhex-edge-ota"
DESCRIPTION = """\
Keeps this device on the latest firmware release of its model, over the air.

"run" is the service: it checks the Connhex OTA API, downloads and installs
releases and reports each step on NATS. "check", "download" and "install" do
one step by hand, with the same rules and plugins.

Exit codes: 0 success (also "already up to date"), 1 the operation failed,
2 bad usage or configuration."""
SERVICE_COMMANDS = ("run", "serve", "demo")
"""Commands that log at INFO by default; the others only say what went wrong."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; ``(default: X)`` after every option that has a default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and default not in (None, False, argparse.SUPPRESS)
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=DESCRIPTION, formatter_class=_Help)
    parser.add_argument("--version", action="version", version=__version__)
    level_help = (
        f"log level (default: ${LEVEL_ENV}, else INFO for run, serve and demo, "
        "WARNING for the others)"
    )
    parser.add_argument("--log-level", type=str.upper, choices=LEVELS, help=level_help)
    # The same option after the subcommand; SUPPRESS keeps it from hiding one given before.
    common = _Parser(add_help=False)
    common.add_argument(
        "--log-level", type=str.upper, choices=LEVELS, default=argparse.SUPPRESS, help=level_help
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help_text, description=help_text, parents=[common], formatter_class=_Help
        )

    def with_config(name: str, help_text: str, json_flag: bool = False) -> None:
        found = command(name, help_text)
        found.add_argument(
            "--config",
            metavar="PATH",
            help="the agent's agent.toml (default: $CONNHEX_AGENT_CONFIG, "
            "else /opt/connhex/configs/agent.toml)",
        )
        if json_flag:
            found.add_argument(
                "--json",
                action="store_true",
                help="print JSON (also the default when stdout is not a terminal)",
            )

    with_config("run", "the service: runs until SIGTERM/SIGINT")
    with_config("check", "check for a new release once", json_flag=True)
    with_config(
        "download", "check, then download the offered release (resumes a partial one)", True
    )
    with_config("install", "check, then install the offered release (downloads first)", True)
    with_config("status", "the persisted state (JSON when stdout is not a terminal)", True)
    with_config("plugins", "the plugins the agent would load, with their distributions")
    pack = command("pack", "build, sign and check a release file")
    pack.add_argument("dir", type=Path, help="folder with update.sh (and the payload) at its root")
    pack.add_argument("-o", "--output", type=Path, required=True, help="the release zip to write")
    pack.add_argument("--key", type=Path, help="Ed25519 private key (PEM) to sign with")
    pack.add_argument(
        "--version",
        dest="release_version",
        default="",
        help="the release's version, recorded in the manifest (required with --key)",
    )
    pack.add_argument("--model", default="", help="the device type the release is for")
    pack.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    keygen = command("keygen", "make an Ed25519 key pair: KEY (private, 0600) and KEY.pub")
    keygen.add_argument("key", type=Path, help="path of the private key to create")
    verify = command("verify", "check a release file as the installer would")
    verify.add_argument("zip", type=Path, help="the release zip")
    verify.add_argument(
        "--public-key", metavar="PUB", help="a .pub file, or the key inline (PEM or base64)"
    )
    serve = command("serve", "a local release server for a folder of release zips")
    serve.add_argument("dir", type=Path, help="folder of release zips; the newest is offered")
    serve.add_argument("--port", type=int, default=8080, help="TCP port (0 picks a free one)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--init-key", help="require 'Authorization: Thing <key>'")
    demo = command("demo", "the whole update cycle on this machine")
    demo.add_argument(
        "--timeout", type=float, default=30.0, help="seconds before the demo gives up"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    default_level = "INFO" if args.command in SERVICE_COMMANDS else "WARNING"
    try:
        level = resolve_level(args.log_level, default_level)
    except ValueError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(level)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, where a closed pipe can still be handled
        return code
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except Busy as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # `status | head`: the reader left; say nothing more, and do not fail at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as exc:
        print(f"{PROG} {args.command}: {_os_error(exc)}", file=sys.stderr)
        return EXIT_FAILED


def _os_error(exc: OSError) -> str:
    """One line for an OSError: the file or address, and the reason."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is not None:
        return f"{exc.filename}: {reason}"
    return reason


def _check_store(settings: OtaSettings) -> None:
    """The store folder exists or can be made: else a config error naming install_dir."""
    try:
        Store(settings.store_dir).create()
    except OSError as exc:
        raise ConfigError(
            f"config error: [ota] install_dir = '{settings.install_dir}': "
            f"cannot create {settings.store_dir}: {exc.strerror or exc}"
        ) from None


def _run(args: argparse.Namespace) -> int:
    path = named_config(args.config)
    settings = load_settings(path)
    settings.require_server()
    _check_store(settings)
    return run_agent(path)


def _status(args: argparse.Namespace) -> int:
    settings = load_settings(named_config(args.config))
    hint = settings.missing_file_hint()
    if hint and "CONNHEX_OTA_INSTALL_DIR" not in os.environ:
        raise ConfigError(f"config error: cannot tell where the state is{hint}")
    store = Store(settings.store_dir)
    state, warning = load_state(store)
    if warning:
        print(warning, file=sys.stderr)
    if not store.state_file.exists():
        print(f"no state yet at {store.state_file}: the service has not run", file=sys.stderr)
    if wants_json(args.json):
        print(state.model_dump_json(indent=2))
        return EXIT_OK
    status = Status(
        state.current_version, state.latest_version, state.status, state.error, state.last_checked
    )
    print(status_line(status))
    print(f"last checked: {state.last_checked or 'never'}")
    if state.partial is not None:
        print(f"partial download: {state.partial.version}, {state.partial.durable} bytes saved")
    return EXIT_OK


def _step(args: argparse.Namespace) -> int:
    """``check``, ``download`` or ``install`` by hand, with the service's rules and hooks."""
    from connhex_edge_ota.service import OtaService

    path = named_config(args.config)
    settings = load_settings(path)
    settings.require_server()
    _check_store(settings)
    # The lifecycle of `run`: plugins loaded and checked, each configured from its table.
    pm, _ = host_plugin_manager(path)
    StepHost(path, pm).configure()
    store = Store(settings.store_dir)
    try:
        store.lock()
    except Busy as exc:
        return _forward(
            args.command, settings.nats_url, str(exc), wants_json(args.json), nats_auth(settings)
        )

    console = Console(json_lines=args.json)
    if not logging.getLogger().isEnabledFor(logging.INFO):
        hide_status_lines()  # the console says each status; asked-for logs keep them

    async def step() -> int:
        service = OtaService(
            settings,
            pm,
            store,
            reporters=[console.show_status],
            progress_printer=console.progress,
        )
        service.open()
        downloading = lambda: service.state.status == "downloading"  # noqa: E731
        with interruptible(console, downloading, service.cancel_transfer):
            await service.recover()
            result = await service.operator_step(args.command)
        service.server.close()
        if console.interrupted and service.state.status == "download_failed":
            console.say(
                f"stopped at {console.done / 2**20:.1f} of {console.total / 2**20:.1f} MiB; "
                f"the partial download is kept: `{PROG} download` resumes it"
            )
        reply = {"ok": result.ok, "error": result.error, "status": service.status().payload()}
        if result.note:
            reply["note"] = result.note
        print_result(reply, wants_json(args.json), note=result.note)
        await service.drain_hooks()  # status plugins get the last status (within hook_timeout)
        return EXIT_OK if result.ok else EXIT_FAILED

    try:
        return asyncio.run(step())
    except asyncio.CancelledError:
        console.say("interrupted; an install cut short is rolled back at the next start")
        return EXIT_FAILED
    finally:
        store.unlock()


def _forward(
    verb: str, nats_url: str, busy: str, as_json: bool, auth: NatsAuth | None = None
) -> int:
    """The service holds the store: ask it over NATS instead, or say it is busy."""
    from connhex_edge_ota.commands import subject

    async def ask() -> bytes:
        import nats

        async def quiet(_exc: Exception) -> None:
            return None

        # nats-py keeps retrying a refused first connection: bound it ourselves.
        options = auth.connect_options() if auth is not None else {}
        nc = await asyncio.wait_for(
            nats.connect(
                nats_url, connect_timeout=2, allow_reconnect=False, error_cb=quiet, **options
            ),
            3,
        )
        try:
            reply = await nc.request(subject(verb), b"{}", timeout=5)
            return reply.data
        finally:
            await nc.close()

    try:
        answer = asyncio.run(ask())
    except Exception as exc:
        reason = redact(str(exc) or type(exc).__name__)
        print(
            f"{busy}; the running service could not be reached over NATS at "
            f"{redact(nats_url)}: {reason}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    reply = json.loads(answer)
    print_result(reply, as_json, note=str(reply.get("note", "")), told=False)
    return EXIT_OK if reply.get("ok") else EXIT_FAILED


def _plugins(args: argparse.Namespace) -> int:
    """One line per plugin; exit 1 when any was refused, failed to import or has a bad table."""
    path = named_config(args.config)
    logging.getLogger("connhex_edge_ota.loading").setLevel(logging.CRITICAL)  # listed below
    pm, loaded = host_plugin_manager(path)
    bad_tables = configure_each(StepHost(path, pm))
    failed = False
    for plugin in loaded:
        state = plugin.error or bad_tables.get(plugin.name, "") or "loaded"
        failed = failed or plugin.failed or plugin.name in bad_tables
        print(f"{plugin.name}\t{plugin.distribution} {plugin.version}\t{state}")
    return EXIT_FAILED if failed else EXIT_OK


def _pack(args: argparse.Namespace) -> int:
    from connhex_edge_ota.pack import PackUsageError, pack
    from connhex_edge_ota.signing import KeyFileError

    try:
        out = pack(
            args.dir, args.output, args.key, args.release_version, args.model, overwrite=args.force
        )
    except PackUsageError as exc:
        print(f"pack: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FileExistsError:
        print(f"pack: {args.output} exists; not overwritten (use --force)", file=sys.stderr)
        return EXIT_FAILED
    except (ArchiveError, KeyFileError) as exc:
        print(f"pack: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(out)
    return EXIT_OK


def _keygen(args: argparse.Namespace) -> int:
    from connhex_edge_ota.signing import keygen

    try:
        public = keygen(args.key)
    except FileExistsError:
        print(f"keygen: {args.key} exists; not overwritten", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"keygen: cannot write {args.key}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.key}\n{public}")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from connhex_edge_ota.pack import check_release, release_problems
    from connhex_edge_ota.signing import KeyFileError, load_public_key

    try:
        key = load_public_key(args.public_key) if args.public_key else None
    except KeyFileError as exc:
        print(f"{args.zip}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    problems = release_problems(args.zip, key, Limits())
    if problems:  # each bad member, one line each
        for problem in problems:
            print(f"{args.zip}: {problem}", file=sys.stderr)
        return EXIT_FAILED
    try:
        manifest = check_release(args.zip, key, Limits())
    except ArchiveError as exc:  # release_problems said none: only a race can get here
        print(f"{args.zip}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    identity = f"version {manifest.version or '(none)'}, model {manifest.model or '(any)'}"
    if args.public_key:
        print(f"{args.zip}: ok, signature verified; signed for {identity}")
    elif manifest.files:
        print(f"{args.zip}: ok; manifest says {identity} (signature not checked)")
    else:
        print(f"{args.zip}: ok (no manifest; signature not checked)")
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from connhex_edge_ota.server import ReleaseServer

    if not args.dir.is_dir():
        print(f"serve: {args.dir} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    try:
        server = ReleaseServer(args.dir, host=args.host, port=args.port, init_key=args.init_key)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(
                f"serve: {args.host}:{args.port} is already in use; choose another --port",
                file=sys.stderr,
            )
        else:
            print(
                f"serve: cannot listen on {args.host}:{args.port}: {_os_error(exc)}",
                file=sys.stderr,
            )
        return EXIT_FAILED
    active = server.releases.active()
    print(
        f"serving {args.dir} on http://{args.host}:{server.port}/iot/ota/<init_id>; "
        f"active release: {active.version if active else 'none'}",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from connhex_edge_ota.demo import run_demo

    return run_demo(args.timeout)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _run,
    "check": _step,
    "download": _step,
    "install": _step,
    "status": _status,
    "plugins": _plugins,
    "pack": _pack,
    "keygen": _keygen,
    "verify": _verify,
    "serve": _serve,
    "demo": _demo,
}

if __name__ == "__main__":
    sys.exit(main())

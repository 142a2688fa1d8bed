"""The ``connhex-edge-ota`` command line.

Exit codes: 0 success, 1 the operation failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from connhex_edge_ota import __version__
from connhex_edge_ota.agent import host_plugin_manager, run_agent
from connhex_edge_ota.archive import ArchiveError, Limits
from connhex_edge_ota.config import ConfigError, config_path, load_settings
from connhex_edge_ota.natsauth import NatsAuth, nats_auth, redact
from connhex_edge_ota.status import Status
from connhex_edge_ota.store import Busy, Store

log = logging.getLogger("connhex_edge_ota")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="connhex-edge-ota", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text)
        command.add_argument(
            "--config",
            help="agent.toml (default: $CONNHEX_AGENT_CONFIG, "
            "else /opt/connhex/configs/agent.toml)",
        )
        return command

    with_config("run", "the service: runs until SIGTERM/SIGINT")
    with_config("check", "check for a new release once")
    with_config("download", "download the offered release")
    with_config("install", "install the offered release (downloads first when needed)")
    with_config("status", "the persisted state, as JSON")
    with_config("plugins", "the plugins the agent would load, with their distributions")
    pack = sub.add_parser("pack", help="build, sign and check a release file")
    pack.add_argument("dir", type=Path)
    pack.add_argument("-o", "--output", type=Path, required=True)
    pack.add_argument("--key", type=Path, help="Ed25519 private key (PEM) to sign with")
    keygen = sub.add_parser("keygen", help="make an Ed25519 key pair: KEY and KEY.pub")
    keygen.add_argument("key", type=Path)
    verify = sub.add_parser("verify", help="check a release file as the installer would")
    verify.add_argument("zip", type=Path)
    verify.add_argument("--public-key", help="a .pub file, or the key inline")
    serve = sub.add_parser("serve", help="a local release server for a folder of release zips")
    serve.add_argument("dir", type=Path)
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--init-key", help="require 'Authorization: Thing <key>'")
    demo = sub.add_parser("demo", help="the whole update cycle on this machine")
    demo.add_argument("--timeout", type=float, default=30.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except Busy as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


def _run(args: argparse.Namespace) -> int:
    return run_agent(config_path(args.config))


def _status(args: argparse.Namespace) -> int:
    settings = load_settings(config_path(args.config))
    state, warning = Store(settings.store_dir).load()
    if warning:
        print(warning, file=sys.stderr)
    print(state.model_dump_json(indent=2))
    return EXIT_OK


def _step(args: argparse.Namespace) -> int:
    """``check``, ``download`` or ``install`` by hand, with the service's rules and hooks."""
    from connhex_edge_ota.service import OtaService

    path = config_path(args.config)
    settings = load_settings(path)
    settings.require_server()
    pm, _ = host_plugin_manager(path)
    store = Store(settings.store_dir)
    try:
        store.lock()
    except Busy as exc:
        return _forward(args.command, settings.nats_url, str(exc), nats_auth(settings))

    async def show(status: Status) -> None:
        print(json.dumps(status.payload()), file=sys.stderr)

    async def step() -> int:
        service = OtaService(
            settings, pm, store, reporters=[show], progress_printer=_progress_printer()
        )
        service.open()
        await service.recover()
        result = await service.operator_step(args.command)
        service.server.close()
        print(
            json.dumps(
                {"ok": result.ok, "error": result.error, "status": service.status().payload()}
            )
        )
        return EXIT_OK if result.ok else EXIT_FAILED

    try:
        return asyncio.run(step())
    finally:
        store.unlock()


def _forward(verb: str, nats_url: str, busy: str, auth: NatsAuth | None = None) -> int:
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
    print(answer.decode())
    return EXIT_OK if json.loads(answer).get("ok") else EXIT_FAILED


def _progress_printer() -> Callable[[int, int], None]:
    tty = sys.stderr.isatty()
    last_tenth = [-1]

    def show(done: int, total: int) -> None:
        share = done / total if total else 1.0
        if tty:
            filled = int(share * 30)
            bar = "#" * filled + "-" * (30 - filled)
            end = "\n" if done >= total else ""
            print(
                f"\r[{bar}] {share:6.1%} {done / 2**20:.1f}/{total / 2**20:.1f} MiB",
                end=end,
                file=sys.stderr,
                flush=True,
            )
        elif int(share * 10) != last_tenth[0]:
            last_tenth[0] = int(share * 10)
            print(f"downloaded {done} of {total} bytes ({share:.0%})", file=sys.stderr)

    return show


def _plugins(args: argparse.Namespace) -> int:
    _pm, loaded = host_plugin_manager(config_path(args.config))
    for plugin in loaded:
        state = plugin.error or "loaded"
        print(f"{plugin.name}\t{plugin.distribution} {plugin.version}\t{state}")
    return EXIT_OK


def _pack(args: argparse.Namespace) -> int:
    from connhex_edge_ota.pack import pack
    from connhex_edge_ota.signing import KeyFileError

    try:
        out = pack(args.dir, args.output, args.key)
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
    print(f"{args.key}\n{public}")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from connhex_edge_ota.pack import check_release
    from connhex_edge_ota.signing import KeyFileError, load_public_key

    try:
        key = load_public_key(args.public_key) if args.public_key else None
        check_release(args.zip, key, Limits())
    except (ArchiveError, KeyFileError) as exc:
        print(f"{args.zip}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.zip}: ok" + (" (signature verified)" if args.public_key else ""))
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from connhex_edge_ota.server import ReleaseServer

    if not args.dir.is_dir():
        print(f"serve: {args.dir} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    server = ReleaseServer(args.dir, host=args.host, port=args.port, init_key=args.init_key)
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

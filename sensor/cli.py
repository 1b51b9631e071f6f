"""Command line: ``purge-sensor read|names|signatures|hosts|report``.

Data goes to stdout, diagnostics to stderr.  Exit codes: 0 success, 1 unreadable
capture, 2 usage or configuration error (bad config, bad signatures, bad sink), 3 the
state process of a split read died (the inventory keeps what it had committed).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import signal
import sys
from collections import Counter

from . import __version__
from .capture.pcapfile import CaptureError, open_capture
from .config import ConfigError, Settings, load_config
from .records import ClientHello, DnsMessage, HttpRequest

EXIT_OK, EXIT_CAPTURE, EXIT_USAGE, EXIT_STATE_PROCESS = 0, 1, 2, 3


def _add_sensor_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file; command-line options override it")
    p.add_argument("--signatures", "-s", action="append", metavar="PATH",
                   help="signature file or directory (repeatable; default: the bundled set)")
    p.add_argument("--internal", action="append", metavar="CIDR",
                   help="internal network (repeatable; default RFC 1918, 100.64/10, fc00::/7)")
    p.add_argument("--resolver", dest="resolvers", action="append", metavar="IP",
                   help="declare an internal DNS resolver (repeatable)")
    p.add_argument("--state", metavar="PATH", help="SQLite inventory (default: $PURGE_SENSOR_STATE, "
                   "$STATE_DIRECTORY/inventory.sqlite or ~/.local/state/purge-sensor/inventory.sqlite)")
    p.add_argument("--no-state", action="store_true", help="keep the inventory in memory only")
    p.add_argument("--output", "-o", dest="outputs", action="append", metavar="SINK",
                   help="alert sink, repeatable: '-' or 'stdout', FILE or 'file:FILE', "
                        "'syslog+udp://H:P', 'syslog+tcp://H:P', 'syslog+tls://H:P?ca=..', "
                        "'cef+udp|tcp|tls://H:P' (default: stdout)")
    p.add_argument("--spool-dir", metavar="DIR", help="on-disk spool for network sinks")
    p.add_argument("--suppress-window", type=float, metavar="SECONDS",
                   help="repeat alerts for the same host, indicator and action are summarised "
                        "after this window (default 3600)")
    p.add_argument("--dedup-window", type=float, metavar="SECONDS",
                   help="identical packets within this window are span duplicates (default 0.05; 0 = off)")
    p.add_argument("--dormant-days", type=float, metavar="DAYS",
                   help="a host with no evidence for this long is dormant (default 14)")
    p.add_argument("--observer", metavar="NAME", help="observer.name in alerts (default: hostname)")
    p.add_argument("--metrics", metavar="ADDR", help="serve Prometheus metrics on [HOST:]PORT (default host 127.0.0.1)")
    p.add_argument("--metrics-host-cap", type=int, metavar="N",
                   help="cap on per-host install series (default 1000)")
    p.add_argument("--removal-start", metavar="DATE",
                   help="date removal began (YYYY-MM-DD), exported for the alert rules")


def _settings(args) -> Settings:
    values = load_config(args.config) if getattr(args, "config", None) else {}
    settings = Settings(**values)
    for name in ("signatures", "internal", "resolvers", "outputs"):
        given = getattr(args, name, None)
        if given:
            setattr(settings, name, [("stdout" if v == "-" else v) for v in given]
                    if name == "outputs" else list(given))
    for name in ("state", "spool_dir", "suppress_window", "dedup_window", "dormant_days",
                 "observer", "metrics", "metrics_host_cap", "removal_start"):
        given = getattr(args, name, None)
        if given is not None:
            setattr(settings, name, given)
    if getattr(args, "no_state", False):
        settings.no_state = True
    if getattr(args, "linger", False):
        settings.linger = True
    return settings


def _iterate(paths, on_error, prefilter=False, user_filter=None):
    """Yield (path, capture) for each readable capture; report the unreadable ones.

    With ``prefilter`` the sensor's capture filter (and ``user_filter``) is applied by
    libpcap before Python sees a packet, as live capture does in the kernel."""
    if prefilter:
        from .capture.bpf import open_prefiltered
    for path in paths:
        try:
            cap = open_prefiltered(path, user_filter) if prefilter else open_capture(path)
        except CaptureError as err:
            on_error(str(err))
            continue
        with cap:
            yield path, cap


# The cyclic collector's generation-0 threshold while a read runs.  Records and table
# entries die young or live for the whole read, and no cycles are made per packet: at the
# default (700) the collector ran 32 times per read of the benchmark mix, for 12 ms, and
# freed next to nothing; at this one twice, for 3-4 ms.
READ_GC_THRESHOLD = 20_000


def cmd_read(args) -> int:
    saved = gc.get_threshold()
    gc.set_threshold(READ_GC_THRESHOLD, *saved[1:])
    try:
        return _read(args)
    finally:
        gc.set_threshold(*saved)


def _read(args) -> int:
    try:
        if args.bpf:
            from .capture.bpf import compile_filter

            compile_filter(args.bpf)
        settings = _settings(args)
    except (ConfigError, ValueError) as err:
        print(f"purge-sensor: {err}", file=sys.stderr)
        return EXIT_USAGE
    failed = []

    def on_error(msg):
        failed.append(msg)
        print(f"purge-sensor: {msg}", file=sys.stderr)

    # The first capture opens before the pipeline is even imported: libpcap's reader thread
    # reads and filters while the modules, signatures and state store load
    # (PrefilteredCapture.batches).  Whatever ends the read, the capture is closed here:
    # an exception left to unwind past a running reader thread (a failed import, say) made
    # the interpreter's exit crash in libpcap.
    prefilter = args.bpf_prefilter or bool(args.bpf)
    captures = _iterate(args.captures, on_error, prefilter, args.bpf)
    try:
        return _read_captures(args, settings, captures, prefilter, failed)
    finally:
        captures.close()


def _read_captures(args, settings, captures, prefilter: bool, failed: list) -> int:
    split = None
    if getattr(args, "split", False):
        from . import split_read

        if split_read.usable(settings):
            try:
                split = split_read.fork(settings, args.quiet)
            except OSError as err:
                print(f"purge-sensor: warning: reading in one process: cannot fork the state "
                      f"process: {err}", file=sys.stderr)
    first = next(captures, None)
    if first is not None and hasattr(first[1], "batches"):
        first[1].batches()
    from .decoding import Progress

    progress = Progress(sys.stderr.isatty() and not args.quiet)
    if split is not None:
        try:
            sensor = split_read.decoding_side(settings, split)
        except split_read.START_ERRORS as err:
            split.abandon()
            print(f"purge-sensor: {err}", file=sys.stderr)
            return EXIT_USAGE
    else:
        from .pipeline import SENSOR_START_ERRORS, Sensor

        try:
            sensor = Sensor(settings)
        except SENSOR_START_ERRORS as err:
            print(f"purge-sensor: {err}", file=sys.stderr)
            return EXIT_USAGE
    metrics = None
    if settings.metrics:
        try:
            from .output.metrics import start_metrics

            metrics = start_metrics(settings, sensor)
        except (OSError, ValueError) as err:
            print(f"purge-sensor: metrics: {err}", file=sys.stderr)
            sensor.close()
            return EXIT_USAGE
    signal.signal(signal.SIGHUP, lambda *_: sensor.reopen())
    # What start-up built (modules, signatures, tables) lives as long as the process: out
    # of the collector's way, the full collections a long read triggers stay short.
    gc.freeze()
    handle = sensor.handle
    stats = sensor.stats
    stopped_by = () if split is None else split_read.StateProcessFailed
    try:
        for path, cap in itertools.chain([first] if first is not None else [], captures):
            batches = getattr(cap, "batches", None)
            if batches is not None:
                from .capture.bpf import Batch

                handle_batch = sensor.handle_batch
                units = cap.units
                # The flows the decoder is done with are left to libpcap's filter.
                sensor.attach_shunts(cap.shunts)
                count = 0
                for item in batches():
                    if type(item) is Batch:
                        handle_batch(item.linktype, item.buf, item.meta, item.interface, units, item.others)
                    else:
                        handle(*item)
                    count += 1
                    if not count & 0x3F:
                        progress.update(path, cap.tell(), cap.size, stats.packets)
            else:
                count = 0
                for ts, linktype, data, wire_len, iface in cap:
                    handle(ts, linktype, data, wire_len, iface)
                    count += 1
                    if not count & 0x3FFF:
                        progress.update(path, cap.tell(), cap.size, stats.packets)
            sensor.attach_shunts(None)
            if cap.truncated:
                stats.capture_errors.append(f"{path}: {cap.truncated}")
                print(f"purge-sensor: warning: {path}: {cap.truncated}", file=sys.stderr)
            if cap.skipped:
                # Records naming no described interface or an impossible time.
                stats.malformed["capture_record"] += cap.skipped
    except KeyboardInterrupt:
        print("purge-sensor: interrupted", file=sys.stderr)
    except stopped_by:
        pass  # the state process is gone: close() says why
    finally:
        captures.close()
        progress.clear()
        sensor.close(snapshot=not args.quiet or metrics is not None)
    failure = getattr(sensor, "failure", None)
    if failure is not None:
        print(f"purge-sensor: {failure}", file=sys.stderr)
        return EXIT_USAGE if sensor.failed_to_start else EXIT_STATE_PROCESS
    if not args.quiet:
        _summary(sensor, filtered=prefilter)
    if metrics is not None and settings.linger:
        print(f"purge-sensor: serving metrics on {settings.metrics}; Ctrl-C to stop", file=sys.stderr)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return EXIT_CAPTURE if failed else EXIT_OK


def _summary(sensor, filtered: bool) -> None:
    """The read summary.  With the capture filter, libpcap counts nothing it rejects, so
    the packet count says it is of the packets the filter passed (tcpdump's wording)."""
    from .decode.packet import SHUNT_AFTER

    s = sensor.stats
    w = sys.stderr.write
    passed = " passed by filter" if filtered else ""
    w(f"packets {s.packets:,}{passed}  bytes {s.bytes:,}  decoded {s.decoded:,}  "
      f"duplicates {s.duplicates:,}  alerts {sensor.alerts:,}\n")
    if s.shunted_flows:
        w(f"shunted flows {s.shunted_flows:,}: uploads whose segments past the first "
          f"{SHUNT_AFTER // 1024} KB the capture filter dropped\n")
    if s.dns_servers_screened:
        w(f"DNS servers screened {s.dns_servers_screened:,}: their messages that name no signature "
          f"label the capture filter dropped\n")
    if s.malformed:
        w("malformed: " + ", ".join(f"{k}={v}" for k, v in sorted(s.malformed.items())) + "\n")
    if s.matches:
        w("matches by category: " + ", ".join(f"{k}={v}" for k, v in sorted(s.matches.items())) + "\n")
    actions = Counter()
    for (action, _), n in s.detections.items():
        actions[action] += n
    if actions:
        w("detections by action: " + ", ".join(f"{k}={v}" for k, v in sorted(actions.items())) + "\n")
    hosts = sensor.host_snapshot
    verdicts = Counter(h.get("verdict") or "none" for h in hosts)
    if verdicts:
        w("hosts by verdict: " + ", ".join(f"{k}={v}" for k, v in sorted(verdicts.items())) + "\n")
    loss = s.capture_loss
    if loss["acks"]:
        w(f"capture loss: {loss['gaps']:,} of {loss['acks']:,} acks covered unseen bytes "
          f"({100.0 * loss['gaps'] / loss['acks']:.2f}%), {loss['gap_bytes']:,} of "
          f"{loss['acked_bytes']:,} bytes\n")
    for err in s.capture_errors:
        w(f"capture: {err}\n")


def cmd_names(args) -> int:
    """Print every name the decoders extract, like ``tshark -T fields``: for comparison and triage."""
    from .decode.packet import DecoderConfig, PacketDecoder
    from .stats import Stats

    stats = Stats()
    decoder = PacketDecoder(stats, DecoderConfig(dedup_window=args.dedup_window))
    out = sys.stdout
    failed = []

    def on_error(msg):
        failed.append(msg)
        print(f"purge-sensor: {msg}", file=sys.stderr)

    def row(ctx, kind, value):
        out.write(f"{ctx.ts:.6f}\t{ctx.src_ip}\t{ctx.dst_ip}\t{kind}\t{value}\n")

    for path, cap in _iterate(args.captures, on_error):
        for ts, linktype, data, _, iface in cap:
            for rec in decoder.decode(ts, linktype, data, iface):
                if isinstance(rec, DnsMessage):
                    for q in rec.questions:
                        row(rec.ctx, "dns", q.name.text)
                elif isinstance(rec, ClientHello):
                    if rec.server_name is not None:
                        row(rec.ctx, "quic_sni" if rec.over == "quic" else "tls_sni",
                            rec.server_name.text)
                    if args.ja3 and rec.ja3:
                        row(rec.ctx, "ja3", rec.ja3)
                        row(rec.ctx, "ja3_hash", hashlib.md5(rec.ja3.encode()).hexdigest())
                    if args.ja3 and rec.ja4:
                        row(rec.ctx, "ja4", rec.ja4)
                elif isinstance(rec, HttpRequest) and rec.host is not None:
                    row(rec.ctx, "http_host", rec.host.text)
        if cap.truncated:
            print(f"purge-sensor: warning: {path}: {cap.truncated}", file=sys.stderr)
    decoder.finish()
    if stats.malformed and not args.quiet:
        print("malformed: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.malformed.items())),
              file=sys.stderr)
    return EXIT_CAPTURE if failed else EXIT_OK


def cmd_signatures_check(args) -> int:
    from .detect.signatures import check_command, default_signature_paths

    return check_command(args.paths or default_signature_paths(), sys.stdout, sys.stderr)


def cmd_metrics_password(args) -> int:
    import getpass

    from .output.metrics import hash_password

    password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else \
        getpass.getpass("metrics password: ")
    if not password:
        print("purge-sensor: empty password", file=sys.stderr)
        return EXIT_USAGE
    print(hash_password(password))
    return EXIT_OK


OWN_COMMANDS = ("read", "names", "signatures", "metrics-password")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; given the command about to run, only the subparsers this module
    defines are built when it is one of them, so ``read`` does not import the inventory
    and live-capture modules just to describe their options."""
    parser = argparse.ArgumentParser(
        prog="purge-sensor",
        description="Passive sensor that finds internal hosts still running Kaspersky products "
                    "(BOD 17-01) from DNS, TLS SNI, HTTP Host and QUIC SNI.")
    parser.add_argument("--version", action="version", version=f"purge-sensor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("read", help="read pcap/pcapng files, alert and update the inventory",
                       description="Read pcap/pcapng captures ('-' for stdin), write one ECS JSON "
                                   "alert per detection and update the host inventory. A summary "
                                   "goes to stderr.")
    _add_sensor_options(p)
    p.add_argument("--linger", action="store_true", help="keep serving --metrics after the read")
    p.add_argument("--bpf-prefilter", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the live capture filter in libpcap first, so packets that cannot carry "
                        "evidence never reach Python: same detections, several times faster (default: on; "
                        "--no-bpf-prefilter decodes every packet)")
    p.add_argument("--bpf", metavar="FILTER",
                   help="only packets matching this filter (tcpdump syntax), ANDed with the prefilter")
    p.add_argument("--split", action=argparse.BooleanOptionalAction, default=True,
                   help="detect, track and write alerts in a second process while this one decodes "
                        "(default: on where two CPUs are free to run on; never with --metrics)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress or summary on stderr")
    p.add_argument("captures", nargs="+", metavar="CAPTURE")
    p.set_defaults(func=cmd_read)

    p = sub.add_parser("names", help="print every DNS name, SNI and HTTP Host decoded (TSV)",
                       description="Print ts, src, dst, kind, name for every DNS question, TLS/QUIC "
                                   "SNI and HTTP Host the decoders extract, matched or not; names "
                                   "are escaped (\\DDD). Useful to compare with tshark -T fields.")
    p.add_argument("--ja3", action="store_true", help="also print JA3 strings, JA3 hashes and JA4")
    p.add_argument("--dedup-window", type=float, default=0.05, metavar="SECONDS")
    p.add_argument("--quiet", "-q", action="store_true")
    p.add_argument("captures", nargs="+", metavar="CAPTURE")
    p.set_defaults(func=cmd_names)

    p = sub.add_parser("signatures", help="signature set tools",
                       description="Signature set tools.")
    ssub = p.add_subparsers(dest="sigcommand", metavar="SUBCOMMAND")
    ssub.required = True
    c = ssub.add_parser("check", help="validate signature files",
                        description="Validate signature files; print file:line: problem for "
                                    "every bad entry. Exit 0 when valid, 2 otherwise.")
    c.add_argument("paths", nargs="*", metavar="PATH")
    c.set_defaults(func=cmd_signatures_check)

    p = sub.add_parser("metrics-password", help="hash a password for metrics basic auth",
                       description="Read a password (prompt, or one line on stdin) and print the "
                                   "PBKDF2 hash to put in [metrics] basic_auth_hash.")
    p.set_defaults(func=cmd_metrics_password)

    if command in OWN_COMMANDS:
        return parser
    from .capture import live
    from .output import inventory

    inventory.register(sub)
    live.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

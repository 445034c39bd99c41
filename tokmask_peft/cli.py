"""``tokmask``: thin command line over train / sweep / report / predict / serve / merge / compare."""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from .storage import DirectoryInUse, atomic_write_text


def _load_recipe(args):
    from .config import Recipe

    overrides = list(args.overrides)
    if getattr(args, "rates", None) is not None:
        overrides.append(f"sweep.rates=[{args.rates}]")
    if getattr(args, "seeds", None) is not None:
        overrides.append(f"sweep.seeds=[{args.seeds}]")
    return Recipe.from_yaml(args.recipe, overrides)


def cmd_train(args) -> None:
    from .training import train

    metrics = train(_load_recipe(args))
    best = metrics["best"]
    print(json.dumps({"best": best, "trainable_params": metrics["trainable_params"],
                      "wall_time_s": round(metrics["wall_time_s"], 1)}))


def cmd_sweep(args) -> None:
    from .sweeps import sweep

    recipe = _load_recipe(args)
    options = {}
    if args.executor == "ray":
        options = {"cpus_per_run": args.cpus_per_run, "gpus_per_run": args.gpus_per_run,
                   "max_failures": args.max_failures, "address": args.address}
    sweep(recipe, args.output, executor=args.executor, **options)
    out = Path(args.output or recipe.train.output_dir)
    print((out / "results.md").read_text())
    print(f"table: {out / 'results.csv'}  plot: {out / 'results.png'}")


def cmd_report(args) -> None:
    from .reporting import COMPARISON_FILE, compare_sweeps, report, single_run_report, update_cards
    from .runs import METRICS_FILE, TOKMASK_CONFIG

    sweeps = []
    for out in args.output:
        if (Path(out) / METRICS_FILE).exists() or (Path(out) / TOKMASK_CONFIG).exists():
            print(single_run_report(out))  # a `tokmask train` output, not a sweep
            continue
        update_cards(Path(out), report(out, args.metric), args.metric)
        print((Path(out) / "results.md").read_text())
        sweeps.append(out)
    if len(sweeps) > 1:
        table = compare_sweeps(sweeps, args.metric)
        atomic_write_text(Path(sweeps[0]) / COMPARISON_FILE, table)
        print(table)
        print(f"comparison: {Path(sweeps[0]) / COMPARISON_FILE}")


def cmd_predict(args) -> None:
    from . import predict_files as files
    from .inference import Classifier
    from .runs import TOKMASK_CONFIG

    path = Path(args.path)
    if (path / TOKMASK_CONFIG).is_file():
        clf = Classifier.from_run(path, device=args.device)
        if args.rate is not None:
            clf.use(args.rate)
    else:
        clf = Classifier.from_sweep(path, seed=args.seed, device=args.device, rate=args.rate)
    if args.adapter:
        clf.use(args.adapter)
    fmt = files.input_format(args.input, args.format)
    name = "stdin" if args.input == "-" else args.input
    with (sys.stdin.buffer if args.input == "-" else open(args.input, "rb")) as stream:
        rows = files.read_rows(stream, name, fmt, args.text_column, clf.task, args.encoding_errors,
                               args.text_pair_column)
    results = files.predictions(clf, rows, args.batch_size, args.tta)
    records = files.output_rows(rows, results, clf.active, clf.task, "empty line" if fmt == "text" else "empty text")
    out = io.StringIO()
    if files.output_format(args.output, args.output_format) == "csv":
        files.write_csv(out, list(records), clf.labels)
    else:
        files.write_jsonl(out, records)
    if args.output == "-":
        sys.stdout.write(out.getvalue())
    else:
        atomic_write_text(args.output, out.getvalue())  # whole, or not at all
    truncated = sum(bool(r and r["truncated"]) for r in results)
    if truncated:
        print(f"tokmask predict: {truncated} of {sum(r is not None for r in results)} input(s) were longer than the "
              f"model's max_length ({clf.active_config['max_length']} tokens) and were cut short (\"truncated\": true)",
              file=sys.stderr)


def cmd_merge(args) -> None:
    from .inference import merge_run

    print(f"merged model written to {merge_run(args.run, args.output)}")


def cmd_export(args) -> None:
    from .onnx_export import export_run
    from .runs import TOKMASK_CONFIG

    path = Path(args.path)
    if not (path / TOKMASK_CONFIG).is_file():  # a sweep: the seed's run of the given rate, else the best one
        from .runs import adapter_name
        from .serving import runs_of

        runs, best = runs_of(path, args.seed)
        wanted = adapter_name(args.rate) if args.rate is not None else best
        if wanted not in runs:
            raise KeyError(f"no finished run {wanted}/seed_{args.seed} under {path}; runs: {sorted(runs)}")
        path = runs[wanted]
    measured = export_run(path, args.output, args.quantize)
    print(f"exported {path} to {args.output}; logits against PyTorch on {measured['checked_on']}: max |Δ| = "
          f"{measured['max_abs_diff']:.2e}")
    if "int8_max_abs_diff" in measured:
        change = (f"; dev {measured['metric']} {measured['fp32']:.4f} → {measured['int8']:.4f}"
                  if "metric" in measured else "")
        print(f"int8 ({args.output}/model.int8.onnx): max |Δ| against fp32 "
              f"{measured['int8_max_abs_diff']:.2e}{change}")


def cmd_serve(args) -> None:
    import ipaddress
    import os
    import socket

    try:
        import uvicorn

        from .server import check_api_key, create_app, header_deadline_protocol
    except ImportError as e:
        raise SystemExit(f"tokmask serve needs {e.name}, which is not installed: pip install 'tokmask-peft[serve]'")
    from .serving import API_KEY_ENV, AdapterPool

    api_key = check_api_key(args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV))
    pool = AdapterPool(args.paths, seed=args.seed, device=args.device, backend=args.backend)
    app = create_app(pool, args.max_batch, args.max_wait_ms, args.max_inputs, args.max_body_bytes, api_key,
                     args.read_timeout, args.max_batch_tokens, args.max_concurrent_requests)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and without it every
    # response waits ~40 ms for a delayed ACK (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))  # bound here, so --port 0 can say which port it got
    host = sock.getsockname()[0]
    if not api_key and not ipaddress.ip_address(host).is_loopback:
        print(f"tokmask serve: warning: {host} is reachable from other machines and no --api-key (or "
              f"{API_KEY_ENV}) is set: anyone who can reach it can use it", file=sys.stderr)
    print(f"tokmask serve: {len(pool.served)} adapter(s) on {len(pool.classifiers)} base(s) ({pool.backend}: "
          f"{pool.backend_reason}), default {pool.default}; listening on http://{args.host}:{sock.getsockname()[1]}",
          flush=True)
    config = uvicorn.Config(app, http=header_deadline_protocol(args.read_timeout), log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def cmd_compare(args) -> None:
    from .comparison import compare, compare_table

    overrides: dict[str, list[str]] = {}
    for item in args.set:
        method, sep, assignment = item.partition(":")
        if not sep:
            raise SystemExit(f"--set {item!r} must look like METHOD:section.key=value, e.g. full:train.lr=2e-5")
        overrides.setdefault(method, []).append(assignment)
    rows = compare(_load_recipe(args), args.output, args.methods.split(","), overrides)
    print(compare_table(rows))


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def _count(least: int):
    """An argparse type: a whole number >= ``least``, refused with argparse's own message."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value
    return parse


def add_predict(sub) -> None:
    from .predict_files import INPUT_FORMATS, OUTPUT_FORMATS

    p = sub("predict", help="predict labels for texts (JSON lines out)")
    p.add_argument("path", help="a run directory, or a sweep directory (all rates of one seed)")
    p.add_argument("--input", default="-", help="CSV, TSV, JSONL or text file (one input per line), or - for stdin")
    p.add_argument("--format", choices=INPUT_FORMATS,
                   help="input format (default: from the suffix; stdin and other suffixes: text)")
    p.add_argument("--text-column", default="text", help="the column (CSV/TSV) or field (JSONL) holding the text; "
                   "token tasks take a list of words there, or a string split on whitespace")
    p.add_argument("--text-pair-column", help="the column (CSV/TSV) or field (JSONL) holding the second text of "
                   "a sentence pair, for adapters trained on pairs")
    p.add_argument("--output", default="-", help="where results go (default: stdout); written whole or not at all")
    p.add_argument("--encoding-errors", choices=("strict", "replace"), default="strict",
                   help="bytes that are not UTF-8: an error naming the line (strict), or replaced and counted")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, help="default: csv for a .csv --output, else jsonl")
    p.add_argument("--rate", type=float, help="use the adapter of this masking rate (default for a sweep: the "
                   "rate best on dev by the sweep's selection metric)")
    p.add_argument("--adapter", help="use the adapter of this name, e.g. mask_0.10")
    p.add_argument("--seed", type=int, default=0, help="which seed's adapters to load from a sweep")
    p.add_argument("--tta", type=_count(0), default=0, help="average over K masked copies (test-time masking)")
    p.add_argument("--batch-size", type=_count(1), default=32)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_predict)


def add_export(sub) -> None:
    p = sub("export", help="export a run (or a sweep's best run) to ONNX, merged, checked against PyTorch")
    p.add_argument("path", help="a run directory, or a sweep directory (its best rate, or --rate)")
    p.add_argument("--output", required=True, help="the export's directory (outside the run)")
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("--quantize", choices=("int8",), help="also write dynamic int8 weights, with their dev change")
    p.add_argument("--rate", type=float, help="a sweep's run of this masking rate (default: the best on dev)")
    p.add_argument("--seed", type=int, default=0, help="which seed's run of a sweep")
    p.set_defaults(func=cmd_export)


def add_serve(sub) -> None:
    p = sub("serve", help="serve runs and sweeps over HTTP (text-embeddings-inference's /predict)")
    p.add_argument("paths", nargs="+", metavar="[NAME=]PATH",
                   help="a run, a sweep (each rate's adapter; the best on dev is the default), or several")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=_count(0), default=8080, help="0 picks a free port (printed)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health "
                   "(default: $TOKMASK_API_KEY)")
    p.add_argument("--max-batch", type=_count(1), default=32, help="texts per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=0.0, help="how long the oldest request may wait for "
                   "others; 0 batches what queued while the previous batch ran (measured best on CPU)")
    p.add_argument("--max-batch-tokens", type=_count(1), help="padded tokens per forward pass (inputs × the "
                   "longest; a batch's inputs are sorted by length first); default: no cap")
    p.add_argument("--max-concurrent-requests", type=_count(1), help="requests in flight before /predict answers "
                   "429 (text-embeddings-inference's behaviour); default: no cap")
    p.add_argument("--max-inputs", type=_count(1), default=64, help="inputs per request")
    p.add_argument("--max-body-bytes", type=_count(1), default=1 << 20)
    p.add_argument("--read-timeout", type=_seconds, default=10.0, help="seconds a client has to send a "
                   "request's headers, and again its body (default 10); slower connections are closed / 408")
    p.add_argument("--seed", type=int, default=0, help="which seed's adapters to load from a sweep")
    p.add_argument("--device", default=None)
    p.add_argument("--backend", choices=("torch", "onnx", "onnx-int8", "auto"), default="torch", help="onnx: ONNX "
                   "Runtime sessions, one per adapter (runs are exported into ~/.cache/tokmask_peft on first use; see "
                   "tokmask export); onnx-int8: with dynamic int8 weights; auto: onnx on CPU unless several adapters "
                   "would share a base (the choice and why are printed)")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    from .metrics import PREDICTION_METRICS

    parser = argparse.ArgumentParser(prog="tokmask", description="Token masking for LoRA/QLoRA text classifiers.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="also show third-party notices (load reports, "
                        "progress bars, library warnings); otherwise they go to each run's third_party.log")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **options) -> argparse.ArgumentParser:  # every command takes --verbose
        return sub.add_parser(name, parents=[common], **options)

    def with_recipe(p):
        p.add_argument("recipe", help="YAML recipe")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-4")
        return p

    p = with_recipe(command("train", help="train one run"))
    p.set_defaults(func=cmd_train)

    p = with_recipe(command("sweep", help="train one adapter per (masking rate, seed) and report"))
    p.add_argument("--rates", help="comma-separated rates, e.g. 0,0.1,0.3 (default: the recipe's)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the recipe's)")
    p.add_argument("--output", help="sweep directory (default: train.output_dir)")
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--cpus-per-run", type=float, default=1.0)
    p.add_argument("--gpus-per-run", type=float, default=0.0)
    p.add_argument("--max-failures", type=int, default=2, help="Ray retries per failed run")
    p.set_defaults(func=cmd_sweep)

    p = command("report", help="rebuild results.csv/.md/.png from a sweep's run directories; with several "
                       "sweeps, also one table judging each against the first sweep's p = 0")
    p.add_argument("output", nargs="+")
    p.add_argument("--metric", default=None, choices=PREDICTION_METRICS,
                   help="what marks the best rate and what the verdicts judge (default: the sweep's train.metric)")
    p.set_defaults(func=cmd_report)

    add_predict(command)

    p = command("merge", help="export an adapter merged into its base as a standalone model")
    p.add_argument("run")
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_merge)

    add_serve(command)
    add_export(command)

    p = with_recipe(command("compare", help="full vs LoRA vs QLoRA on the same recipe"))
    p.add_argument("--methods", default="full,lora,qlora")
    p.add_argument("--output", required=True)
    p.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="per-method override, e.g. full:train.lr=2e-5 (repeatable)")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from .console import quiet

    quiet(args.verbose)  # before anything imports peft (which imports bitsandbytes, which warns)
    try:
        args.func(args)
    except (ValueError, OSError, KeyError, DirectoryInUse) as e:  # OSError: files, transformers' "cannot load"
        raise SystemExit(f"tokmask {args.command}: error: {e}") from None


if __name__ == "__main__":
    main()

"""The ``fxcompress compile`` and ``fxcompress generate`` commands (parsers and handlers).

compile takes the models and data users have (``hf:``, ``timm:``, ``torchvision:`` specs with
weights; image folders, text files, datasets folders for ``--calibration`` and ``--eval``) and
writes an ONNX file, or with ``--out DIR/`` a deployable folder (fxcompress.output_folder). A
causal LM goes through compile_decoder; ``generate DIR`` runs such a folder.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from fxcompress.errors import InputError


class _RunsOption(argparse.Action):
    """``--runs N``; the old spelling ``--iters N`` still works and says it is deprecated."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if option_string == "--iters":
            print("fxcompress: --iters is deprecated; use --runs (the same count, as Python's runs=).", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_runs_option(parser: argparse.ArgumentParser, default: int, what: str) -> None:
    """The count of timed runs, ``--runs`` (``--iters``: the deprecated spelling, kept for scripts)."""
    parser.add_argument("--runs", "--iters", dest="runs", type=int, default=default, action=_RunsOption,
                        help=f"{what} (default {default}; --iters is a deprecated spelling)")


def add_compile_parser(sub: Any) -> None:
    p = sub.add_parser("compile", help="compile a model with a recipe and export ONNX (a file, or a deployable folder)")
    p.add_argument("spec", help="hf:ID_OR_FOLDER, timm:NAME, torchvision:NAME, package.module:function, file.pt2, "
                                "or file.pt (with --trust-pickle)")
    p.add_argument("--recipe", default="default", help="preset name or path to a TOML recipe (default: default)")
    p.add_argument("--out", required=True, help="an .onnx file, or a folder (DIR/) for the file(s), tokenizer or "
                                                "preprocessor, config and manifest.json")
    p.add_argument("--weights", default=None, help="for hf:/timm:/torchvision:: 'pretrained' (from the local cache) or a "
                                                   ".safetensors / state-dict file (loaded with weights_only)")
    p.add_argument("--num-classes", type=int, default=None, help="replace the classifier head with one of N classes")
    p.add_argument("--task", default=None, help="for hf:: text-classification, image-classification, causal-lm or "
                                                "feature-extraction (default: from the config's architectures)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text example (padded; default 128 or the "
                                                                "tokenizer's limit)")
    p.add_argument("--input-shape", action="append", default=None, help="input shape like 1,3,224,224 (repeat per input)")
    p.add_argument("--calibration", default=None, help="an image folder, a .txt/.jsonl file, a datasets save_to_disk "
                                                       "folder, .pt/.npz tensors, random:N, or package.module:function")
    p.add_argument("--calibration-size", type=int, default=None, help="use at most N calibration examples")
    p.add_argument("--eval", default=None, help="labelled data (as --calibration) to measure the task metric on: "
                                                 "top-1, perplexity or embedding cosine")
    p.add_argument("--eval-size", type=int, default=None, help="use at most N evaluation examples")
    p.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="with --eval: keep the most sensitive layers in float until the metric drops at most this much "
                        "(e.g. 0.01 for one point of top-1; for a causal LM, the relative rise of the perplexity: 0.02 "
                        "for 2%%)")
    p.add_argument("--tolerance", type=float, default=None, help="largest accepted drift vs the original (default: recipe's)")
    p.add_argument("--simplify", action="store_true", help="run onnxsim on the exported model (kept only if it checks)")
    p.add_argument("--dynamic-batch", action="store_true", help="export with a dynamic batch axis")
    p.add_argument("--dynamic-axes", action="append", default=None, metavar="INPUT:AXIS[=NAME],...",
                   help="make any input axes dynamic, e.g. pixel_values:2=height,3=width (repeat per input)")
    p.add_argument("--keep-unused-inputs", action="store_true",
                   help="keep inputs forward() never reads as (required) ONNX inputs; by default they are dropped")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="ORT provider for the latency table")
    p.add_argument("--no-baseline", action="store_true", help="skip timing a plain torch.onnx.export beside the result")
    add_runs_option(p, 50, "timed runs per variant")
    p.add_argument("--dump-dir", default=None, help="write the graph after every changed pass into this folder")
    p.add_argument("--report", default=None, help="write a self-contained HTML report (passes, diffs, figures) here")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled module (runs code from the file)")
    p.add_argument("--import", dest="imports", action="append", default=None, metavar="MODULE",
                   help="import this module first (it registers your own passes); repeat for several")
    p.add_argument("--why-not", action="store_true", help="also print where rules matched but declined to rewrite, and why")


def add_generate_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate text in ONNX Runtime from a decoder folder (compile hf:LM --out DIR/)")
    p.add_argument("folder", help="the folder fxcompress compile wrote for a causal LM")
    p.add_argument("--prompt", action="append", required=True, help="the prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")


def _progress() -> bool:
    """Progress bars on long steps (preprocessing, passes, calibration, export and parity, timing,
    evaluation) when a person watches stderr."""
    return sys.stderr.isatty()


def _pass_progress() -> list[Any]:
    """compile's instruments: a bar over the passes when progress is shown."""
    from fxcompress.infra.instruments import PassProgress

    return [PassProgress("compiling")] if _progress() else []


@contextlib.contextmanager
def _stage(description: str) -> Iterator[None]:
    """A running clock on stderr for a step that cannot be counted in parts (ONNX export and
    parity, timing): a person sees it is working and for how long; nothing when not shown."""
    if not _progress():
        yield
        return
    from tqdm.auto import tqdm

    bar = tqdm(desc=description, bar_format="{desc}: {elapsed}", leave=False)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            bar.refresh()

    clock = threading.Thread(target=tick, daemon=True)
    clock.start()
    try:
        yield
    finally:
        stop.set()
        clock.join()
        bar.close()


def _shapes(values: Sequence[str] | None):
    from fxcompress.loading import parse_shape

    return [parse_shape(v) for v in values] if values else None


def parse_dynamic_axes(values: Sequence[str] | None) -> dict[str, dict[int, str]] | None:
    """``["pixel_values:2=height,3=width", "x:0"]`` -> ``{"pixel_values": {2: "height", 3: "width"}, "x": {0: "x_dim0"}}``."""
    if not values:
        return None
    axes: dict[str, dict[int, str]] = {}
    for value in values:
        name, _, spec = value.partition(":")
        try:
            for part in spec.split(","):
                axis, _, dim = part.partition("=")
                axes.setdefault(name.strip(), {})[int(axis)] = dim.strip() or f"{name.strip()}_dim{int(axis)}"
        except ValueError:
            raise InputError(f"--dynamic-axes {value!r} is not INPUT:AXIS[=NAME],...", "write it like pixel_values:2=height,3=width.") from None
        if not name.strip():
            raise InputError(f"--dynamic-axes {value!r} names no input.", "write it like pixel_values:2=height,3=width.")
    return axes


def _check_counts(args: argparse.Namespace) -> None:
    for flag, value in (("--calibration-size", args.calibration_size), ("--eval-size", args.eval_size),
                        ("--max-length", args.max_length)):
        if value is not None and value <= 0:
            raise InputError(f"{flag} {value} is not positive.", f"give {flag} of at least 1.")
    if args.max_accuracy_drop is not None and args.eval is None:
        raise InputError("--max-accuracy-drop was given without --eval, so there is no metric to keep within it.",
                         "add --eval DATA (a labelled image folder, JSON-lines file or datasets folder).")


def _metric_table(metric_name: str, data: Any, rows: list[tuple[str, Any, Any]]) -> str:
    """Rows (label, TaskMetric, VariantFigures or None) as aligned text."""
    from fxcompress.task_metrics import NAMES

    lines = [f"Task metric on {data.source} ({len(data)} batch(es)): {NAMES[metric_name]}",
             f"{'model':<40} {metric_name:>11} {'p50 ms':>9} {'size MB':>9}"]
    for label, metric, figures in rows:
        timing = f"{figures.p50_ms:>9.3f} {figures.size_bytes / 1e6:>9.2f}" if figures is not None else f"{'':>9} {'':>9}"
        lines.append(f"{label:<40} {metric.to_text():>11} {timing}")
    return "\n".join(lines)


def cmd_compile(args: argparse.Namespace) -> int:
    from fxcompress.export.atomic import check_output_path
    from fxcompress.loading import load_calibration, load_model
    from fxcompress.output_folder import check_output_folder, is_folder_target

    folder_out = is_folder_target(args.out)
    if folder_out:
        check_output_folder(args.out)
    else:
        check_output_path(args.out)
    if args.report:
        check_output_path(args.report)
    _check_counts(args)
    if args.imports:
        from fxcompress.infra.recipe import import_modules

        import_modules(args.imports, "--import")
    loaded = load_model(args.spec, _shapes(args.input_shape), trust_pickle=args.trust_pickle, weights=args.weights,
                        num_classes=args.num_classes, task=args.task, max_length=args.max_length)
    if loaded.task == "causal-lm":
        return _compile_decoder(args, loaded, folder_out)
    calibration = load_calibration(args.calibration, loaded, size=args.calibration_size)
    evaluation = original_metric = reference = evaluate = None
    if args.eval:
        from fxcompress import data
        from fxcompress.task_metrics import evaluate_original, metric_kind, module_metric

        metric_kind(loaded.task)
        evaluation = data.load(args.eval, loaded, limit=args.eval_size, progress=_progress())
        if metric_kind(loaded.task) == "top1":
            evaluation.require_labels()
        original_metric, reference = evaluate_original(loaded.model, loaded.task, evaluation, progress=_progress())
        if args.max_accuracy_drop is not None:
            evaluate = module_metric(loaded.task, evaluation, reference)
    return _compile_and_write(args, loaded, calibration, evaluation, original_metric, reference, evaluate, folder_out)


def _compile_and_write(args, loaded, calibration, evaluation, original_metric, reference, evaluate, folder_out) -> int:
    from fxcompress.api import CompileOptions, compile as compile_model
    from fxcompress.inputs import describe_inputs, model_call
    from fxcompress.comparison import compare

    print(f"Compiling {loaded.description} with recipe '{args.recipe}' "
          f"on inputs {describe_inputs(model_call(None, loaded.example_inputs).flat)}")
    result = compile_model(loaded.model, loaded.example_inputs, args.recipe, calibration,
                           tolerance=args.tolerance, evaluate=evaluate, max_metric_drop=args.max_accuracy_drop,
                           progress=_progress(),
                           options=CompileOptions(dynamic_batch=args.dynamic_batch, dump_dir=args.dump_dir,
                                                  dynamic_axes=parse_dynamic_axes(args.dynamic_axes),
                                                  instruments=_pass_progress()))
    result.report.print_table()
    print(result.report.fidelity_text())
    note = getattr(result.report, "note", None)
    if note:
        print(f"\nNote: {note}")
    if args.why_not:
        from fxcompress.inspect.render_text import render_near_misses
        from fxcompress.inspect.why_not import why_not

        print("\nWhy not (rules that matched but declined):\n" + render_near_misses(why_not(result)))

    def export_and_measure(path: Path) -> tuple[Any, Any]:
        with _stage("exporting ONNX and checking parity"):
            written = result.export_onnx(path, simplify=args.simplify, keep_unused_inputs=args.keep_unused_inputs)
        dropped = result.report.extra.get("dropped_inputs")
        if dropped:
            print(f"Dropped the unused input(s) {', '.join(dropped)} (never read by the graph; --keep-unused-inputs keeps them).")
        print(f"\nParity (ONNX in ORT vs compiled module): {result.report.parity.to_text()}")
        with _stage("timing and checking the file against the original in ONNX Runtime"):
            comparison = compare(result, loaded.model, written, provider=args.provider, baseline=not args.no_baseline,
                                 runs=args.runs)
        print(f"Parity (ONNX in ORT vs original model):  {comparison.compiled.parity.to_text()}")
        print(f"\n{comparison.to_text()}")
        compiled_metric = None
        if evaluation is not None:
            from fxcompress.task_metrics import evaluate_onnx

            compiled_metric = evaluate_onnx(written, loaded.task, evaluation, reference, provider=args.provider, progress=_progress())
            baseline = comparison.variants[0] if len(comparison.variants) > 1 else None  # the plain export's timing
            print("\n" + _metric_table(original_metric.name, evaluation, [
                ("original (PyTorch; time: plain export)" if baseline else "original (PyTorch)", original_metric, baseline),
                (f"fxcompress {result.recipe.name} (ONNX Runtime)", compiled_metric, comparison.compiled)]))
        return written, (comparison, compiled_metric)

    if not folder_out:
        path, (comparison, _) = export_and_measure(Path(args.out))
        print(f"\nWrote {path}")
    else:
        from fxcompress.output_folder import OutputFolder

        with OutputFolder(args.out) as folder:
            path, (comparison, compiled_metric) = export_and_measure(folder.path("model.onnx"))
            folder.add_external_data()
            if loaded.preprocess is not None and loaded.preprocess.save is not None:
                folder.add(loaded.preprocess.save(folder.staging))
            folder.write_json("manifest.json", _manifest(args, loaded, result, comparison, folder, evaluation,
                                                         original_metric, compiled_metric, note))
        print(f"\nWrote {folder.target}/ ({', '.join(folder.files)})")
    if args.report:
        from fxcompress.inspect.render_html import write_report

        print(f"Wrote {write_report(args.report, result, variants=comparison.report_variants())}")
    return 0


def _graph_info(path: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {"file": path.name, "bytes": path.stat().st_size, "inputs": [i.name for i in model.graph.input],
            "outputs": [o.name for o in model.graph.output], "opset": max((o.version for o in model.opset_import), default=None)}


def _manifest(args, loaded, result, comparison, folder, evaluation, original_metric, compiled_metric, note,
              graphs: dict[str, Path] | None = None) -> dict[str, Any]:
    from fxcompress.output_folder import MANIFEST_FORMAT, versions

    graphs = graphs or {"model": folder.staging / "model.onnx"}
    folder.path("manifest.json")  # listed among the files it lists
    data: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "source": args.spec, "description": loaded.description, "task": loaded.task,
        "recipe": result.recipe.name, "passes": [r.name for r in result.report.records if r.modified],
        "note": note,
        "graphs": {name: _graph_info(path) for name, path in graphs.items()},
        "preprocessing": loaded.preprocess.summary if loaded.preprocess is not None else None,
        "labels": loaded.preprocess.labels if loaded.preprocess is not None else None,
        "compile": result.report.to_dict(),
        "provider": comparison.provider if comparison is not None else args.provider,
        "files": sorted(folder.files),
        "versions": versions(),
    }
    if comparison is not None:
        data["parity"] = {"summary": comparison.compiled.parity.to_text(), "passed": comparison.compiled.parity.passed,
                          "drift": comparison.compiled.parity.drift, "cosine": comparison.compiled.parity.cosine}
        data["latency"] = comparison.to_dict()
    if compiled_metric is not None:
        data["metric"] = {"name": original_metric.name, "data": evaluation.source, "examples": compiled_metric.count,
                          "values": {"original": original_metric.to_dict(), "compiled": compiled_metric.to_dict()}}
    return data


def _compile_decoder(args: argparse.Namespace, loaded: Any, folder_out: bool) -> int:
    from fxcompress import data
    from fxcompress.api import CompileOptions
    from fxcompress.decoder import compile_decoder
    from fxcompress.output_folder import GENAI_CONFIG, OutputFolder, genai_config

    if not folder_out:
        raise InputError(f"{args.spec} is a causal LM: its export is several files (decoder, prefill graph, tokenizer).",
                         "give a folder: --out DIR/ (then run fxcompress generate DIR --prompt ...).")
    for flag, value in (("--dynamic-batch", args.dynamic_batch or None),
                        ("--input-shape", args.input_shape), ("--dynamic-axes", args.dynamic_axes)):
        if value is not None:
            raise InputError(f"{flag} does not apply to a causal LM from the command line.", "drop it.")
    calibration = None
    if args.calibration:
        batches = data.load(args.calibration, loaded, limit=args.calibration_size, progress=_progress())
        calibration = [b["input_ids"] if isinstance(b, dict) else b[0] for b in batches]
    evaluation = data.load(args.eval, loaded, limit=args.eval_size, progress=_progress()) if args.eval else None
    original_metric = evaluate = None
    if evaluation is not None:
        from fxcompress.task_metrics import decoder_metric, evaluate_original

        original_metric, _ = evaluate_original(loaded.model, loaded.task, evaluation, progress=_progress())
        if args.max_accuracy_drop is not None:  # the budget is the relative rise of the perplexity
            evaluate = decoder_metric(loaded.model, evaluation, original_metric)
    print(f"Compiling {loaded.description} as a decoder (KV cache) with recipe '{args.recipe}'")
    result = compile_decoder(loaded.model, args.recipe, calibration, tolerance=args.tolerance, progress=_progress(),
                             evaluate=evaluate, max_metric_drop=args.max_accuracy_drop,
                             options=CompileOptions(dump_dir=args.dump_dir, instruments=_pass_progress()))
    result.report.print_table()
    print(result.report.fidelity_text())
    print(f"Graphs: {result.graphs}")
    with OutputFolder(args.out) as folder:
        with _stage("exporting ONNX and checking parity"):
            path = result.export_onnx(folder.path("model.onnx"), simplify=args.simplify)
        graphs = {"decode": path}
        if result.prefill is not None:
            graphs["prefill"] = folder.path("model.prefill.onnx")
        print(f"\nParity (ONNX in ORT vs compiled module): {result.report.parity.to_text()}")
        compiled_metric = None
        if evaluation is not None:
            from fxcompress.task_metrics import evaluate_onnx

            compiled_metric = evaluate_onnx(path, loaded.task, evaluation, provider=args.provider, progress=_progress())
            print("\n" + _metric_table("perplexity", evaluation, [("original (PyTorch)", original_metric, None),
                                                                  (f"fxcompress {result.recipe.name} (ONNX Runtime)",
                                                                   compiled_metric, None)]))
        folder.add_external_data()
        folder.add(loaded.preprocess.save(folder.staging))
        manifest = _manifest(args, loaded, result, None, folder, evaluation, original_metric, compiled_metric, None, graphs)
        manifest["parity"] = {"summary": result.report.parity.to_text(), "passed": result.report.parity.passed,
                              "drift": result.report.parity.drift, "against": "the compiled module"}
        manifest["decoder"] = result.graphs
        folder.write_json(GENAI_CONFIG, genai_config(loaded.model, result.spec, path.name))
        manifest["files"] = sorted(folder.files)
        folder.write_json("manifest.json", manifest)
    print(f"\nWrote {folder.target}/ ({', '.join(folder.files)})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fxcompress.model_specs import require
    from fxcompress.output_folder import read_manifest
    from fxcompress.runtime.generate import decoder_session, generate

    folder = Path(args.folder)
    manifest = read_manifest(folder)
    if manifest.get("task") != "causal-lm":
        raise InputError(f"{folder} holds a {manifest.get('task') or 'non-decoder'} model, not a causal LM.",
                         "compile a causal LM (hf:FOLDER of a ...ForCausalLM) with --out DIR/ first.")
    transformers = require("transformers", "fxcompress generate")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder} has no readable tokenizer ({str(exc)[:120]}).", "compile the model again into the folder.") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"
    encoded = tokenizer(list(args.prompt), return_tensors="pt", padding=True)
    session = decoder_session(folder / manifest["graphs"]["decode"]["file"], args.provider)
    tokens = generate(session, encoded["input_ids"], attention_mask=encoded["attention_mask"],
                      max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      eos_token_id=tokenizer.eos_token_id)
    for row in tokens:  # the prompt and its continuation
        print(tokenizer.decode(row, skip_special_tokens=True))
    return 0

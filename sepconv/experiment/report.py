"""The comparison's report: ``metrics.json`` (every figure), ``report.md`` and a self-contained ``report.html``.

Both documents are rendered from one list of blocks (headings, paragraphs, tables, lists, images), so they
always say the same thing; the HTML embeds the PNG plots as base64. A figure that was not measured (times of
an interrupted run, accuracy of a model with no completed epoch) is ``null`` in the JSON and "not measured"
in the documents, never a placeholder number. A non-finite figure (a diverged training) is the string ``"nan"``,
``"inf"`` or ``"-inf"`` in the JSON (which has no such numbers) and ``nan``/``inf`` in the documents.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from torch import nn

from .._io import atomic_write_text
from ..profiling.timing import median_and_iqr
from .plots import plot_layer_costs, plot_layer_times, plot_learned_filters, plot_training_curves
from .train import evaluation_batch_size

__all__ = ["METRICS_FORMAT", "UNITS", "TWINS", "summarize_history", "build_metrics", "write_report", "summary_table",
           "precision_table", "bf16_lines"]

METRICS_FORMAT = "sepconv.compare/1"
TWINS = ("standard", "separable")
NOT_MEASURED = "not measured"
TOP_LAYERS = 8  # rows of a twin's per-layer time table before the rest is summed into one
UNITS = {
    "params": "parameter elements (nn.Parameters, batch-norm scales and shifts included; running statistics not)",
    "macs": "forward multiply-adds (MACs) for one input, counted by sepconv.profile (bias adds, norms, activations "
            "and pooling not counted)",
    "flops": "2 x MACs",
    "*_ms": "milliseconds for one batch of the timing's batch_size inputs (inference: the run's validation batch, "
            "the training batch but at least 256; training step: the training batch); median and interquartile "
            "range (iqr)",
    "inference_ms": "the model as trained, in eval mode without gradients (eager PyTorch, sepconv's default kernels)",
    "optimized_inference_ms": "its copy from sepconv.optimize_for_inference (batch norm folded, activations fused, "
                              "layout chosen once), in the same conditions",
    "bf16_inference_ms": "its bf16 copy from sepconv.optimize_for_inference(dtype=torch.bfloat16) (weights in bf16, "
                         "float32 input and output), in the same conditions; null where not measured (a CPU without "
                         "native bf16: AVX512-BF16 or AMX)",
    "bf16_inference": "how the bf16 copy was made (precision, method; or reason) and, on the whole validation set, "
                      "the top-1 accuracy of the fp32 model (fp32_validation_accuracy) and of its bf16 copy "
                      "(validation_accuracy), their top-1 agreement (fraction of inputs with the same top class) and "
                      "the largest logit difference, absolute (max_abs_logit_error) and relative to the largest "
                      "fp32 logit magnitude (max_logit_error)",
    "bf16_vs_fp32_inference_speedup": "optimized_inference_ms (fp32) divided by bf16_inference_ms (above 1: bf16 is "
                                      "faster)",
    "roofline_ms": "max(bytes / memory bandwidth, FLOPs / peak FLOP/s) on the machine's measured roofs",
    "roofline_share": "roofline_ms / measured_ms: 1 means the op runs at the roof; small means overhead or a slow "
                      "kernel, not arithmetic or memory traffic, sets its time",
    "layer_times": "per counted op of the eval model (eager) on one batch, timed by sepconv.profile(measure=True)",
    "*_accuracy": "fraction of inputs classified correctly (0 to 1)",
    "*_loss": "cross-entropy, mean per input",
    "train_validation_gap": "final train accuracy minus final validation accuracy (fraction)",
    "seconds": "wall-clock seconds of one epoch (training and validation)",
    "*_speedup": "standard twin's cost or time divided by the separable twin's (above 1: the separable twin is "
                 "cheaper or faster)",
    "*_efficiency": "realised speed-up divided by the theoretical one (the MAC ratio, standard MACs / separable MACs): "
                    "1 means the separable twin is as much faster as it has fewer MACs",
}


def summarize_history(history: list[dict]) -> dict:
    """Final and best validation accuracy, the train-validation gap and epoch times of one training."""
    if not history:
        return {"epochs_completed": 0, "final_train_accuracy": None, "final_validation_accuracy": None,
                "best_validation_accuracy": None, "best_epoch": None, "train_validation_gap": None,
                "seconds_per_epoch": None, "training_seconds": 0.0}
    best = max(history, key=lambda record: record["validation_accuracy"])  # the first epoch reaching the best
    final = history[-1]
    median, spread = median_and_iqr([record["seconds"] for record in history])
    return {"epochs_completed": len(history), "final_train_accuracy": final["train_accuracy"],
            "final_validation_accuracy": final["validation_accuracy"],
            "best_validation_accuracy": best["validation_accuracy"], "best_epoch": best["epoch"],
            "train_validation_gap": final["train_accuracy"] - final["validation_accuracy"],
            "seconds_per_epoch": {"median": median, "iqr": spread},
            "training_seconds": sum(record["seconds"] for record in history)}


def _ratio(numerator, denominator):
    return None if numerator is None or denominator is None or not denominator else numerator / denominator


def build_metrics(*, status: str, settings: dict, dataset: dict, environment: dict, models: dict[str, dict],
                  timing_method: str | None, resume_command: str, machine: dict | None = None) -> dict:
    """``metrics.json``'s content. ``models[twin]`` holds ``name``, ``separable``, the costs of
    :func:`~sepconv.experiment.measure.count_costs`, the times of
    :func:`~sepconv.experiment.measure.measure_times` (``inference_ms``, ``optimized_inference_ms`` (fp32),
    ``bf16_inference_ms`` with ``bf16_inference``, ``train_step_ms``) and of :func:`~sepconv.experiment.measure.profile_layers` (``layer_times``), each ``None``
    when not measured, and ``epochs`` (the training history). ``machine``: the roofs the layers were set
    against (:func:`~sepconv.experiment.measure.machine_metrics`). Each model gains
    ``bf16_vs_fp32_inference_speedup`` (its optimised fp32 time over its bf16 time), the comparison
    ``bf16_inference_speedup`` and ``bf16_inference_efficiency``; each ``None`` where bf16 was not measured."""
    models = {twin: {**model, **summarize_history(model["epochs"])} for twin, model in models.items()}
    standard, separable = models["standard"], models["separable"]

    def median(model, key):
        return None if model.get(key) is None else model[key]["median"]

    for model in models.values():
        model["bf16_vs_fp32_inference_speedup"] = _ratio(median(model, "optimized_inference_ms"),
                                                         median(model, "bf16_inference_ms"))
    theoretical = standard["macs"] / separable["macs"]
    inference = _ratio(median(standard, "inference_ms"), median(separable, "inference_ms"))
    bf16 = _ratio(median(standard, "bf16_inference_ms"), median(separable, "bf16_inference_ms"))
    optimized = _ratio(median(standard, "optimized_inference_ms"), median(separable, "optimized_inference_ms"))
    return {
        "format": METRICS_FORMAT, "status": status, "resume_command": resume_command, "settings": settings,
        "dataset": dataset, "environment": environment, "units": UNITS, "timing_method": timing_method,
        "machine": machine, "models": models,
        "comparison": {
            "params_ratio": separable["params"] / standard["params"],
            "macs_ratio": separable["macs"] / standard["macs"],
            "theoretical_speedup": theoretical,
            "inference_speedup": inference,
            "inference_efficiency": _ratio(inference, theoretical),
            "optimized_inference_speedup": optimized,
            "optimized_inference_efficiency": _ratio(optimized, theoretical),
            "bf16_inference_speedup": bf16,
            "bf16_inference_efficiency": _ratio(bf16, theoretical),
            "train_step_speedup": _ratio(median(standard, "train_step_ms"), median(separable, "train_step_ms")),
            "epoch_time_speedup": _ratio(median(standard, "seconds_per_epoch"), median(separable, "seconds_per_epoch")),
            "final_validation_accuracy_difference": _difference(separable, standard, "final_validation_accuracy"),
        },
        "plots": [],
    }


def _difference(first: dict, second: dict, key: str):
    return None if first[key] is None or second[key] is None else first[key] - second[key]


# --- the side-by-side table ------------------------------------------------------------------------

def _count(value: int) -> str:
    return f"{value:,}"


def _time(timing: dict | None, digits: int = 3) -> str:
    return NOT_MEASURED if timing is None else f"{timing['median']:.{digits}f} ± {timing['iqr']:.{digits}f}"


def _percent(value: float | None) -> str:
    return NOT_MEASURED if value is None else f"{100 * value:.2f}"


def _fewer(ratio: float) -> str:
    return f"{ratio:.3f}x ({1 / ratio:.1f}x fewer)"


def _speedup(value: float | None) -> str:
    if value is None:
        return NOT_MEASURED
    return f"{value:.2f}x " + ("faster" if value >= 1 else "slower")


def _points(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.2f} points"


def summary_table(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side table: quantity, standard, separable, separable vs standard."""
    standard, separable = (metrics["models"][twin] for twin in TWINS)
    comparison = metrics["comparison"]
    batch = metrics["settings"]["batch_size"]
    inference_batch = evaluation_batch_size(batch)

    def row(label, render, key, versus):
        return [label, render(standard.get(key)), render(separable.get(key)), versus]

    def best(model):
        accuracy = model["best_validation_accuracy"]
        return NOT_MEASURED if accuracy is None else f"{100 * accuracy:.2f} (epoch {model['best_epoch']})"

    rows = [
        row("parameters", _count, "params", _fewer(comparison["params_ratio"])),
        row("forward MACs per input", _count, "macs", _fewer(comparison["macs_ratio"])),
        row(f"inference as trained (eager, eval), batch of {inference_batch} (ms, median ± IQR)", _time,
            "inference_ms", _speedup(comparison["inference_speedup"])),
        row(f"inference optimised, fp32 (optimize_for_inference), batch of {inference_batch} (ms, median ± IQR)",
            _time, "optimized_inference_ms", _speedup(comparison["optimized_inference_speedup"])),
        row(f"inference optimised, bf16 (optimize_for_inference, dtype=bfloat16), batch of {inference_batch} "
            "(ms, median ± IQR)", _time, "bf16_inference_ms", _speedup(comparison.get("bf16_inference_speedup"))),
        row(f"training step, batch of {batch} (ms, median ± IQR)", _time, "train_step_ms",
            _speedup(comparison["train_step_speedup"])),
        row("final validation accuracy (%)", _percent, "final_validation_accuracy",
            _points(comparison["final_validation_accuracy_difference"])),
        ["best validation accuracy (%)", best(standard), best(separable),
         _points(_difference(separable, standard, "best_validation_accuracy"))],
        row("final train accuracy (%)", _percent, "final_train_accuracy",
            _points(_difference(separable, standard, "final_train_accuracy"))),
        row("train - validation gap (points)", _percent, "train_validation_gap",
            _points(_difference(separable, standard, "train_validation_gap"))),
        row("wall time per epoch (s, median ± IQR)", lambda timing: _time(timing, 2), "seconds_per_epoch",
            _speedup(comparison["epoch_time_speedup"])),
        row("epochs completed", str, "epochs_completed", ""),
    ]
    return ["", "standard", "separable", "separable vs standard"], rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with padded columns, readable as plain text too (the first column left-aligned)."""
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def render(cells):
        return "| " + " | ".join(cells) + " |"

    def aligned(line):
        return render([cell.ljust(width) if i == 0 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(line, widths))])
    rule = render(["-" * width if i == 0 else "-" * (width - 1) + ":" for i, width in enumerate(widths)])
    return "\n".join([aligned(header), rule, *map(aligned, rows)])


def _efficiency(value: float | None) -> str:
    return "" if value is None else f" ({value:.2f} of the MAC ratio)"


def speedup_lines(metrics: dict) -> list[str]:
    comparison = metrics["comparison"]
    return [f"theoretical (standard MACs / separable MACs, the MAC ratio): {comparison['theoretical_speedup']:.2f}x",
            "realised, inference optimised for inference: " + _speedup(comparison["optimized_inference_speedup"])
            + _efficiency(comparison["optimized_inference_efficiency"]),
            "realised, inference optimised in bf16: " + _speedup(comparison.get("bf16_inference_speedup"))
            + _efficiency(comparison.get("bf16_inference_efficiency")),
            "realised, inference as trained (eager): " + _speedup(comparison["inference_speedup"])
            + _efficiency(comparison["inference_efficiency"]),
            f"realised, training step: {_speedup(comparison['train_step_speedup'])}",
            f"realised, wall time per epoch: {_speedup(comparison['epoch_time_speedup'])}"]


# --- fp32 against bf16 --------------------------------------------------------------------------------

def _bf16_note(model: dict) -> dict:
    note = model.get("bf16_inference")
    return note if note is not None else {"precision": "bf16", "method": None, "reason": f"bf16: {NOT_MEASURED}"}


def _fraction(model: dict, key: str) -> float | None:
    return _bf16_note(model).get(key)


def _relative(value: float | None) -> str:
    return NOT_MEASURED if value is None else f"{100 * value:.2f}%"


def precision_table(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per twin) of the optimised copies in fp32 and in bf16: inference time, validation
    accuracy, the bf16 copy's top-1 agreement with the fp32 model and its largest logit error."""
    inference_batch = evaluation_batch_size(metrics["settings"]["batch_size"])
    rows = []
    for twin in TWINS:
        model = metrics["models"][twin]
        note = _bf16_note(model)
        fp32_accuracy = note.get("fp32_validation_accuracy", model.get("final_validation_accuracy"))
        rows.append([twin, _time(model.get("optimized_inference_ms")), _time(model.get("bf16_inference_ms")),
                     _speedup(model.get("bf16_vs_fp32_inference_speedup")), _percent(fp32_accuracy),
                     _percent(note.get("validation_accuracy")), _percent(note.get("top1_agreement")),
                     _relative(note.get("max_logit_error"))])
    return ["twin", f"inference fp32, batch of {inference_batch} (ms)", f"inference bf16, batch of {inference_batch} "
            "(ms)", "bf16 vs fp32", "validation accuracy fp32 (%)", "validation accuracy bf16 (%)",
            "top-1 agreement bf16 with fp32 (%)", "max logit error bf16 vs fp32 (of the fp32 logits' scale)"], rows


def _bf16_reasons(metrics: dict) -> list[str]:
    """Why bf16 was not measured, per twin without a bf16 copy (one line when both share the reason)."""
    notes = {twin: _bf16_note(metrics["models"][twin]) for twin in TWINS}
    missing = {twin: note["reason"] for twin, note in notes.items() if not note.get("method")}
    if len(set(missing.values())) == 1 and len(missing) == len(TWINS):
        return [next(iter(missing.values()))]
    return [f"{twin} twin: {reason}" for twin, reason in missing.items()]


def bf16_lines(metrics: dict) -> list[str]:
    """One line per twin: its bf16 copy against fp32 (speed, accuracy, agreement, logit error), or why it was not
    measured."""
    lines = []
    for twin in TWINS:
        model = metrics["models"][twin]
        note = _bf16_note(model)
        if not note.get("method"):
            continue
        figures = [f"{twin} twin in bf16 vs fp32 (optimised): "
                   + _speedup(model.get("bf16_vs_fp32_inference_speedup"))]
        if note.get("validation_accuracy") is not None:
            figures += [f"validation accuracy {_percent(note['validation_accuracy'])}% (fp32 "
                        f"{_percent(note['fp32_validation_accuracy'])}%)",
                        f"top-1 agreement {_percent(note['top1_agreement'])}%",
                        f"max logit error {_relative(note['max_logit_error'])} of the fp32 logits' scale"]
        lines.append(", ".join(figures))
    return lines + _bf16_reasons(metrics)


def _precision_blocks(metrics: dict) -> list[tuple]:
    notes = [_bf16_note(metrics["models"][twin]) for twin in TWINS]
    if not any(note.get("method") for note in notes):
        return [("paragraph", " ".join(_bf16_reasons(metrics)) + ".")]
    blocks = [("paragraph", "Each twin's copy optimised for inference in fp32 (float32 weights) and in bf16 "
                            "(optimize_for_inference(model, batch, dtype=torch.bfloat16): weights stored in bf16, "
                            "computed in float32 inside the fused kernels and rounded once per output; float32 "
                            "input and output), timed in the same rounds. Accuracies, the top-1 agreement (inputs "
                            "whose top class is the fp32 model's) and the largest logit difference (relative to "
                            "the largest fp32 logit magnitude) are over the whole validation set."),
              ("table", *precision_table(metrics))]
    reasons = _bf16_reasons(metrics)
    return blocks + ([("list", reasons)] if reasons else [])


# --- time per layer against the roofline -------------------------------------------------------------

def _ms(value: float) -> str:
    return f"{value:.4f}"


def _share_text(value: float) -> str:
    return f"{100 * value:.1f}%" if math.isfinite(value) else str(value)


def layer_time_table(layer_times: dict, top: int = TOP_LAYERS) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one twin's per-layer times: the ``top`` slowest counted ops (in the model's order), the
    others summed in one row, the total of the counted ops and the whole model."""
    layers = layer_times["layers"]
    slowest = sorted(sorted(range(len(layers)), key=lambda i: -layers[i]["measured_ms"])[:top])
    rows = [[layer["name"], layer["kind"], layer["bound"], _count(layer["macs"]), _count(layer["bytes"]),
             f"{_ms(layer['measured_ms'])} ± {_ms(layer['measured_iqr_ms'])}", _ms(layer["roofline_ms"]),
             _share_text(layer["roofline_share"])] for layer in (layers[i] for i in slowest)]
    rest = [layer for i, layer in enumerate(layers) if i not in slowest]
    if rest:
        measured, roofline = (sum(layer[key] for layer in rest) for key in ("measured_ms", "roofline_ms"))
        rows.append([f"{len(rest)} other ops", "", "", _count(sum(layer["macs"] for layer in rest)),
                     _count(sum(layer["bytes"] for layer in rest)), _ms(measured), _ms(roofline),
                     _share_text(roofline / measured if measured > 0 else math.nan)])
    rows.append([f"counted ops, total ({len(layers)})", "", "", _count(sum(layer["macs"] for layer in layers)),
                 _count(sum(layer["bytes"] for layer in layers)), _ms(layer_times["measured_ms"]),
                 _ms(layer_times["roofline_ms"]), _share_text(layer_times["roofline_share"])])
    rows.append(["the rest: norms, activations, pooling, Python (whole model - counted ops)", "", "", "", "",
                 _ms(layer_times["uncounted_ms"]), "", ""])
    rows.append(["whole model", "", "", "", "", f"{_ms(layer_times['model_ms'])} ± {_ms(layer_times['model_iqr_ms'])}",
                 "", ""])
    return ["op", "kind", "bound", "MACs", "bytes", "measured (ms)", "roofline (ms)", "roofline / measured"], rows


def _machine_line(machine: dict) -> str:
    return (f"memory bandwidth {machine['memory_bandwidth_bytes_per_second'] / 1e9:.1f} GB/s, peak fp32 "
            f"{machine['peak_flops_per_second'] / 1e9:.1f} GFLOP/s (ridge {machine['ridge_flop_per_byte']:.1f} "
            f"FLOP/byte), {machine['threads']} threads; {machine['method']}")


def _layer_time_blocks(metrics: dict) -> list[tuple]:
    measured = {twin: metrics["models"][twin].get("layer_times") for twin in TWINS}
    if metrics.get("machine") is None or None in measured.values():
        return [("paragraph", f"Per-layer times: {NOT_MEASURED}.")]
    batch = measured["standard"]["batch_size"]
    blocks = [("paragraph", f"Each counted op (convolutions and matrix products) of each twin as trained (eval "
                            f"mode, eager, sepconv's default kernels) on a batch of {batch}, timed by "
                            f"sepconv.profile(measure=True) (median ± IQR over {measured['standard']['repeats']} "
                            "runs), against its roofline time max(bytes / bandwidth, FLOPs / peak) on this "
                            f"machine's roofs: {_machine_line(metrics['machine'])}. MACs and bytes are per batch; "
                            "bytes are the minimum traffic (each tensor read or written once); bound is the larger "
                            "roofline term. A small roofline / measured share means neither arithmetic nor memory "
                            "traffic sets the op's time, but per-call overhead or the kernel. The slowest "
                            f"{TOP_LAYERS} ops are listed in the model's order.")]
    for twin in TWINS:
        times = measured[twin]
        blocks += [("paragraph", f"{twin} twin: counted ops {times['measured_ms']:.3f} ms measured, "
                                 f"{times['roofline_ms']:.4f} ms at the roofline "
                                 f"({_share_text(times['roofline_share'])}); the whole model "
                                 f"{times['model_ms']:.3f} ms, of which {times['uncounted_ms']:.3f} ms outside the "
                                 "counted ops."),
                   ("table", *layer_time_table(times))]
    return blocks


def _optimized_line(metrics: dict) -> str:
    notes = [metrics["models"][twin].get("optimized_inference") for twin in TWINS]
    if any(note is None for note in notes):
        return f"optimised inference: {NOT_MEASURED}"
    if all(note["method"] for note in notes):
        return (f"optimised inference: {notes[0]['method']}; its outputs equal the eval model's (max |difference| "
                + ", ".join(f"{twin} {note['max_abs_difference']:.2g}" for twin, note in zip(TWINS, notes)) + ")")
    return "optimised inference not measured: " + "; ".join(
        f"{twin} twin: {note['reason']}" for twin, note in zip(TWINS, notes) if not note["method"])


def _bf16_method_line(metrics: dict) -> str:
    notes = [_bf16_note(metrics["models"][twin]) for twin in TWINS]
    measured = [note["method"] for note in notes if note.get("method")]
    if not measured:
        return " ".join(_bf16_reasons(metrics))
    return f"bf16 inference: {measured[0]}"


# --- the documents ---------------------------------------------------------------------------------

def _listed(value) -> str:
    if isinstance(value, (list, tuple)):
        return f"{len(value)} ({', '.join(map(str, value))})"
    return f"{value:g}" if isinstance(value, float) else str(value)


def data_lines(dataset: dict) -> list[str]:
    """What the report says about the data beyond its description: the details an EEG dataset records (source,
    subjects, sessions, channels, sampling rate, validation) and the inputs (EEG: trials) per class."""
    lines = [f"{key}: {_listed(value)}" for key, value in dataset.get("details", {}).items()]
    counts = dataset.get("per_class")
    if counts:
        noun = "trials" if dataset.get("layout") == "eeg" else "inputs"
        lines.append(f"{noun} per class, training / validation: " + ", ".join(
            f"{name} {counts['train'][name]} / {counts['validation'][name]}" for name in counts["train"]))
    return lines


def _blocks(metrics: dict) -> list[tuple]:
    settings, dataset, environment = metrics["settings"], metrics["dataset"], metrics["environment"]
    model = settings["model"]
    blocks = [("title", f"sepconv compare: {model}, standard vs separable, on {dataset['name']}")]
    for twin in TWINS:
        epoch = metrics["models"][twin].get("diverged_at_epoch")
        if epoch is not None:
            blocks.append(("paragraph", f"DIVERGED: the {twin} twin's loss was not finite (nan or inf) at epoch "
                                        f"{epoch}; its training stopped there, and its checkpoint holds the last "
                                        f"finite epoch ({epoch - 1 or 'none'}). Try a smaller learning rate."))
    if metrics["status"] != "complete":
        done = ", ".join(f"{twin} {metrics['models'][twin]['epochs_completed']}/{settings['epochs']}" for twin in TWINS)
        blocks.append(("paragraph", f"INTERRUPTED (epochs completed: {done}). The figures cover the completed "
                                    f"epochs; times were not measured. Continue with: {metrics['resume_command']}"))
    shape = "x".join(map(str, dataset["input_shape"]))
    blocks += [
        ("paragraph", f"Data: {dataset['description']}. {dataset['train_size']:,} training and "
                      f"{dataset['validation_size']:,} validation inputs of shape {shape}, {dataset['num_classes']} "
                      "classes."),
        ("list", data_lines(dataset)),
        ("paragraph", f"Training: both twins built from seed {settings['seed']} with the same initialisation scheme "
                      f"and trained the same way: {settings['epochs']} epochs of {settings['optimizer']} (learning "
                      f"rate {settings['learning_rate']:g}) on cross-entropy, batches of {settings['batch_size']} per "
                      f"process x {environment['processes']} process(es), the same data order and the same RNG "
                      f"state. Machine: {environment['device']}, {environment['threads']} threads, PyTorch "
                      f"{environment['torch']}, {environment['platform']}."),
        ("heading", "Side by side"),
        ("table", *summary_table(metrics)),
        ("heading", "Speed-up of the separable twin"),
        ("list", speedup_lines(metrics)),
        ("heading", "Inference in fp32 and bf16"),
        *_precision_blocks(metrics),
        ("heading", "Time per layer against the roofline"),
        *_layer_time_blocks(metrics),
        ("heading", "Plots"),
        *(("image", plot["title"], plot["file"]) for plot in metrics["plots"]),
        ("heading", "How the figures were obtained"),
        ("list", [f"parameters: {UNITS['params']}; MACs: {UNITS['macs']}",
                  f"times: {metrics['timing_method'] or NOT_MEASURED}; inference in eval mode without gradients, "
                  "as trained (eager PyTorch with sepconv's default kernels) and optimised for inference; a "
                  "training step is forward, cross-entropy, backward, optimizer step and constraints",
                  _optimized_line(metrics),
                  _bf16_method_line(metrics),
                  "train accuracy: mean over each epoch's batches in training mode (dropout on, weights changing); "
                  "validation accuracy: the whole validation set in eval mode after each epoch",
                  "every figure is in metrics.json; the checkpoints of the last completed epochs are in "
                  "checkpoints/"]),
    ]
    return blocks


def _markdown(blocks: list[tuple]) -> str:
    render = {"title": lambda text: f"# {text}", "heading": lambda text: f"## {text}", "paragraph": str,
              "table": markdown_table, "list": lambda items: "\n".join(f"- {item}" for item in items),
              "image": lambda caption, file: f"![{caption}]({file})"}
    return "\n\n".join(render[kind](*content) for kind, *content in blocks) + "\n"


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
          "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px}td:not(:first-child),"
          "th:not(:first-child){text-align:right}th{background:#f2f2f2}img{max-width:100%;border:1px solid #eee}"
          "figure{margin:1.5em 0}figcaption{color:#555;font-size:90%}")


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    def cells(tag, line):
        return "<tr>" + "".join(f"<{tag}>{html.escape(cell)}</{tag}>" for cell in line) + "</tr>"
    body = "".join(cells("td", row) for row in rows)
    return f"<table><thead>{cells('th', header)}</thead><tbody>{body}</tbody></table>"


def _html_image(caption: str, file: str, out_dir: Path) -> str:
    encoded = base64.b64encode((out_dir / file).read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{html.escape(caption)} ({html.escape(file)})</figcaption></figure>")


def _html(blocks: list[tuple], out_dir: Path) -> str:
    """A self-contained page: the plots are embedded as base64 PNGs."""
    escape = html.escape
    render = {"title": lambda text: f"<h1>{escape(text)}</h1>", "heading": lambda text: f"<h2>{escape(text)}</h2>",
              "paragraph": lambda text: f"<p>{escape(text)}</p>", "table": _html_table,
              "list": lambda items: "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in items) + "</ul>",
              "image": lambda caption, file: _html_image(caption, file, out_dir)}
    title = escape(blocks[0][1])
    body = "\n".join(render[kind](*content) for kind, *content in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def _json_ready(value):
    """``value`` with every non-finite float replaced by its name (``"nan"``, ``"inf"``, ``"-inf"``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def write_report(out_dir: Path, metrics: dict, trained_models: dict[str, nn.Module]) -> list[str]:
    """Draw the plots, then write ``metrics.json``, ``report.md`` and ``report.html`` into ``out_dir``.

    ``trained_models`` are the twins whose learned filters are drawn (those that finished training).
    Returns the names of the files written.
    """
    out_dir = Path(out_dir)
    title = f"{metrics['settings']['model']} on {metrics['dataset']['name']}"
    histories = {twin: metrics["models"][twin]["epochs"] for twin in TWINS}
    plots = []
    if any(histories.values()):
        plot_training_curves(histories, f"Training of {title}", out_dir / "curves.png")
        plots.append({"title": "accuracy and loss per epoch", "file": "curves.png"})
    plot_layer_costs({twin: metrics["models"][twin] for twin in TWINS}, out_dir / "layer_costs.png")
    plots.append({"title": "parameters and MACs per layer", "file": "layer_costs.png"})
    layer_times = {twin: metrics["models"][twin].get("layer_times") for twin in TWINS}
    if None not in layer_times.values():
        plot_layer_times(layer_times, out_dir / "layer_times.png")
        plots.append({"title": "measured time against the roofline per layer", "file": "layer_times.png"})
    for twin, model in trained_models.items():
        plots += [{"title": f"{twin} twin, learned filters of {plot['title']}", "file": plot["file"]}
                  for plot in plot_learned_filters(model, out_dir, prefix=twin)]
    metrics["plots"] = plots
    blocks = _blocks(metrics)
    atomic_write_text(json.dumps(_json_ready(metrics), indent=2, allow_nan=False) + "\n", out_dir / "metrics.json")
    atomic_write_text(_markdown(blocks), out_dir / "report.md")
    atomic_write_text(_html(blocks, out_dir), out_dir / "report.html")
    return ["metrics.json", "report.md", "report.html", *(plot["file"] for plot in plots)]

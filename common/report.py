"""Result tables, metric curves and image grids for a paper.

A result row is a dict:

    {"run": "b32", "nfe": 50, "extractor": "inception-random-seed0",
     "comparable_to_literature": False,
     "metrics": {"fid": {"value": 12.3, "ci": [11.0, 13.5]}, "kid": {"value": 0.004}, ...}}

A metric may also be a bare number (no interval). `ci` is a 95 % confidence interval
[low, high] in the metric's own unit. Every file is written to a temporary name in the
same folder and then moved into place with os.replace, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from .rundir import atomic_write_bytes, atomic_write_text


class ReportError(ValueError):
    """Invalid result rows, eval logs or images passed to the report functions."""


@dataclass(frozen=True)
class MetricFormat:
    label: str  # Markdown column header and plot title, unit included
    tex_label: str
    scale: float  # displayed value = stored value * scale
    decimals: int
    lower_is_better: bool | None  # None: no preferred direction


# Known metrics, in table column order. Metrics not listed here come after them,
# in order of first appearance, with 3 decimals.
METRIC_FORMATS: dict[str, MetricFormat] = {
    "fid": MetricFormat("FID", "FID", 1.0, 2, True),
    "kid": MetricFormat("KID ×10³", r"KID ($\times 10^{3}$)", 1e3, 2, True),
    "is": MetricFormat("IS", "IS", 1.0, 2, False),
    "precision": MetricFormat("Precision", "Precision", 1.0, 3, False),
    "recall": MetricFormat("Recall", "Recall", 1.0, 3, False),
    "density": MetricFormat("Density", "Density", 1.0, 3, False),
    "coverage": MetricFormat("Coverage", "Coverage", 1.0, 3, False),
    "c2st_accuracy": MetricFormat("C2ST acc.", "C2ST acc.", 1.0, 3, None),
    "c2st_auc": MetricFormat("C2ST AUC", "C2ST AUC", 1.0, 3, None),
}

CI_STYLES = ("interval", "pm")


def metric_format(name: str) -> MetricFormat:
    if name in METRIC_FORMATS:
        return METRIC_FORMATS[name]
    return MetricFormat(name, name, 1.0, 3, None)


# --- atomic writes -------------------------------------------------------------------------


# --- reading logs --------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list:
    """Read one JSON value per line; blank lines are skipped.

    An unparsable last line is what a process killed in the middle of a write leaves,
    so it is skipped with a warning. An unparsable line elsewhere raises ReportError.
    """
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"JSONL file not found: {path}")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(numbered):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if position == len(numbered) - 1:
                warnings.warn(
                    f"{path}: skipped the unparsable last line {number} (a truncated write?): {error}",
                    stacklevel=2,
                )
                continue
            raise ReportError(f"{path}, line {number}: invalid JSON ({error}); fix or delete that line") from None
    return records


# --- tables --------------------------------------------------------------------------------


def _metric_entry(row_name: str, name: str, entry) -> tuple[float | None, tuple[float, float] | None]:
    """Return (value, (low, high) or None) of one metric entry of a result row."""
    where = f"row '{row_name}', metric '{name}'"
    if entry is None:
        return None, None
    if isinstance(entry, (int, float)) and not isinstance(entry, bool):
        return float(entry), None
    if not isinstance(entry, dict) or "value" not in entry:
        raise ReportError(f"{where}: expected a number or a dict with 'value' (and optional 'ci'), got {entry!r}")
    value = entry["value"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ReportError(f"{where}: 'value' must be a number or null, got {value!r}")
    ci = entry.get("ci")
    if ci is not None:
        valid = (
            isinstance(ci, (list, tuple))
            and len(ci) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ci)
        )
        if not valid:
            raise ReportError(f"{where}: 'ci' must be [low, high] or null, got {ci!r}")
        if ci[0] > ci[1]:
            raise ReportError(f"{where}: 'ci' low {ci[0]} is above high {ci[1]}")
        ci = (float(ci[0]), float(ci[1]))
    return (None if value is None else float(value)), ci


def _check_rows(rows) -> list[dict]:
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ReportError("write_tables: expected a non-empty list of result rows")
    checked = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ReportError(f"result row {index}: expected a dict, got {type(row).__name__}")
        for key in ("run", "metrics"):
            if key not in row:
                raise ReportError(f"result row {index}: missing key '{key}'")
        if not isinstance(row["metrics"], dict):
            raise ReportError(f"result row {index} ('{row['run']}'): 'metrics' must be a dict of metric name to entry")
        metrics = {name: _metric_entry(str(row["run"]), name, entry) for name, entry in row["metrics"].items()}
        checked.append({
            "run": str(row["run"]),
            "nfe": row.get("nfe"),
            "extractor": row.get("extractor"),
            "comparable": bool(row.get("comparable_to_literature", False)),
            "metrics": metrics,
        })
    return checked


def _metric_columns(rows: list[dict]) -> list[str]:
    present = []
    for row in rows:
        for name in row["metrics"]:
            if name not in present:
                present.append(name)
    known = [name for name in METRIC_FORMATS if name in present]
    return known + [name for name in present if name not in METRIC_FORMATS]


def _is_number(value) -> bool:
    return value is not None and math.isfinite(value)


def format_cell(value: float | None, ci: tuple[float, float] | None, fmt: MetricFormat, ci_style: str = "interval") -> str:
    """Format a metric as 'value [low, high]' or 'value ± half-width' in the unit of `fmt`."""
    if not _is_number(value):
        return "n/a"
    text = f"{value * fmt.scale:.{fmt.decimals}f}"
    if ci is None or not all(_is_number(v) for v in ci):
        return text
    low, high = (v * fmt.scale for v in ci)
    if ci_style == "pm":
        return f"{text} ± {(high - low) / 2:.{fmt.decimals}f}"
    return f"{text} [{low:.{fmt.decimals}f}, {high:.{fmt.decimals}f}]"


def _header_label(name: str, tex: bool) -> str:
    fmt = metric_format(name)
    label = fmt.tex_label if tex else fmt.label
    if tex and name not in METRIC_FORMATS:
        label = tex_escape(label)
    if fmt.lower_is_better is True:
        return label + (r" $\downarrow$" if tex else " ↓")
    if fmt.lower_is_better is False:
        return label + (r" $\uparrow$" if tex else " ↑")
    return label


# A dagger marks extractors without the standard pytorch-fid weights. An asterisk would start
# emphasis or a list item in Markdown.
NOT_COMPARABLE_MARK = "†"


def _extractor_name(row: dict) -> str:
    return "" if row["extractor"] is None else str(row["extractor"])


def _footnote(rows: list[dict]) -> str | None:
    if all(row["comparable"] for row in rows):
        return None
    names = sorted({str(row["extractor"]) for row in rows if not row["comparable"]})
    return (
        f"Extractor not comparable to the literature ({', '.join(names)}): the FID, KID and IS values "
        "of those rows are only comparable between runs of this table that use the same extractor."
    )


def _markdown_table(rows: list[dict], columns: list[str], ci_style: str) -> str:
    header = ["Run", "NFE", "Extractor"] + [_header_label(name, tex=False) for name in columns]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":--", "--:", ":--"] + ["--:"] * len(columns)) + "|",
    ]
    for row in rows:
        extractor = _extractor_name(row) + ("" if row["comparable"] else NOT_COMPARABLE_MARK)
        cells = [row["run"], "" if row["nfe"] is None else str(row["nfe"]), extractor]
        for name in columns:
            value, ci = row["metrics"].get(name, (None, None))
            cells.append(format_cell(value, ci, metric_format(name), ci_style))
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    if ci_style == "pm":
        legend = "Cells show the value ± half the width of its 95 % confidence interval"
    else:
        legend = "Cells show the value and its 95 % confidence interval as [low, high]"
    lines += ["", legend + "; a cell without one has no interval."]
    footnote = _footnote(rows)
    if footnote:
        lines += ["", f"{NOT_COMPARABLE_MARK} {footnote}"]
    return "\n".join(lines) + "\n"


def _csv_table(rows: list[dict], columns: list[str]) -> str:
    header = ["run", "nfe", "extractor", "comparable_to_literature"]
    for name in columns:
        header += [name, f"{name}_ci_low", f"{name}_ci_high"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        cells = [row["run"], "" if row["nfe"] is None else row["nfe"], row["extractor"] or "", row["comparable"]]
        for name in columns:
            value, ci = row["metrics"].get(name, (None, None))
            # Raw values in the metric's own unit (KID is not scaled here), full precision.
            cells += ["" if value is None else repr(value)]
            cells += ["", ""] if ci is None else [repr(ci[0]), repr(ci[1])]
        writer.writerow(cells)
    return buffer.getvalue()


_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def tex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(char, char) for char in text)


def _tex_cell(value: float | None, ci: tuple[float, float] | None, fmt: MetricFormat, ci_style: str) -> str:
    text = format_cell(value, ci, fmt, ci_style)
    if text == "n/a" or ci is None:
        return text
    if ci_style == "pm":
        return text.replace(" ± ", r" $\pm$ ")
    main, interval = text.split(" ", 1)
    return main + r" {\scriptsize " + interval + "}"


def _tex_table(rows: list[dict], columns: list[str], ci_style: str) -> str:
    header = ["Run", "NFE", "Extractor"] + [_header_label(name, tex=True) for name in columns]
    lines = [
        r"% Requires \usepackage{booktabs}. Cells: value with its 95 percent confidence interval.",
        r"\begin{tabular}{lrl" + "r" * len(columns) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    for row in rows:
        cells = [
            tex_escape(row["run"]),
            "" if row["nfe"] is None else tex_escape(str(row["nfe"])),
            tex_escape(_extractor_name(row)) + ("" if row["comparable"] else r"$^{\dagger}$"),
        ]
        for name in columns:
            value, ci = row["metrics"].get(name, (None, None))
            cells.append(_tex_cell(value, ci, metric_format(name), ci_style))
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    footnote = _footnote(rows)
    if footnote:
        # After the tabular, so the note wraps at the line width of the enclosing table float.
        lines += [r"\par\smallskip", r"{\footnotesize $^{\dagger}$ " + tex_escape(footnote) + r"\par}"]
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], out_dir: str | Path, ci_style: str = "interval") -> dict[str, Path]:
    """Write results.md, results.csv and results.tex for result rows (one table row each).

    ci_style: "interval" prints 'value [low, high]' (exact for asymmetric bootstrap
    intervals); "pm" prints 'value ± half-width', with half-width = (high - low) / 2.
    Returns {"md": path, "csv": path, "tex": path}.
    """
    if ci_style not in CI_STYLES:
        raise ReportError(f"ci_style: invalid value {ci_style!r}; expected one of {', '.join(CI_STYLES)}")
    checked = _check_rows(rows)
    columns = _metric_columns(checked)
    out_dir = Path(out_dir)
    return {
        "md": atomic_write_text(out_dir / "results.md", _markdown_table(checked, columns, ci_style)),
        "csv": atomic_write_text(out_dir / "results.csv", _csv_table(checked, columns)),
        "tex": atomic_write_text(out_dir / "results.tex", _tex_table(checked, columns, ci_style)),
    }


# --- figures -------------------------------------------------------------------------------


def _save_figure(figure: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def plot_metric_curves(eval_jsonl_path: str | Path, out_png: str | Path, metrics: list[str] | None = None) -> Path:
    """Plot each metric of a run's eval.jsonl against the fine-tuning step, with 95 % CI bands.

    Each line of eval.jsonl: {"step": int, "checkpoint": str, "metrics": {name: entry}}
    with entries as in the result rows. `metrics` selects and orders the subplots;
    None plots every metric found.
    """
    records = read_jsonl(eval_jsonl_path)
    points: dict[str, list[tuple[int, float, tuple[float, float] | None]]] = {}
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or "step" not in record or not isinstance(record.get("metrics"), dict):
            raise ReportError(f"{eval_jsonl_path}, record {number}: expected {{'step': int, 'metrics': {{...}}}}")
        for name, entry in record["metrics"].items():
            value, ci = _metric_entry(f"step {record['step']}", name, entry)
            if _is_number(value):
                points.setdefault(name, []).append((int(record["step"]), value, ci))
    names = _metric_columns([{"metrics": points}]) if metrics is None else list(metrics)
    missing = [name for name in names if name not in points]
    if missing or not names:
        raise ReportError(
            f"{eval_jsonl_path}: no values for metric(s) {missing or 'any'}; metrics found: {sorted(points)}"
        )

    columns = min(3, len(names))
    grid_rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(4.0 * columns, 3.0 * grid_rows))
    for position, name in enumerate(names, start=1):
        axes = figure.add_subplot(grid_rows, columns, position)
        fmt = metric_format(name)
        series = sorted(points[name], key=lambda point: point[0])
        steps = np.array([point[0] for point in series])
        values = np.array([point[1] for point in series]) * fmt.scale
        axes.plot(steps, values, marker="o", markersize=3)
        with_ci = [point for point in series if point[2] is not None]
        if with_ci:
            ci_steps = [point[0] for point in with_ci]
            low = np.array([point[2][0] for point in with_ci]) * fmt.scale
            high = np.array([point[2][1] for point in with_ci]) * fmt.scale
            axes.fill_between(ci_steps, low, high, alpha=0.25, linewidth=0, label="95 % CI")
            axes.legend(fontsize=7)
        axes.set_title(_header_label(name, tex=False))
        axes.set_xlabel("fine-tuning step")
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save_figure(figure, out_png)


# --- image grids ---------------------------------------------------------------------------


def to_uint8_hwc(images: torch.Tensor, name: str) -> np.ndarray:
    """Convert [N, C, H, W] images (float in [-1, 1] or uint8) to uint8 [N, H, W, 3]."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ReportError(f"{name}: expected a tensor of images [N, 3, H, W] or [N, 1, H, W], got {shape}")
    images = images.detach().cpu()
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ReportError(f"{name}: expected float [-1, 1] or uint8 images, got dtype {images.dtype}")
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def _upscale(image: Image.Image, factor: int) -> Image.Image:
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def _display_factor(height: int) -> int:
    # Tiny images (16-32 px) are enlarged with nearest-neighbour so the text labels fit.
    return max(1, 64 // height)


def _save_png(image: Image.Image, path: str | Path) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def save_pair_grid(
    before: torch.Tensor,
    after: torch.Tensor,
    path: str | Path,
    labels: tuple[str, str] = ("before", "after"),
    columns: int = 8,
) -> Path:
    """Save a before/after grid: sample i of `before` sits directly above sample i of `after`.

    Images are [N, 3, H, W] float in [-1, 1] (or uint8), generated from the same seeds.
    The samples are laid out in groups of `columns`, each group as two rows labelled
    with `labels`.
    """
    first = to_uint8_hwc(before, "before")
    second = to_uint8_hwc(after, "after")
    if first.shape != second.shape:
        raise ReportError(f"before and after differ in shape: {list(before.shape)} vs {list(after.shape)}")
    if len(labels) != 2:
        raise ReportError(f"labels: expected two strings, got {labels!r}")
    if columns < 1:
        raise ReportError(f"columns must be >= 1, got {columns}")
    count, height, width, _ = first.shape
    factor = _display_factor(height)
    cell_h, cell_w = height * factor, width * factor
    font = ImageFont.load_default()
    label_w = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(str(t), font=font)) for t in labels) + 8
    columns = min(columns, count)
    groups = math.ceil(count / columns)
    gap = 2
    canvas = Image.new(
        "RGB",
        (label_w + columns * (cell_w + gap), groups * (2 * (cell_h + gap) + 2 * gap)),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    for group in range(groups):
        top = group * (2 * (cell_h + gap) + 2 * gap)
        for row, (images, label) in enumerate(((first, labels[0]), (second, labels[1]))):
            y = top + row * (cell_h + gap)
            draw.text((4, y + cell_h // 2 - 5), str(label), fill="black", font=font)
            for column in range(columns):
                index = group * columns + column
                if index >= count:
                    break
                tile = _upscale(Image.fromarray(images[index]), factor)
                canvas.paste(tile, (label_w + column * (cell_w + gap), y))
    return _save_png(canvas, path)


def save_nn_grid(
    fakes: torch.Tensor,
    nearest_reals: torch.Tensor,
    distances,
    path: str | Path,
    columns: int = 4,
) -> Path:
    """Save each generated image (left) next to its nearest training image (right), with the distance below.

    fakes and nearest_reals are [N, 3, H, W] float in [-1, 1] (or uint8). distances are N
    numbers in the unit of the caller's feature space, printed with 4 significant digits.
    """
    generated = to_uint8_hwc(fakes, "fakes")
    nearest = to_uint8_hwc(nearest_reals, "nearest_reals")
    distances = np.asarray(distances, dtype=np.float64).ravel()
    if generated.shape != nearest.shape:
        raise ReportError(f"fakes and nearest_reals differ in shape: {list(fakes.shape)} vs {list(nearest_reals.shape)}")
    if distances.size != generated.shape[0]:
        raise ReportError(f"distances: expected {generated.shape[0]} values (one per image), got {distances.size}")
    if columns < 1:
        raise ReportError(f"columns must be >= 1, got {columns}")
    count, height, width, _ = generated.shape
    factor = _display_factor(height)
    cell_h, cell_w = height * factor, width * factor
    font = ImageFont.load_default()
    text_h, gap = 14, 6
    pair_w = 2 * cell_w + 2
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    canvas = Image.new("RGB", (columns * (pair_w + gap), rows * (cell_h + text_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for index in range(count):
        x = (index % columns) * (pair_w + gap)
        y = (index // columns) * (cell_h + text_h + gap)
        canvas.paste(_upscale(Image.fromarray(generated[index]), factor), (x, y))
        canvas.paste(_upscale(Image.fromarray(nearest[index]), factor), (x + cell_w + 2, y))
        draw.text((x + 2, y + cell_h + 1), f"d={distances[index]:.4g}", fill="black", font=font)
    return _save_png(canvas, path)

"""Tests of the result tables, metric curves, image grids and JSONL reader."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.report import (
    ReportError,
    plot_metric_curves,
    read_jsonl,
    save_nn_grid,
    save_pair_grid,
    tex_escape,
    write_tables,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_rows(comparable: bool = False) -> list[dict]:
    return [
        {
            "run": "b32_base",
            "nfe": 50,
            "extractor": "inception-random-seed0",
            "comparable_to_literature": comparable,
            "metrics": {
                "fid": {"value": 12.345, "ci": [11.0, 13.5]},
                "kid": {"value": 0.00412, "ci": [0.003, 0.005]},
                "precision": {"value": 0.71234, "ci": [0.7, 0.725]},
                "c2st_auc": 0.61,
            },
        },
        {
            "run": "adv_ft",
            "nfe": 10,
            "extractor": "inception-random-seed0",
            "comparable_to_literature": comparable,
            "metrics": {
                "fid": {"value": 10.0, "ci": [9.5, 10.7]},
                "recall": {"value": 0.5, "ci": None},
            },
        },
    ]


def markdown_lines(path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_markdown_header_and_cells(tmp_path):
    paths = write_tables(make_rows(), tmp_path)
    lines = markdown_lines(paths["md"])
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["Run", "NFE", "Extractor", "FID ↓", "KID ×10³ ↓", "Precision ↑", "Recall ↑", "C2ST AUC"]
    first = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert first[0] == "b32_base"
    assert first[1] == "50"
    assert first[2] == "inception-random-seed0†"
    assert first[3] == "12.35 [11.00, 13.50]"
    assert first[4] == "4.12 [3.00, 5.00]"
    assert first[5] == "0.712 [0.700, 0.725]"
    assert first[6] == "n/a"
    assert first[7] == "0.610"
    second = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert second[3] == "10.00 [9.50, 10.70]"
    assert second[6] == "0.500"


def test_markdown_plus_minus_style(tmp_path):
    paths = write_tables(make_rows(), tmp_path, ci_style="pm")
    text = paths["md"].read_text(encoding="utf-8")
    assert "| 12.35 ± 1.25 |" in text
    assert "| 4.12 ± 1.00 |" in text
    assert "half the width" in text


def test_extractor_footnote(tmp_path):
    text = write_tables(make_rows(comparable=False), tmp_path / "a")["md"].read_text(encoding="utf-8")
    footnote = [line for line in text.splitlines() if line.startswith("†")]
    assert len(footnote) == 1
    assert "inception-random-seed0" in footnote[0]
    assert "only comparable between runs of this table" in footnote[0]

    text = write_tables(make_rows(comparable=True), tmp_path / "b")["md"].read_text(encoding="utf-8")
    assert "†" not in text
    assert "literature" not in text


def test_csv_parse_back(tmp_path):
    paths = write_tables(make_rows(), tmp_path)
    with paths["csv"].open(newline="") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == 2
    first, second = records
    assert first["run"] == "b32_base"
    assert first["nfe"] == "50"
    assert first["comparable_to_literature"] == "False"
    assert float(first["fid"]) == 12.345
    assert float(first["fid_ci_low"]) == 11.0
    assert float(first["fid_ci_high"]) == 13.5
    assert float(first["kid"]) == 0.00412  # raw unit, not x10^3
    assert first["c2st_auc_ci_low"] == ""
    assert first["recall"] == ""
    assert float(second["recall"]) == 0.5
    assert second["recall_ci_low"] == ""
    assert second["kid"] == ""


def test_tex_escaping_and_booktabs(tmp_path):
    text = write_tables(make_rows(), tmp_path)["tex"].read_text(encoding="utf-8")
    assert r"\begin{tabular}{lrlrrrrr}" in text
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\end{tabular}"):
        assert rule in text
    assert r"b32\_base" in text
    assert r"adv\_ft" in text
    assert "b32_base" not in text
    assert r"12.35 {\scriptsize [11.00, 13.50]}" in text
    assert r"KID ($\times 10^{3}$) $\downarrow$" in text
    assert r"inception-random-seed0$^{\dagger}$" in text
    assert r"{\footnotesize $^{\dagger}$" in text
    assert text.count(r"\\") == 3  # header and two rows


def test_tex_escape_specials():
    assert tex_escape("a_b & 5% $x$ #1 {y} ~^\\") == (
        r"a\_b \& 5\% \$x\$ \#1 \{y\} \textasciitilde{}\textasciicircum{}\textbackslash{}"
    )


def test_tables_leave_no_temp_files(tmp_path):
    write_tables(make_rows(), tmp_path)
    write_tables(make_rows(), tmp_path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.md", "results.tex"]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([], "non-empty list"),
        ([{"metrics": {}}], "missing key 'run'"),
        ([{"run": "a"}], "missing key 'metrics'"),
        ([{"run": "a", "metrics": {"fid": {"value": "12"}}}], "'value' must be a number"),
        ([{"run": "a", "metrics": {"fid": {"value": 12.0, "ci": [13.0, 11.0]}}}], "low 13.0 is above high 11.0"),
        ([{"run": "a", "metrics": {"fid": {"value": 12.0, "ci": [1.0]}}}], r"'ci' must be \[low, high\]"),
        ([{"run": "a", "metrics": {"fid": "12"}}], "expected a number or a dict"),
    ],
)
def test_invalid_rows(tmp_path, rows, message):
    with pytest.raises(ReportError, match=message):
        write_tables(rows, tmp_path)


def test_invalid_ci_style(tmp_path):
    with pytest.raises(ReportError, match="ci_style"):
        write_tables(make_rows(), tmp_path, ci_style="brackets")


def write_eval_log(path, truncated: bool = False) -> None:
    lines = []
    for step in range(0, 100, 25):
        metrics = {
            "fid": {"value": 20.0 - step / 10, "ci": [19.0 - step / 10, 21.0 - step / 10]},
            "kid": 0.01 - step / 1e4,
            "precision": {"value": 0.6, "ci": None},
        }
        lines.append(json.dumps({"step": step, "checkpoint": f"ckpt_{step:06d}.pt", "metrics": metrics}))
    text = "\n".join(lines) + "\n"
    if truncated:
        text += '{"step": 100, "checkpoint": "ckpt_0001'
    path.write_text(text)


def test_plot_metric_curves(tmp_path):
    log = tmp_path / "eval.jsonl"
    write_eval_log(log)
    out = plot_metric_curves(log, tmp_path / "plots" / "curves.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(out) as image:
        assert image.width > image.height > 100  # three subplots side by side
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["curves.png"]


def test_plot_selected_and_missing_metric(tmp_path):
    log = tmp_path / "eval.jsonl"
    write_eval_log(log, truncated=True)
    with pytest.warns(UserWarning, match="truncated"):
        out = plot_metric_curves(log, tmp_path / "fid.png", metrics=["fid"])
    assert out.is_file()
    with pytest.warns(UserWarning), pytest.raises(ReportError, match=r"no values for metric\(s\) \['is'\]"):
        plot_metric_curves(log, tmp_path / "is.png", metrics=["is"])


def test_read_jsonl_truncated_last_line(tmp_path):
    log = tmp_path / "eval.jsonl"
    write_eval_log(log, truncated=True)
    with pytest.warns(UserWarning, match="line 5"):
        records = read_jsonl(log)
    assert [record["step"] for record in records] == [0, 25, 50, 75]


def test_read_jsonl_blank_lines_and_errors(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(log) == [{"a": 1}, {"a": 2}]
    log.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(ReportError, match="line 2: invalid JSON"):
        read_jsonl(log)
    with pytest.raises(ReportError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def solid(color: tuple[float, float, float], count: int = 5, size: int = 16) -> torch.Tensor:
    """Images [count, 3, size, size] in [-1, 1] filled with one colour given in [-1, 1] per channel."""
    return torch.tensor(color, dtype=torch.float32)[None, :, None, None].expand(count, 3, size, size).clone()


def test_pair_grid_rows(tmp_path):
    red, blue = (1.0, -1.0, -1.0), (-1.0, -1.0, 1.0)
    out = save_pair_grid(solid(red), solid(blue), tmp_path / "pairs.png", columns=3)
    with Image.open(out) as image:
        pixels = np.asarray(image.convert("RGB"))
    # 16 px images are shown at 4x: 64 px cells, 2 px gaps, two groups (3 + 2 samples).
    before_row = {tuple(p) for p in pixels[32]}
    after_row = {tuple(p) for p in pixels[64 + 2 + 32]}
    assert (255, 0, 0) in before_row
    assert (0, 0, 255) not in before_row
    assert (0, 0, 255) in after_row
    assert (255, 0, 0) not in after_row
    assert pixels.shape[0] == 2 * (2 * (64 + 2) + 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.png"]


def test_pair_grid_accepts_uint8_and_gray(tmp_path):
    before = torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    after = torch.full((4, 1, 32, 32), 255, dtype=torch.uint8)
    out = save_pair_grid(before, after, tmp_path / "gray.png", labels=("base", "adv"))
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_pair_grid_shape_mismatch(tmp_path):
    with pytest.raises(ReportError, match="differ in shape"):
        save_pair_grid(torch.zeros(4, 3, 16, 16), torch.zeros(3, 3, 16, 16), tmp_path / "x.png")
    with pytest.raises(ReportError, match=r"\[N, 3, H, W\]"):
        save_pair_grid(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_nn_grid(tmp_path):
    fakes = solid((1.0, 1.0, -1.0), count=3)
    reals = solid((-1.0, 1.0, 1.0), count=3)
    out = save_nn_grid(fakes, reals, [0.5, 1.25, 3.0], tmp_path / "nn.png", columns=2)
    with Image.open(out) as image:
        pixels = np.asarray(image.convert("RGB"))
    # Each pair: generated (64 px) | 2 px | nearest real (64 px); 14 px text strip and 6 px gap below.
    assert pixels.shape[:2] == (2 * (64 + 14 + 6), 2 * (130 + 6))
    assert tuple(pixels[32, 32]) == (255, 255, 0)
    assert tuple(pixels[32, 66 + 32]) == (0, 255, 255)
    text_strip = pixels[64 + 1 : 64 + 14, :60]
    assert (text_strip < 128).any()  # the distance label is drawn in black


def test_nn_grid_invalid(tmp_path):
    images = torch.zeros(3, 3, 16, 16)
    with pytest.raises(ReportError, match="expected 3 values"):
        save_nn_grid(images, images, [1.0, 2.0], tmp_path / "nn.png")
    with pytest.raises(ReportError, match="differ in shape"):
        save_nn_grid(images, torch.zeros(3, 3, 8, 8), [1.0, 2.0, 3.0], tmp_path / "nn.png")

"""Vega-Lite charts for the pages people open first (Runs, Settling, Threshold sweep, Distributions).

Why not Plotly there: a browser that has not loaded it yet spends about 1 s (idle machine) to 2 s (loaded) of
its main thread evaluating Plotly's 4.7 MB bundle before the first Plotly chart can draw, and a new visitor's
first view always pays it; Vega-Lite's bundle takes about a tenth of that (`bench/bench_firstview.py`,
`BENCHMARKS.md`). The other pages keep Plotly (`common.figure`).

A `Chart` is built like a Plotly figure, layer by layer, over a quantitative x axis:

    Chart("Frozen fraction vs epoch", "epoch", "frozen weights (%)").line("replay", epochs, pct).vline(3.0).show("k")

Named series share one colour legend (the colours given, fixed hex values readable on the light and the dark
theme); axes, text and background follow Streamlit's theme. Data travel as Arrow tables (`spec["datasets"]`),
hovering a mark shows its values, and line and bar charts zoom and pan (wheel, drag; double-click resets).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import streamlit as st

INK = "#888888"   # reference lines: visible on white and on near-black (common.INK)


def _col(values) -> np.ndarray:
    a = np.asarray(values)
    return a.astype(np.float64) if a.dtype.kind in "iufb" else a


class Chart:
    """Layers (lines, bars, areas, heat-map cells, reference lines) sharing a quantitative x axis."""

    def __init__(self, title: str | None = None, x: str | None = None, y: str | None = None, height: int = 280,
                 y_log: bool = False, y_domain: Sequence[float] | None = None,
                 x_domain: Sequence[float] | None = None, x_ticks: dict[float, str] | None = None,
                 y_ticks: dict[float, str] | None = None, zoom: bool = True, legend: bool = True):
        self.title, self.x_title, self.y_title, self.height = title, x, y, height
        self.y_log, self.y_domain, self.x_domain = y_log, y_domain, x_domain
        self.x_ticks, self.y_ticks, self.zoom, self.legend = x_ticks, y_ticks, zoom, legend
        self.layers: list[dict] = []
        self.datasets: dict[str, pd.DataFrame] = {}
        self.colors: dict[str, str] = {}     # series name -> colour (one shared legend, in this order)
        self.dashes: dict[str, list[int]] = {}

    # ---- data layers ------------------------------------------------------------------------------------
    def _data(self, frame: dict, drop_missing: str | None = None) -> dict:
        name = f"d{len(self.datasets)}"
        df = pd.DataFrame({k: _col(v) for k, v in frame.items()})
        self.datasets[name] = df[df[drop_missing].notna()].reset_index(drop=True) if drop_missing else df
        return {"name": name}

    def _series(self, name: str, color: str, dash: Sequence[int] | None = None) -> None:
        self.colors.setdefault(name, color)
        self.dashes.setdefault(name, list(dash) if dash else [1, 0])

    def _tooltip(self, fmt: str, extra: dict[str, tuple[str, str]] | None) -> list[dict]:
        tips = [{"field": "series", "type": "nominal", "title": " "},
                {"field": "x", "type": "quantitative", "title": self.x_title or "x", "format": ".4~g"},
                {"field": "y", "type": "quantitative", "title": self.y_title or "y", "format": fmt}]
        for field, (title, f) in (extra or {}).items():
            tips.append({"field": field, "type": "quantitative", "title": title, "format": f})
        return tips

    def line(self, name: str, x, y, color: str, dash: Sequence[int] | None = None, width: float = 2,
             points: bool = True, fmt: str = ".1f", step: bool = False) -> "Chart":
        """A named series drawn as a line, with its points when `points` and at most 60 of them (hovering the
        line shows the nearest point's values either way)."""
        self._series(name, color, dash)
        mark = {"type": "line", "strokeWidth": width, "interpolate": "step" if step else "linear"}
        if points and len(x) <= 60:
            mark["point"] = {"filled": True, "size": 30}
        self.layers.append({"data": self._data({"x": x, "y": y, "series": [name] * len(x)}), "mark": mark,
                            "encoding": {"strokeDash": {"field": "series", "type": "nominal", "legend": None},
                                         "tooltip": self._tooltip(fmt, None)}})
        return self

    def bars(self, x, series: dict[str, tuple], width: float, fmt: str = ".2f", opacity: float = 1.0,
             stack: bool = True) -> "Chart":
        """Bars centred on `x`, `width` wide (x units), one named series per entry of
        `series`: name -> (y, colour) or (y, colour, counts), counts (e.g. numbers of weights) shown on hover.
        Series stack in the order given, or overlap when `stack` is False."""
        x = np.asarray(x, dtype=np.float64)
        frame: dict[str, list] = {k: [] for k in ("x", "x0", "x1", "y", "y0", "y1", "series", "n")}
        base = np.zeros(len(x))
        for name, (y, color, *counts) in series.items():
            self._series(name, color)
            y = np.asarray(y, dtype=np.float64)
            top = base + np.nan_to_num(y) if stack else np.nan_to_num(y)
            frame["x"] += list(x)
            frame["x0"] += list(x - width / 2)
            frame["x1"] += list(x + width / 2)
            frame["y"] += list(y)
            frame["y0"] += list(base if stack else np.zeros(len(x)))
            frame["y1"] += list(top)
            frame["series"] += [name] * len(x)
            frame["n"] += list(np.asarray(counts[0], dtype=np.float64)) if counts else [np.nan] * len(x)
            if stack:
                base = top
        extra = {"n": ("weights", ",.0f")} if any(len(v) > 2 for v in series.values()) else None
        # a rect from (x0, y0) to (x1, y1): stacked here, not by Vega-Lite (a bar ranged on x would lie down)
        self.layers.append({"data": self._data(frame, drop_missing="y"), "mark": {"type": "rect", "opacity": opacity},
                            "encoding": {"x": {"field": "x0"}, "x2": {"field": "x1"},
                                         "y": {"field": "y1"}, "y2": {"field": "y0"},
                                         "tooltip": self._tooltip(fmt, extra)}})
        return self

    def areas(self, x, series: dict[str, tuple], fmt: str = ".1f") -> "Chart":
        """Areas stacked in the order given; `series`: name -> (y, colour)."""
        frame: dict[str, list] = {"x": [], "y": [], "series": [], "order": []}
        for i, (name, (y, color)) in enumerate(series.items()):
            self._series(name, color)
            frame["x"] += list(np.asarray(x, dtype=np.float64))
            frame["y"] += list(np.asarray(y, dtype=np.float64))
            frame["series"] += [name] * len(x)
            frame["order"] += [i] * len(x)
        self.layers.append({"data": self._data(frame),
                            "mark": {"type": "area", "line": {"strokeWidth": 0.5}, "opacity": 0.85},
                            "encoding": {"y": {"field": "y", "stack": "zero"},
                                         "order": {"field": "order", "type": "ordinal"},
                                         "tooltip": self._tooltip(fmt, None)}})
        return self

    def heatmap(self, x_edges, y_edges, z, colorbar: str, zmin: float | None = None, zmax: float | None = None,
                scheme: str = "viridis", hover: dict[str, tuple[np.ndarray, str, str]] | None = None,
                x_values=None, y_values=None) -> "Chart":
        """Cells [rows, columns] of `z` coloured on a continuous scale (no legend entry) between their edges.
        `hover`: extra per-cell values shown on hover, field -> (array like z, title, d3 format); `x_values`,
        `y_values`: what hovering a column / row shows (e.g. each record's epoch; default the cell's middle)."""
        xe, ye = np.asarray(x_edges, dtype=np.float64), np.asarray(y_edges, dtype=np.float64)
        z = np.asarray(z, dtype=np.float64)
        ny, nx = z.shape
        extra = {field: np.asarray(values, dtype=np.float64).reshape(ny, nx)
                 for field, (values, _, _) in (hover or {}).items()}
        # a run of equal cells along a row is drawn as one cell: the browser's cost grows with the cells drawn
        # (81 × 100 cells cost 0.3–0.6 s of a first view), and plateaus (0 % during a warm-up, 100 % once all
        # froze) are where a heat map spends most of its cells
        same = np.zeros((ny, nx), dtype=bool)       # [row, column]: this cell continues the one on its left
        same[:, 1:] = np.all([(a[:, 1:] == a[:, :-1]) | (np.isnan(a[:, 1:]) & np.isnan(a[:, :-1]))
                              for a in (z, *extra.values())], axis=0)
        if xe.ndim == 2:                                # columns set apart by a gap stay apart
            same[:, 1:] &= xe[1:, 0] <= xe[:-1, 1]
        first = np.flatnonzero(~same.ravel())                       # each drawn cell's first source cell
        last = np.append(first[1:] - 1, ny * nx - 1)                # … and its last (same row)
        yi, xi, xl = first // nx, first % nx, last % nx
        # edges: [n+1] contiguous cells, or [n, 2] (low, high) per cell (cells set apart by a gap)
        x0, x1 = (xe[xi, 0], xe[xl, 1]) if xe.ndim == 2 else (xe[xi], xe[xl + 1])
        y0, y1 = (ye[yi, 0], ye[yi, 1]) if ye.ndim == 2 else (ye[yi], ye[yi + 1])
        # each cell reaches 1 % of a column into its neighbours: no hairline gaps between them when drawn
        gx = 0.01 * ((xe[:, 1] - xe[:, 0]) if xe.ndim == 2 else np.diff(xe))
        gy = 0.01 * (y1 - y0)
        xs = ((xe[:, 0] + xe[:, 1]) / 2 if xe.ndim == 2 else (xe[:-1] + xe[1:]) / 2) if x_values is None \
            else np.asarray(x_values, dtype=np.float64)
        yv = (y0 + y1) / 2 if y_values is None else np.asarray(y_values, dtype=np.float64)[yi]
        frame = {"x": xs[xi], "x_to": xs[xl], "x0": x0 - gx[xi], "x1": x1 + gx[xl], "y": yv, "y0": y0 - gy,
                 "y1": y1 + gy, "z": z.ravel()[first]}
        tips = [{"field": "x", "type": "quantitative", "title": self.x_title or "x", "format": ".4~g"},
                {"field": "y", "type": "quantitative", "title": self.y_title or "y", "format": ".4~g"},
                {"field": "z", "type": "quantitative", "title": colorbar, "format": ".3~g"}]
        if np.any(xl != xi):   # some cells stand for several columns: hovering one shows where it ends
            tips.insert(1, {"field": "x_to", "type": "quantitative", "title": f"… to {self.x_title or 'x'}",
                            "format": ".4~g"})
        for field, (values, title, fmt) in (hover or {}).items():
            frame[field] = extra[field].ravel()[first]
            tips.append({"field": field, "type": "quantitative", "title": title, "format": fmt})
        scale = {"scheme": scheme}
        if zmin is not None and zmax is not None:
            scale["domain"] = [zmin, zmax]
        self.layers.append({"data": self._data(frame), "mark": {"type": "rect"},
                            "encoding": {"x": {"field": "x0"}, "x2": {"field": "x1"},
                                         "y": {"field": "y0"}, "y2": {"field": "y1"},
                                         "color": {"field": "z", "type": "quantitative", "scale": scale,
                                                   "legend": {"title": colorbar, "orient": "right"}},
                                         "tooltip": tips}, "_own_color": True})
        self.zoom = False
        return self

    def custom(self, frame: dict, layer: dict) -> "Chart":
        """A layer with its own encodings (e.g. ordinal axes, its own colour scale) over the columns `frame`."""
        self.layers.append({**layer, "data": self._data(frame), "_own_color": True, "_own_axes": True})
        return self

    # ---- reference lines and bands ------------------------------------------------------------------------
    def vline(self, x: float, color: str = INK, dash: bool = True, width: float = 1.0, name: str | None = None,
              opacity: float = 1.0) -> "Chart":
        """A vertical line at `x`; named lines get a legend entry."""
        return self._rule("x", x, color, dash, width, name, opacity)

    def hline(self, y: float, color: str = INK, dash: bool = True, width: float = 1.0,
              name: str | None = None) -> "Chart":
        return self._rule("y", y, color, dash, width, name, 1.0)

    def _rule(self, axis: str, at: float, color: str, dash, width: float, name: str | None,
              opacity: float) -> "Chart":
        dash = ([4, 3] if dash is True else list(dash) if dash else None)
        mark = {"type": "rule", "strokeWidth": width, "opacity": opacity}
        enc = {axis: {"field": axis, "type": "quantitative"}}
        frame = {axis: [float(at)]}
        if name is None:
            mark["color"] = color
            if dash:
                mark["strokeDash"] = dash
            layer = {"mark": mark, "encoding": enc, "_own_color": True}
        else:
            self._series(name, color, dash)
            frame["series"] = [name]
            enc["strokeDash"] = {"field": "series", "type": "nominal", "legend": None}
            layer = {"mark": mark, "encoding": enc}
        layer["data"] = self._data(frame)
        self.layers.append(layer)
        return self

    def band(self, x0: float, x1: float, label: str | None = None, color: str = "grey",
             opacity: float = 0.12) -> "Chart":
        """A shaded vertical band from x0 to x1 (e.g. the warm-up), with its label at the top left."""
        self.layers.append({"data": self._data({"x0": [float(x0)], "x1": [float(x1)]}),
                            "mark": {"type": "rect", "color": color, "opacity": opacity},
                            "encoding": {"x": {"field": "x0", "type": "quantitative"}, "x2": {"field": "x1"},
                                         "y": {"value": 0}, "y2": {"value": {"expr": "height"}}},
                            "_own_color": True})
        if label:
            self.layers.append({"data": self._data({"x": [float(x0)], "label": [label]}),
                                "mark": {"type": "text", "align": "left", "baseline": "top", "dx": 4, "y": 4,
                                         "color": INK},
                                "encoding": {"x": {"field": "x", "type": "quantitative"},
                                             "text": {"field": "label"}}, "_own_color": True})
        return self

    # ---- the spec ------------------------------------------------------------------------------------------
    @staticmethod
    def _axis(title: str | None, ticks: dict[float, str] | None) -> dict:
        axis: dict = {"title": title}
        if ticks:
            vals = list(ticks)
            axis["values"] = vals
            expr = "datum.label"
            for v, text in reversed(list(ticks.items())):
                expr = f"abs(datum.value - {v!r}) < 1e-9 ? {text!r} : ({expr})"
            axis["labelExpr"] = expr
        return axis

    def spec(self) -> dict:
        """The Vega-Lite spec (with its data frames under "datasets")."""
        x_scale: dict = {"zero": False, "nice": False}
        if self.x_domain is not None:
            x_scale["domain"] = [float(v) for v in self.x_domain]
        y_scale: dict = {"type": "log"} if self.y_log else {}
        if self.y_domain is not None and not self.y_log:
            y_scale["domain"] = [float(v) for v in self.y_domain]
        filled = any(layer["mark"]["type"] in ("rect", "area") and not layer.get("_own_color")
                     for layer in self.layers)
        color = {"field": "series", "type": "nominal", "title": None,
                 "scale": {"domain": list(self.colors), "range": list(self.colors.values())},
                 "legend": {"orient": "bottom", "direction": "horizontal", "labelLimit": 600,
                            "columns": min(len(self.colors), 4) if max(map(len, self.colors), default=0) <= 24 else 1,
                            "symbolType": "square" if filled else "stroke"} if self.legend else None}
        dash_scale = {"domain": list(self.dashes), "range": list(self.dashes.values())}
        layers = []
        for i, layer in enumerate(self.layers):
            layer = dict(layer)
            own = layer.pop("_own_color", False)
            if layer.pop("_own_axes", False):     # a layer with its own (e.g. ordinal) axes
                if i == 0 and self.zoom:
                    layer["params"] = [{"name": "zoom", "select": "interval", "bind": "scales"}]
                layers.append(layer)
                continue
            enc = dict(layer.get("encoding", {}))
            kind = layer["mark"]["type"]
            if kind != "rule":
                enc.setdefault("x", {"field": "x"})
            if kind not in ("rule", "text"):
                enc.setdefault("y", {"field": "y"})
            if "x" in enc:
                enc["x"] = {"type": "quantitative", **enc["x"], "scale": x_scale,
                            "axis": self._axis(self.x_title, self.x_ticks)}
            if "y" in enc and "field" in enc["y"]:
                enc["y"] = {"type": "quantitative", **enc["y"], "scale": y_scale,
                            "axis": {**self._axis(self.y_title, self.y_ticks),
                                     "titleLimit": max(self.height - 40, 80)}}  # a long title must not shrink the plot
            if not own:
                enc["color"] = color
            if "strokeDash" in enc:
                enc["strokeDash"] = {**enc["strokeDash"], "scale": dash_scale}
            layer["encoding"] = enc
            if i == 0 and self.zoom:
                layer["params"] = [{"name": "zoom", "select": "interval", "bind": "scales"}]
            layers.append(layer)
        # the width fits the page; the height is the plot's, legend and axes come on top of it
        spec: dict = {"height": self.height, "layer": layers, "datasets": dict(self.datasets),
                      "autosize": {"type": "fit-x", "contains": "padding"},
                      "padding": {"top": 10, "left": 5, "right": 5, "bottom": 5},
                      "config": {"legend": {"labelFontSize": 12}}}
        if self.title:
            spec["title"] = {"text": self.title, "anchor": "start"}
        return spec

    def show(self, key: str, width: int | str = "stretch") -> None:
        if not self.layers:
            st.caption(f"{self.title or 'This chart'}: nothing recorded to draw.")
            return
        st.vega_lite_chart(spec=self.spec(), width=width, key=key)


def edges_from_centers(centers: Iterable[float]) -> np.ndarray:
    """Cell edges halfway between sorted centres (the outer ones mirrored): heat-map cells of uneven x."""
    c = np.asarray(list(centers), dtype=np.float64)
    if len(c) == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = (c[:-1] + c[1:]) / 2
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])

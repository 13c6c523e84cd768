"""
The chart (latest.png): every measurement gives panels of bars, drawn here
two to a row, in the table's order.

A panel has categories along the x axis and one or more series; each series
puts one bar in every category (side by side when there are several), with
its text above the bar.
"""

import importlib.util
import math
import typing

import attr

ANYPROXY = "#d62728"   # AnyProxy's bars
PEER = "#1f77b4"       # a peer's
PEER_LIGHT = "#6baed6"
ANYPROXY_LIGHT = "#ff9896"


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Series:
    label: str                                         # legend entry ("": none)
    values: typing.Sequence[typing.Optional[float]]    # one per category; None: no bar
    texts: typing.Optional[typing.Sequence[str]] = None   # above each bar (default: the value, the panel's fmt)
    colors: typing.Optional[typing.Sequence[str]] = None  # one per bar (default: color)
    color: typing.Optional[str] = None                 # None: matplotlib's next colour


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Panel:
    title: str
    ylabel: str
    categories: typing.Sequence[str]
    series: typing.Sequence[Series]
    fmt: str = "%.0f"                                   # bar texts, unless a series has its own
    fontsize: int = 8                                   # of the bar texts
    reference: typing.Optional[typing.Tuple[float, str]] = None  # a dashed line: (value, legend label)
    legend: typing.Optional[typing.Sequence[typing.Tuple[str, str]]] = None  # (colour, label) patches instead
    margin: float = 0.12                                # room above the bars for their texts

    def problems(self):
        """What is inconsistent (lengths), as text; empty when the panel can be drawn."""
        out = []
        for s in self.series:
            for what, seq in (("values", s.values), ("texts", s.texts), ("colors", s.colors)):
                if seq is not None and len(seq) != len(self.categories):
                    out.append("%s: series %r has %d %s for %d categories"
                               % (self.title, s.label, len(seq), what, len(self.categories)))
        if not self.series:
            out.append("%s: no series" % self.title)
        return out


def available():
    """Whether matplotlib is installed (benchmarks/run installs it)."""
    return importlib.util.find_spec("matplotlib") is not None


def render(panels, path, title):
    """Draws C{panels} two to a row into the PNG at C{path}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt

    rows = max(1, math.ceil(len(panels) / 2))
    fig, axes = plt.subplots(rows, 2, figsize=(14, 4.5 * rows), squeeze=False)
    fig.suptitle(title)
    flat = [ax for row in axes for ax in row]
    for ax, panel in zip(flat, panels):
        _draw(ax, panel, matplotlib.patches)
    for ax in flat[len(panels):]:
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _draw(ax, panel, patches):
    n = len(panel.series)
    width = 0.8 if n == 1 else 0.76 / n
    for i, s in enumerate(panel.series):
        xs = [x + (i - (n - 1) / 2) * width for x in range(len(panel.categories))]
        bars = ax.bar(xs, [v or 0 for v in s.values], width, label=s.label or None,
                      color=list(s.colors) if s.colors else s.color)
        texts = s.texts if s.texts is not None else [
            "n/a" if v is None else panel.fmt % v for v in s.values]
        ax.bar_label(bars, labels=list(texts), fontsize=panel.fontsize)
    ax.set_xticks(range(len(panel.categories)))
    ax.set_xticklabels(panel.categories, fontsize=8 if len(panel.categories) > 4 else None)
    ax.set_ylabel(panel.ylabel)
    ax.margins(y=panel.margin)
    if panel.reference:
        value, label = panel.reference
        ax.axhline(value, color="grey", linestyle="--", linewidth=1, label=label)
    if panel.legend:
        ax.legend(handles=[patches.Patch(color=c, label=label) for c, label in panel.legend], fontsize=8)
    elif panel.reference or any(s.label for s in panel.series):
        ax.legend(fontsize=8)
    ax.set_title(panel.title)

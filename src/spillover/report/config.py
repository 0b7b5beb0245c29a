"""The report config: which documents and figures to write, and how."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

FORMATS: tuple[str, ...] = ("html", "md")
"""Report documents: ``report.html`` and ``report.md``."""
FIGURE_FORMATS: tuple[str, ...] = ("png", "svg")
"""Figure file formats."""


@dataclass(frozen=True)
class ReportConfig:
    """Options of :func:`write_report`; every field has a sensible default."""

    alpha: float | None = None
    """Significance level applied to adjusted p-values. None: the level recorded in the
    comparison (``summary.alpha``, else ``config.alpha``), else 0.05."""
    formats: tuple[str, ...] = ("html", "md")
    """Documents to write: any of ``html`` and ``md``."""
    figure_formats: tuple[str, ...] = ("png",)
    """Figure files to write into ``figures/``: any of ``png`` and ``svg``. The HTML embeds
    the PNG when ``png`` is listed, else inlines the SVG."""
    title: str | None = None
    """Report title. None: ``Bias spillover report: <run directory name>``."""
    dpi: int = 110
    """Resolution of PNG figures."""
    max_flag_panels: int = 24
    """At most this many Simpson-flag panels are drawn (all flags are still listed)."""

    def __post_init__(self) -> None:
        for name in ("formats", "figure_formats"):  # case-insensitive, as typed
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(str(v).lower() for v in value))
        if self.alpha is not None and not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"`alpha`={self.alpha!r}; expected a number in (0, 1)")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ConfigError(
                f"`formats`={list(self.formats)!r}; expected one or more of {', '.join(FORMATS)}"
            )
        bad = [f for f in self.figure_formats if f not in FIGURE_FORMATS]
        if bad or not self.figure_formats:
            raise ConfigError(
                f"`figure_formats`={list(self.figure_formats)!r}; expected one or more of "
                f"{', '.join(FIGURE_FORMATS)}"
            )
        if not 30 <= self.dpi <= 600:
            raise ConfigError(f"`dpi`={self.dpi!r}; expected 30..600")
        if self.max_flag_panels < 0:
            raise ConfigError(f"`max_flag_panels`={self.max_flag_panels!r}; expected >= 0")

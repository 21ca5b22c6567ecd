"""The platform reads the library's registries instead of keeping its own lists (no Ray, no MLflow)."""
import importlib

import specreg
from specreg_platform import figures


def test_figure_kinds_are_the_registered_regularizers_in_order():
    assert figures.KINDS == tuple(specreg.REGULARIZERS)
    assert [figures.color(kind) for kind in specreg.REGULARIZERS] == list(figures.PALETTE[:len(specreg.REGULARIZERS)])


def test_a_newly_registered_regularizer_gets_its_own_colour_without_editing_figures(monkeypatch):
    new = ("zz-new-kind", "zz-other-kind")
    for kind in new:
        monkeypatch.setitem(specreg.REGULARIZERS, kind, specreg.REGULARIZERS["none"])
    try:
        importlib.reload(figures)
        assert figures.KINDS[-2:] == new
        colours = [figures.color(kind) for kind in specreg.REGULARIZERS]
        markers = [figures.marker(kind) for kind in specreg.REGULARIZERS]
        assert len(set(colours)) == len(colours) == len(set(markers))
    finally:
        monkeypatch.undo()
        importlib.reload(figures)
    assert figures.KINDS == tuple(specreg.REGULARIZERS)

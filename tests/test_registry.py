"""``Registry``: names in registration order, taken names, and ``module:attr`` references."""

from __future__ import annotations

import pytest

import plugins_for_data_tests
from tolaria.errors import ConfigError
from tolaria.registry import Registry


@pytest.fixture
def shapes() -> Registry[str]:
    registry: Registry[str] = Registry("shape", "model.shape")
    registry.register("square", "4 sides")
    registry.register("circle", "no sides")
    return registry


def test_names_keep_registration_order_and_register_returns_the_entry(shapes):
    assert shapes.register("hexagon", "6 sides") == "6 sides"
    assert shapes.names() == ["square", "circle", "hexagon"]
    assert "circle" in shapes and "triangle" not in shapes
    assert 3 not in shapes  # not a str: never a name, and no TypeError
    assert shapes.get("square") == "4 sides"


def test_a_taken_name_needs_replace(shapes):
    with pytest.raises(ValueError, match=r"shape 'square' is already registered .*replace=True"):
        shapes.register("square", "four sides")
    assert shapes.get("square") == "4 sides"
    shapes.register("square", "four sides", replace=True)
    assert shapes.get("square") == "four sides"
    assert shapes.names() == ["square", "circle"]  # replacing keeps the name's place


def test_unregister_forgets_a_name_and_ignores_an_unknown_one(shapes):
    shapes.unregister("square")
    shapes.unregister("never_registered")
    assert shapes.names() == ["circle"] and "square" not in shapes
    shapes.register("square", "again")  # free to take again
    assert shapes.names() == ["circle", "square"]


def test_a_reference_resolves_to_user_code_without_registering_it(shapes):
    reference = "plugins_for_data_tests:tiny_dataset"
    assert shapes.get(reference) is plugins_for_data_tests.tiny_dataset
    assert reference not in shapes and shapes.names() == ["square", "circle"]


def test_a_bad_reference_names_the_field():
    with pytest.raises(ConfigError, match=r"^model\.shape='plugins_for_data_tests:nope': module"):
        Registry("shape", "model.shape").get("plugins_for_data_tests:nope")


def test_an_unknown_name_is_one_line_listing_what_would_work(shapes):
    with pytest.raises(ConfigError) as caught:
        shapes.get("triangle")
    assert str(caught.value) == (
        "model.shape='triangle': unknown shape (built-in: square, circle; "
        "or 'module:function' for your own)"
    )

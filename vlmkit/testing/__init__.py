"""Conformance kit: plain functions a component's tests call to check it against vlmkit's protocols.

A plugin's test suite needs one line per component::

    from vlmkit.testing import check_vision_tower

    def test_tower_conforms():
        check_vision_tower(MyTower, MyTower.Params(hidden_size=16, image_size=16, patch_size=4))

Each ``check_*`` builds the component from small params and asserts (raising ``AssertionError``
with a message that says what to fix):

- the protocol attributes and methods are there (:mod:`vlmkit.protocols`);
- ``Params`` is a pydantic model and the params survive a YAML (JSON-mode) round trip;
- the forward pass maps a small input to the documented shapes, with finite values;
- the output dtype and device follow the input after ``module.to(dtype)`` (float32, float64,
  bfloat16 on CPU);
- every parameter gets a gradient (no dead weights that would stay "untrained" for ever);
- ``state_dict`` keys and shapes are the same across two constructions, ``key_map()`` covers
  them exactly, ``KeyMap.export`` round-trips, and a copy built on the ``meta`` device (as the
  builder does when a checkpoint supplies the weights) loads from the exported safetensors with
  nothing left on ``meta`` and computes the same output;
- the component builds inside a whole tiny model from a YAML-form dict through
  :func:`vlmkit.build` (``load_weights=False``) and that model runs one image through.

:func:`check_component` dispatches on the slot name. The tiny neighbour parts used for the
whole-model check are in :data:`TINY_NEIGHBOURS`.
"""

from .common import DTYPES
from .key_map import check_key_map
from .slots import check_aligner, check_backbone, check_component, check_connector, check_packer, check_vision_tower
from .whole_model import TINY_NEIGHBOURS, check_builds

__all__ = [
    "TINY_NEIGHBOURS",
    "check_component",
    "check_vision_tower",
    "check_connector",
    "check_aligner",
    "check_packer",
    "check_backbone",
    "check_key_map",
    "check_builds",
]

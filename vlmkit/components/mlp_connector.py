"""``mlp``: LLaVA's two-layer projector (transformers' ``LlavaMultiModalProjector``).

``linear_1 (D_v -> D) -> projector_hidden_act -> linear_2 (D -> D)``, applied to every feature
vector; the token count is unchanged (``K = P``). ``D_v`` is the tower's output width (with
several ``vision_feature_layer`` it is already their concatenation), ``D`` the text width.

How many tokens an image gives is the tower's business: patches only, or one more for a kept
class token (CLIP's ``vision_feature_select_strategy="full"``). The builder passes the grid side
as for every connector; a tower that outputs another number of tokens says so with its
``num_tokens`` attribute, and the builder passes it as ``num_tokens=``. Without it
``tokens_per_image = grid ** 2``.

Key map: prefix-free ``linear_1.weight``, ``linear_1.bias``, ``linear_2.weight``,
``linear_2.bias`` (no biases with ``multimodal_projector_bias=False``); the family adds the
checkpoint prefix (``multi_modal_projector.`` in LLaVA files).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import SpecError
from ..hookspecs import hookimpl
from ..keymap import KeyMap
from .navit import ACTIVATIONS, HiddenAct

__all__ = ["MlpConnectorParams", "MlpConnector"]


class MlpConnectorParams(BaseModel):
    """``LlavaConfig.projector_hidden_act`` and ``multimodal_projector_bias``, with their defaults."""

    model_config = ConfigDict(extra="forbid")

    projector_hidden_act: HiddenAct = Field("gelu", description="Activation between the two linear layers.")
    multimodal_projector_bias: bool = Field(True, description="Whether both linear layers have a bias.")


class MlpConnector(nn.Module):
    """Patch features ``(N, K, D_v)`` -> visual tokens ``(N, K, out_features)``.

    Built as ``MlpConnector(params, in_features=D_v, grid=patches_per_side, out_features=D)``,
    optionally ``num_tokens=K`` when the tower's token count is not ``grid ** 2``.
    """

    Params = MlpConnectorParams

    def __init__(
        self,
        params: MlpConnectorParams,
        *,
        in_features: int,
        grid: int,
        out_features: int,
        num_tokens: int | None = None,
    ) -> None:
        super().__init__()
        tokens = self.count_tokens(params, grid=grid, num_tokens=num_tokens)
        self.params = params
        self.in_features = in_features
        self.grid = grid
        self.out_features = out_features
        self.tokens_per_image = tokens
        bias = params.multimodal_projector_bias
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias)
        self.act = ACTIVATIONS[params.projector_hidden_act]
        self.linear_2 = nn.Linear(out_features, out_features, bias=bias)

    @classmethod
    def count_tokens(cls, params: MlpConnectorParams, *, grid: int, num_tokens: int | None = None) -> int:
        """The declared facts (:class:`vlmkit.protocols.DeclaresTokenCount`): one token per feature
        row, ``num_tokens`` when the tower states it, else ``grid ** 2``."""
        tokens = grid * grid if num_tokens is None else num_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            raise SpecError(
                f"the mlp connector needs a positive token count per image; "
                f"got grid={grid!r}, num_tokens={num_tokens!r}",
                key_path="connector",
                hint="pass the vision tower's num_patches_per_side as grid (and its num_tokens, if it has one)",
            )
        return tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, K, D_v) -> (N, K, out_features)``."""
        return self.linear_2(self.act(self.linear_1(features)))

    def key_map(self) -> KeyMap:
        """Prefix-free: ``linear_{1,2}.weight`` (and ``.bias``) under their own names."""
        return KeyMap.prefixed(self.state_dict().keys(), "")


@hookimpl
def vlmkit_register_components(registry) -> None:  # noqa: ANN001 - pluggy passes the Registry
    """Register :class:`MlpConnector` as connector ``mlp``."""
    registry.add_connector("mlp", MlpConnector)

"""nanochat's ML core (model, optimizers, tokenizer, data, training, evaluation, inference), shaped like
upstream nanochat; the pipeline and serving packages sit above it (DESIGN.md, Layers).

Public: `load_model(uri, device="cpu") -> (model, tokenizer)` for any model of a store.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any


def load_model(uri: Any, device: Any = "cpu") -> tuple[Any, Any]:
    """Load any model artifact, imported from upstream or trained here, with its tokenizer.

    uri: a stage's finished model (`<store>/<stage>/<key>`, e.g. `store/sft/<key>` or `store/import/<key>`), or a
    training checkpoint in it (`.../checkpoints/step_000300`); a local directory, a `file://` URL or an `s3://`
    URI (endpoint and keys from the standard AWS variables). device: "cpu", "cuda", "cuda:1", "mps" or a
    torch.device.

    Returns (nanochat_core.gpt.GPT in eval mode on `device`, nanochat_core.tokenizer.Tokenizer). The artifact is
    checked against its manifest (sha256) and a remote one downloaded into the local cache (NANOCHAT_CACHE,
    default ~/.cache/nanochat/artifacts); the tokenizer is the one the model's manifest names. Bad input (no such
    model, a damaged file, no tokenizer recorded) raises a nanochat_core.errors.UserError or an
    nanochat_core.pipeline.artifacts.ArtifactError whose message names it.
    """
    # The store's code lives in the pipeline package, above this one: it is imported here by name and only when
    # called, so `import nanochat_core` stays light, and no ML-core module gains an import of the pipeline (this
    # package's __init__ is in no stage's code: identity.closure skips the package itself).
    return import_module("nanochat_core.pipeline.models").load_model(uri, device)

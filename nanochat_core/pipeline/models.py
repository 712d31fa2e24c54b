"""Any model of a store as (model, tokenizer): the implementation of the public `nanochat_core.load_model`.

A model is a stage's finished model (`<store>/<stage>/<key>`: base, mid, sft, rl, or an upstream import), or a
training checkpoint (`<store>/<stage>/<key>/checkpoints/step_N`), given as a local directory or as its URI in a
remote store. Its tokenizer is the one its manifest (or its stage's inputs record) names, so it is found wherever
the store now lies.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanochat_core.checkpoint import load_model as load_model_dir
from nanochat_core.gpt import GPT
from nanochat_core.pipeline import artifacts, stages
from nanochat_core.pipeline.artifacts import ArtifactError
from nanochat_core.tokenizer import Tokenizer


def model_dirs(uri: str | Path) -> tuple[Path, Path]:
    """Local (model directory, tokenizer directory) of a model, each checked: an artifact against its manifest
    (sha256), a remote one downloaded into the local cache (or found there intact), a checkpoint when it loads
    (its COMPLETE marker's sha256 list)."""
    uri = str(uri)
    if artifacts.is_remote(uri):
        local = stages.local_model(uri)
    else:
        local = artifacts.local_path(uri).expanduser().resolve()
        if not local.is_dir():
            raise ArtifactError(f"model {uri} does not exist (no directory there)")
        uri = str(local)
        if artifacts.read_manifest_bytes(uri) is not None:
            artifacts.verify_artifact(uri, deep=True)
    tokenizer = stages.model_tokenizer(uri)
    artifacts.verify_artifact(tokenizer.uri, tokenizer.digest, deep=True)
    return local, artifacts.materialize(tokenizer)


def load_model(uri: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer]:
    """(model in eval mode on `device`, its Tokenizer) of any model artifact or checkpoint: see the module doc."""
    model_dir, tok_dir = model_dirs(uri)
    model, _ = load_model_dir(model_dir, device, phase="eval")
    tokenizer = Tokenizer.load(tok_dir)
    if model.config.vocab_size != tokenizer.get_vocab_size():
        raise ArtifactError(f"model {uri} has a vocabulary of {model.config.vocab_size} tokens but the tokenizer "
                            f"its manifest names ({tok_dir}) has {tokenizer.get_vocab_size()}")
    return model, tokenizer

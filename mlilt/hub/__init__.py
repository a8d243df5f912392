"""Packs on the Hugging Face Hub: ``mlilt packs push``, ``mlilt packs pull`` and
``hf://user/repo[@revision]`` wherever a pack is named (``mlilt.load``, ``--pack``,
``--teacher``, ``--anchor``: they all go through ``packs.resolve_pack``).

huggingface_hub does the transfer, the cache (``HF_HUB_CACHE``), the token (``HF_TOKEN``,
``hf auth login``) and offline mode (``HF_HUB_OFFLINE=1``); this package adds what a pack
needs: a folder is a valid pack before anything is uploaded, a downloaded snapshot passes
``read_pack`` (its tensors' sha256) before anything uses it, and the model card is generated
from the pack's own record (``card.py``). huggingface_hub is imported only when used.
"""
from mlilt.hub.card import model_card
from mlilt.hub.transfer import (CARD_FILE, DOWNLOAD_PATTERNS, HF_SCHEME, PACK_FILES, HubRef, parse_hub_ref,
                                prepared_upload, pull, push, resolve_hub_pack, snapshot)

__all__ = ["CARD_FILE", "DOWNLOAD_PATTERNS", "HF_SCHEME", "PACK_FILES", "HubRef", "model_card", "parse_hub_ref",
           "prepared_upload", "pull", "push", "resolve_hub_pack", "snapshot"]

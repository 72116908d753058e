"""Share pruned models on the Hub and fetch them back.

Two kinds of repo. A masks-only repo (the default, like a PEFT adapter) holds `optin_config.json`, naming the base
model by Hub id and exact commit, the masks (and scores) and a model card: a few kB, and the loader rebuilds the
slim model from the base. A full repo adds the slim weights and config.json and loads without the base. All Hub
traffic goes through huggingface_hub, so HF_ENDPOINT, HF_HUB_OFFLINE, tokens and the HF cache work as usual.
"""

from .card import CardMetrics, model_card
from .download import download_base_model, download_checkpoint
from .push import push_to_hub, write_repo_folder

__all__ = ["CardMetrics", "download_base_model", "download_checkpoint", "model_card", "push_to_hub", "write_repo_folder"]
